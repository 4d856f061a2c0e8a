"""Render Cycles' geometry passes (Depth, UV, Normal) for one camera with the bpy wheel, as ViewSet arrays.

A thin test helper over the add-on's capture layer (``blender_addon.capture.passes``), where the pass
rendering, the K <-> Blender lens conversion and the OpenImageIO EXR reader now live. Unlike the add-on's
``CaptureSession`` (a scratch scene holding one object's evaluated copy), ``render_cycles_passes`` renders the
CURRENT scene as it is, which is what the agreement tests want after a glTF import.

Conversions at this edge are documented in ``blender_addon/capture/passes.py``.

Only bpy code here; import it after pointing XDG_CACHE_HOME / XDG_CONFIG_HOME / BLENDER_USER_RESOURCES at a
scratch folder (see conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from blender_addon.capture.passes import (  # noqa: F401  (re-exported for the tests)
    BACKGROUND_DEPTH,
    configure_pass_render,
    place_camera,
    plain_material,
    read_multilayer_exr,
    render_passes,
)
from blender_addon.core.camera import SENSOR_WIDTH_MM, blender_camera_settings  # noqa: F401


def new_scene_with_gltf(path: str | os.PathLike) -> None:
    """Empty factory scene, then import a glTF/GLB (Blender converts its Y-up to Z-up on import)."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    result = bpy.ops.import_scene.gltf(filepath=str(path))
    if "FINISHED" not in result:
        raise RuntimeError(f"glTF import of {path} failed: {result}")


def render_cycles_passes(
    K: np.ndarray,
    world_to_camera: np.ndarray,
    width: int,
    height: int,
    out_dir: str | os.PathLike,
    *,
    geometry_normals: bool = True,
) -> dict[str, np.ndarray]:
    """Render the current scene's Depth/UV/Normal passes for one OpenCV camera (world = Blender's world).

    ``geometry_normals``: render with an emission-only override material so the Normal pass is the mesh's
    interpolated shading normal, not the material's normal/bump-mapped one (what correspondence weights want).

    Returns ViewSet-layout arrays for one view: depth (H, W) float32 with 0 on background, mask (H, W) bool,
    uv (H, W, 2), normal (H, W, 3) (world space, unit, 0 on background).
    """
    import bpy

    scene = bpy.context.scene
    cam = bpy.data.objects.new("ConcordCamera", bpy.data.cameras.new("ConcordCamera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    place_camera(cam, K, world_to_camera, width, height)
    configure_pass_render(scene, width, height)
    if geometry_normals:
        bpy.context.view_layer.material_override = plain_material()
    return render_passes(scene, Path(out_dir) / "passes.exr")
