"""Cycles geometry passes (Depth, UV, Normal) for one OpenCV camera, read back as ViewSet-layout arrays.

Conversions at this edge (ViewSet contract, server/concord/geometry/viewset.py; camera math in
``..core.camera``):
* camera: ``matrix_world = blender_matrix_world_from_opencv(world_to_camera)``; lens from K with
  ``sensor_fit = 'HORIZONTAL'``; principal-point offsets through shift_x / shift_y.
* Cycles on the CPU, 1 sample, no denoising, a 0.01 px pixel filter: one ray through each pixel's centre.
* Depth pass: planar camera z, background 1e10 -> 0; mask = depth < 1e9.
* UV pass: the render-active UV map, Blender's convention; Normal pass: world-space shading normal. An
  emission-only override material (no BSDF) keeps the Normal pass geometric (normal maps, bump and Cycles'
  glossy-normal correction would bend it otherwise).
* The multilayer EXR is read with the OpenImageIO bindings that ship inside Blender (``bpy.data.images.load``
  gives no pixels for it in background mode); OpenImageIO returns row 0 at the top, as the contract wants.

Version differences (Blender 4.2 .. 5.x) are handled here, in one place: ``image_settings.media_type`` exists
from 5.0 and must be set before ``file_format``; ``Material.use_nodes`` is only set before 5.0.

Layer rule: bpy lives here (capture/ is a bpy layer); nothing here talks to the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix

from ..core.camera import blender_camera_settings, blender_matrix_world_from_opencv

BACKGROUND_DEPTH = 1e10
PLAIN_MATERIAL = "Concord Capture (emission)"


def _oiio():
    site = os.path.join(
        bpy.utils.resource_path("LOCAL"), "python", "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages"
    )
    try:
        import OpenImageIO as oiio  # noqa: N813  (Blender's own Python has it on sys.path)
    except ImportError:
        if site not in sys.path:
            sys.path.append(site)
        import OpenImageIO as oiio  # noqa: N813  (the bpy wheel keeps it beside Blender's scripts)
    return oiio


def read_multilayer_exr(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All channels of a (multi-part) EXR as float32 (H, W) arrays keyed by channel name, row 0 = top."""
    oiio = _oiio()
    inp = oiio.ImageInput.open(str(path))
    if inp is None:
        raise OSError(f"cannot open {path}: {oiio.geterror()}")
    channels: dict[str, np.ndarray] = {}
    try:
        sub = 0
        while inp.seek_subimage(sub, 0):
            spec = inp.spec()
            pixels = inp.read_image(sub, 0, 0, spec.nchannels, "float")
            pixels = np.asarray(pixels, dtype=np.float32).reshape(spec.height, spec.width, spec.nchannels)
            for c, name in enumerate(spec.channelnames):
                channels[name] = pixels[..., c]
            sub += 1
    finally:
        inp.close()
    return channels


def find_pass(channels: dict[str, np.ndarray], layer: str, suffixes: str) -> np.ndarray:
    """Stack channels ``<...>.<layer>.<s>`` for s in suffixes (e.g. layer 'Normal', suffixes 'XYZ')."""
    found = []
    for s in suffixes:
        key = next((k for k in channels if k.split(".")[-2:] == [layer, s]), None)
        if key is None:
            raise KeyError(f"pass {layer}.{s} not in EXR channels {sorted(channels)}")
        found.append(channels[key])
    return np.stack(found, axis=-1)


def plain_material() -> bpy.types.Material:
    """An emission-only material (created once per capture; the caller removes it)."""
    mat = bpy.data.materials.new(PLAIN_MATERIAL)
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True
    nodes = mat.node_tree.nodes
    nodes.clear()
    emission = nodes.new("ShaderNodeEmission")
    output = nodes.new("ShaderNodeOutputMaterial")
    mat.node_tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    return mat


def configure_pass_render(scene: bpy.types.Scene, width: int, height: int) -> None:
    """Cycles settings for geometry passes on ``scene`` (meant for a scratch scene: it overwrites them)."""
    render = scene.render
    render.engine = "CYCLES"
    render.resolution_x, render.resolution_y = int(width), int(height)
    render.resolution_percentage = 100
    render.pixel_aspect_x = render.pixel_aspect_y = 1.0
    render.film_transparent = True
    render.use_compositing = False
    render.use_sequencer = False
    render.use_border = False
    # Only the camera moves between views: keep Cycles' synced geometry and BVH between renders (~35 % less
    # time per view at 512^2). CaptureSession switches it off before removing its scratch scene, which frees it.
    render.use_persistent_data = True
    cycles = scene.cycles
    cycles.device = "CPU"
    cycles.samples = 1
    cycles.use_adaptive_sampling = False
    cycles.use_denoising = False
    cycles.filter_width = 0.01  # one ray through each pixel's centre
    cycles.max_bounces = 0
    for layer in scene.view_layers:
        layer.use_pass_z = True
        layer.use_pass_normal = True
        layer.use_pass_uv = True
    settings = render.image_settings
    if hasattr(settings, "media_type"):  # Blender 5.0+: before file_format
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.color_depth = "32"
    settings.exr_codec = "NONE"


def place_camera(cam_obj: bpy.types.Object, K: np.ndarray, world_to_camera: np.ndarray, width: int, height: int) -> None:
    """Set a camera object's lens, shift and matrix_world to reproduce an OpenCV camera."""
    for key, value in blender_camera_settings(K, width, height).items():
        setattr(cam_obj.data, key, value)
    cam_obj.data.clip_start = 1e-3
    cam_obj.data.clip_end = 1e6
    cam_obj.matrix_world = Matrix(blender_matrix_world_from_opencv(world_to_camera).tolist())


def render_passes(scene: bpy.types.Scene, exr_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Render ``scene`` (already configured, camera placed) and return one view's ViewSet-layout maps:
    depth (H, W) float32 0 on background, mask (H, W) bool, uv (H, W, 2), normal (H, W, 3)."""
    scene.render.filepath = str(exr_path)
    bpy.ops.render.render(write_still=True, scene=scene.name)
    ch = read_multilayer_exr(exr_path)
    z = find_pass(ch, "Depth", "Z")[..., 0]
    mask = z < 1e9
    uv = find_pass(ch, "UV", "UV")
    normal = find_pass(ch, "Normal", "XYZ")
    return {
        "depth": np.where(mask, z, 0.0).astype(np.float32),
        "mask": mask,
        "uv": np.where(mask[..., None], uv, 0.0).astype(np.float32),
        "normal": np.where(mask[..., None], normal, 0.0).astype(np.float32),
    }
