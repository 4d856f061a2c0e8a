"""Render Cycles' geometry passes (Depth, UV, Normal) for one camera with the bpy wheel, as ViewSet arrays.

Reusable capture code (the add-on's capture layer will adopt it): given an OpenCV camera (K, world_to_camera
in Blender's world) it places a Blender camera, renders Depth/Normal/UV passes with Cycles on the CPU (1
sample, no denoising, a 0.01 px pixel filter so each pixel's one ray goes through its centre), writes a
multilayer EXR and reads it back with the OpenImageIO bindings that ship inside the bpy wheel.

Conversions at this edge (concord.geometry.viewset contract):
* camera: ``matrix_world = blender_camera_to_world_from_opencv(world_to_camera)``; lens from K with
  ``sensor_fit = 'HORIZONTAL'``: ``lens = fx * sensor_width / W``; principal-point offsets via shift_x/shift_y,
  which Blender measures in units of the fitted sensor side (the image width with 'HORIZONTAL').
* Depth pass: planar camera z, background 1e10 -> 0. Mask: Depth < 1e9.
* UV pass: (u, v) already in Blender's convention; background 0.
* Normal pass: world-space shading normal; background 0.
* Rows: the EXR read through OpenImageIO has row 0 at the top (display window order), as the contract wants.

Only bpy code here; import it after pointing XDG_CACHE_HOME / XDG_CONFIG_HOME / BLENDER_USER_RESOURCES at a
scratch folder (see conftest.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from concord.geometry.viewset import blender_camera_to_world_from_opencv

BACKGROUND_DEPTH = 1e10
SENSOR_WIDTH_MM = 36.0


def blender_camera_settings(K: np.ndarray, width: int, height: int) -> dict:
    """Blender camera data settings reproducing pinhole K (square pixels, no skew) at width x height."""
    K = np.asarray(K, dtype=np.float64)
    if abs(K[0, 0] - K[1, 1]) > 1e-6 * K[0, 0] or abs(K[0, 1]) > 1e-9:
        raise ValueError("Blender cameras need square pixels (fx == fy) and no skew")
    size = float(width)  # with sensor_fit 'HORIZONTAL' shifts are fractions of the image width
    return {
        "type": "PERSP",
        "sensor_fit": "HORIZONTAL",
        "sensor_width": SENSOR_WIDTH_MM,
        "lens": K[0, 0] * SENSOR_WIDTH_MM / width,
        # positive shift_x moves the frustum right (principal point left); image rows grow downwards
        "shift_x": (width / 2.0 - K[0, 2]) / size,
        "shift_y": (K[1, 2] - height / 2.0) / size,
    }


def _oiio():
    import bpy

    site = os.path.join(bpy.utils.resource_path("LOCAL"), "python", "lib", "python3.11", "site-packages")
    if site not in sys.path:
        sys.path.append(site)
    import OpenImageIO as oiio  # noqa: N813 (ships inside the bpy wheel)

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


def _find(channels: dict[str, np.ndarray], layer: str, suffixes: str) -> np.ndarray:
    found = []
    for s in suffixes:
        key = next((k for k in channels if k.split(".")[-2:] == [layer, s]), None)
        if key is None:
            raise KeyError(f"pass {layer}.{s} not in EXR channels {sorted(channels)}")
        found.append(channels[key])
    return np.stack(found, axis=-1)


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

    ``geometry_normals``: render with a plain material override so the Normal pass is the mesh's interpolated
    shading normal, not the material's normal/bump-mapped one (what correspondence weights want).

    Returns ViewSet-layout arrays for one view: depth (H, W) float32 with 0 on background, mask (H, W) bool,
    uv (H, W, 2), normal (H, W, 3) (world space, unit, 0 on background).
    """
    import bpy

    scene = bpy.context.scene
    cam_data = bpy.data.cameras.new("ConcordCamera")
    for key, value in blender_camera_settings(K, width, height).items():
        setattr(cam_data, key, value)
    cam_data.clip_start = 1e-3
    cam_data.clip_end = 1e6
    cam = bpy.data.objects.new("ConcordCamera", cam_data)
    scene.collection.objects.link(cam)
    from mathutils import Matrix

    cam.matrix_world = Matrix(blender_camera_to_world_from_opencv(world_to_camera).tolist())
    scene.camera = cam

    render = scene.render
    render.engine = "CYCLES"
    render.resolution_x, render.resolution_y = int(width), int(height)
    render.resolution_percentage = 100
    render.pixel_aspect_x = render.pixel_aspect_y = 1.0
    render.film_transparent = True
    render.use_compositing = False
    render.use_sequencer = False
    cycles = scene.cycles
    cycles.device = "CPU"
    cycles.samples = 1
    cycles.use_adaptive_sampling = False
    cycles.use_denoising = False
    cycles.filter_width = 0.01  # one ray through each pixel's centre
    cycles.max_bounces = 0

    layer = bpy.context.view_layer
    if geometry_normals:
        # The Normal pass averages the BSDF closures' normals: normal/bump maps bend them, and Cycles also
        # bends glossy closures' normals at grazing angles (valid-reflection correction). An emission-only
        # material has no BSDF, so the pass is the plain interpolated shading normal.
        plain = bpy.data.materials.new("ConcordPlain")
        plain.use_nodes = True
        nodes = plain.node_tree.nodes
        nodes.clear()
        emission = nodes.new("ShaderNodeEmission")
        output = nodes.new("ShaderNodeOutputMaterial")
        plain.node_tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
        for ob in scene.objects:
            if ob.type == "MESH":
                ob.data.materials.clear()
                ob.data.materials.append(plain)
    layer.use_pass_z = True
    layer.use_pass_normal = True
    layer.use_pass_uv = True

    settings = render.image_settings
    settings.media_type = "MULTI_LAYER_IMAGE"  # Blender 5: before file_format
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.color_depth = "32"
    settings.exr_codec = "ZIP"
    out = Path(out_dir) / "passes.exr"
    render.filepath = str(out)
    bpy.ops.render.render(write_still=True)

    ch = read_multilayer_exr(out)
    z = _find(ch, "Depth", "Z")[..., 0]
    mask = z < 1e9
    uv = _find(ch, "UV", "UV")  # U, V channels
    normal = _find(ch, "Normal", "XYZ")
    depth = np.where(mask, z, 0.0).astype(np.float32)
    uv = np.where(mask[..., None], uv, 0.0).astype(np.float32)
    normal = np.where(mask[..., None], normal, 0.0).astype(np.float32)
    return {"depth": depth, "mask": mask, "uv": uv, "normal": normal}
