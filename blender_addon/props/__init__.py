"""The add-on's properties: what the user sets (``Scene.concord``) and the running job's state
(``WindowManager.concord_job``: not saved in the .blend, not part of undo, so undo never rewinds a progress bar).

All property groups are attached and detached here, in one place.

Layer rule: a bpy layer; no network, no threads.
"""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

RIGS = [
    ("ZERO123PP", "Zero123++ (6 views)", "Six views: azimuths 30..330 step 60, elevations 20/-10, 30 degree lens"),
    ("ORBIT", "Orbit", "N views evenly around the object at one elevation"),
    ("SCENE_CAMERAS", "Scene Cameras", "Every perspective camera in the scene, as placed"),
]
TEXTURE_SIZES = [(str(s), f"{s} px", f"{s} x {s} texels") for s in (256, 512, 1024, 2048, 4096)]
SHARED_ATTENTION = [
    ("all", "All Views", "Every view attends to every other view (most consistent, slowest)"),
    ("reference", "Reference View", "Every view attends to the reference view"),
    ("off", "Off", "Views are generated independently"),
]
SLOT_MODES = [
    ("REPLACE", "Replace Active Slot", "Put the new material in the active slot; the old one is kept (fake user)"),
    ("APPEND", "New Slot", "Add a slot for the new material and assign every face to it"),
]


def _uv_maps(self, context):
    ob = context.active_object if context else None
    if ob is None or ob.type != "MESH":
        return []
    return [(uv.name, uv.name, "") for uv in ob.data.uv_layers]


class ConcordSettings(bpy.types.PropertyGroup):
    """What to make: prompt, sampler settings, rig, sizes, consistency switches (saved with the scene)."""

    prompt: StringProperty(name="Prompt", default="", description="What the texture should look like")
    negative_prompt: StringProperty(name="Negative", default="", description="What it should not look like")
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1)
    steps: IntProperty(name="Steps", default=30, min=1, max=200)
    guidance: FloatProperty(name="Guidance", default=7.5, min=0.0, max=50.0)
    conditioning_scale: FloatProperty(name="Depth Strength", default=1.0, min=0.0, max=4.0)
    rig: EnumProperty(name="Rig", items=RIGS, default="ZERO123PP")
    orbit_views: IntProperty(name="Views", default=8, min=1, max=16)
    orbit_elevation: FloatProperty(name="Elevation", default=15.0, min=-89.0, max=89.0, subtype="NONE")
    view_resolution: IntProperty(
        name="View Size", default=512, min=64, max=1024, step=64, description="Pixels per side of each view"
    )
    texture_size: EnumProperty(name="Texture", items=TEXTURE_SIZES, default="1024")
    uv_map: StringProperty(name="UV Map", default="", description="UV map to texture (empty: the active render map)")
    grid: BoolProperty(name="Grid", default=False, description="Tile the views into one image while sampling")
    shared_attention: EnumProperty(name="Shared Attention", items=SHARED_ATTENTION, default="all")
    uv_sync: BoolProperty(name="UV Sync", default=True, description="Average the views in UV space every step")
    uv_noise: BoolProperty(name="UV Noise", default=True, description="Start every view from noise on the surface")
    loss_guidance: BoolProperty(name="Loss Guidance", default=False, description="Gradient guidance (slow)")
    slot_mode: EnumProperty(name="Material", items=SLOT_MODES, default="REPLACE")


class ConcordJobState(bpy.types.PropertyGroup):
    """The running (or last) job, for the panel. Lives on the window manager: never saved, never undone."""

    running: BoolProperty(default=False)
    cancelling: BoolProperty(default=False)
    stage: StringProperty(default="")
    step: IntProperty(default=0)
    total: IntProperty(default=0)
    progress: FloatProperty(default=0.0, min=0.0, max=1.0, subtype="FACTOR")
    message: StringProperty(default="")
    last_result: StringProperty(default="", subtype="DIR_PATH")
    last_report: StringProperty(default="")
    preview_image: StringProperty(default="", description="Name of the image with the last view grid")


classes = (ConcordSettings, ConcordJobState)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register():
    _register()
    bpy.types.Scene.concord = PointerProperty(type=ConcordSettings)
    bpy.types.WindowManager.concord_job = PointerProperty(type=ConcordJobState)


def unregister():
    del bpy.types.WindowManager.concord_job
    del bpy.types.Scene.concord
    _unregister()
