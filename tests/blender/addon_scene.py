"""Small steps the add-on's bpy tests share: its preferences, and the BoxTextured fixture imported, selected and
active (the state an artist is in before pressing Texture Selected)."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meshes"
BOX = FIXTURES / "boxtextured" / "BoxTextured.glb"


def addon_prefs(bpy):
    return bpy.context.preferences.addons["blender_addon"].preferences


def import_box(bpy):
    """Import BoxTextured.glb and make its mesh the only selected, active object; returns the object."""
    bpy.ops.import_scene.gltf(filepath=str(BOX))
    ob = next(o for o in bpy.context.scene.objects if o.type == "MESH")
    bpy.ops.object.select_all(action="DESELECT")
    ob.select_set(True)
    bpy.context.view_layer.objects.active = ob
    return ob
