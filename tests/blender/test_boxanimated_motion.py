"""Blender's motion vectors against BoxAnimated's known motion (the glTF sample's animated inner box: it rises, then
turns), through the frame reader the `stylize` job's CLI uses.

Blender renders the imported glTF animation to multilayer EXR (Cycles, Combined + Depth + Vector + Position +
Object Index passes). For every pixel on a box in frame t, its world point (Position pass) is taken back into the
box's own frame with the box's matrix at t, forward again with its matrix at t - 1 (the animation Blender plays:
`scene.frame_set`), and projected through the camera: where the point WAS. That minus the pixel's centre is the
motion the FrameSet contract asks for (`concord.frames.frameset`), computed here from the scene itself; the frame
reader's motion (from Blender's Vector pass) must match it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from concord.frames.frameset import correspondence
from concord.frames.io import FrameFolder, read_exr_channels

pytestmark = pytest.mark.blender

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "animated" / "boxanimated" / "BoxAnimated.gltf"
SIZE = 64
FRAMES = (34, 37)  # the inner box both rises and turns here


def render_boxanimated(bpy, out: Path):
    from mathutils import Vector

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=str(FIXTURE))
    scene = bpy.context.scene
    r = scene.render
    r.engine = "CYCLES"
    r.resolution_x = r.resolution_y = SIZE
    r.resolution_percentage = 100
    r.use_motion_blur = False
    c = scene.cycles
    c.device, c.samples, c.use_adaptive_sampling, c.use_denoising = "CPU", 1, False, False
    c.filter_width = 0.01  # one ray through each pixel's centre
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    cam.location = (2.6, -3.4, 3.2)
    cam.rotation_euler = (Vector((0.0, 0.0, 1.7)) - cam.location).to_track_quat("-Z", "Y").to_euler()
    boxes = [o for o in scene.objects if o.type == "MESH"]
    for k, ob in enumerate(boxes, start=1):
        ob.pass_index = k
    layer = scene.view_layers[0]
    layer.use_pass_z = layer.use_pass_vector = layer.use_pass_position = layer.use_pass_object_index = True
    settings = r.image_settings
    if hasattr(settings, "media_type"):
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    scene.frame_start, scene.frame_end = FRAMES
    out.mkdir(parents=True, exist_ok=True)
    r.filepath = str(out / "frame_")
    bpy.ops.render.render(animation=True)
    matrices = {}
    for f in range(FRAMES[0] - 1, FRAMES[1] + 1):
        scene.frame_set(f)
        matrices[f] = {ob.pass_index: np.array(ob.matrix_world) for ob in boxes}
    return out, matrices, cam, scene


def project(bpy, scene, cam, points: np.ndarray) -> np.ndarray:
    """World points (M, 3) -> pixel (x, y), row 0 at the top, pixel centres at +0.5."""
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    out = np.empty((len(points), 2))
    for i, p in enumerate(points):
        v = world_to_camera_view(scene, cam, Vector(p.tolist()))
        out[i] = (v.x * SIZE, (1.0 - v.y) * SIZE)
    return out


def test_vector_pass_motion_matches_the_animation(bpy_module, tmp_path):
    bpy = bpy_module
    out, matrices, cam, scene = render_boxanimated(bpy, tmp_path / "exr")
    folder = FrameFolder(out, allow_flow=False)
    assert folder.motion_source == "renderer" and len(folder) == FRAMES[1] - FRAMES[0] + 1
    fs, _ = folder.read(0, len(folder))
    checked = 0
    for k in range(1, len(folder)):
        f = FRAMES[0] + k
        ch = read_exr_channels(folder.paths[k], ["ViewLayer.Position.X", "ViewLayer.Position.Y",
                                                 "ViewLayer.Position.Z", "ViewLayer.Object Index.X"])
        world = np.stack([ch[f"ViewLayer.Position.{a}"] for a in "XYZ"], -1)
        index = np.rint(ch["ViewLayer.Object Index.X"]).astype(int)
        expected = np.full((SIZE, SIZE, 2), np.nan)
        for idx in (1, 2):
            sel = index == idx
            if not sel.any():
                continue
            p = np.concatenate([world[sel], np.ones((sel.sum(), 1))], 1)
            then = (matrices[f - 1][idx] @ np.linalg.inv(matrices[f][idx]) @ p.T).T[:, :3]
            rows, cols = np.nonzero(sel)
            expected[rows, cols] = project(bpy, scene, cam, then) - np.stack([cols + 0.5, rows + 0.5], 1)
        on_box = ~np.isnan(expected[..., 0])
        # pixels whose four neighbours are on the same box (silhouette pixels mix surfaces and the background)
        interior = on_box.copy()
        interior[1:-1, 1:-1] &= (index[:-2, 1:-1] == index[1:-1, 1:-1]) & (index[2:, 1:-1] == index[1:-1, 1:-1]) \
            & (index[1:-1, :-2] == index[1:-1, 1:-1]) & (index[1:-1, 2:] == index[1:-1, 1:-1])
        err = np.linalg.norm(fs.motion[k][interior] - expected[interior], axis=-1)
        moving = np.linalg.norm(expected[interior], axis=-1) > 0.5
        assert moving.sum() > 20  # the inner box really moves here (up to ~1.4 px per frame)
        # measured: agreement to ~2e-5 px (a motion of the wrong sign is off by ~0.8 px on average)
        assert np.percentile(err, 99) <= 0.01 and np.max(err[moving]) <= 0.05, (np.percentile(err, 99), err[moving].max())
        # and the contract's correspondence (with its depth test) keeps almost every interior pixel
        _src, ok = correspondence(fs.motion[k], fs.depth[k], fs.depth[k - 1])
        assert ok[interior].mean() > 0.9
        checked += int(interior.sum())
    assert checked > 200
