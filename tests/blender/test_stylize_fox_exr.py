"""`concord stylize` on OpenEXR frames Blender rendered itself: the glTF Fox (a skinned, animated character) over a
few frames with Combined + Depth + Vector as multilayer EXR, stylized in-process with the shipped micro model. The
motion comes from Blender's Vector pass (`renderer`), both warping errors are measured, and a run without the
Vector pass but with --no-flow is refused naming the pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from concord.stylize_command import main

pytestmark = pytest.mark.blender

FOX = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "fox" / "Fox.glb"
SIZE = 64


def render_fox(bpy, out: Path, vector: bool = True) -> Path:
    from mathutils import Vector

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=str(FOX))
    scene = bpy.context.scene
    fox = next(o for o in scene.objects if o.type == "MESH" and o.name.lower().startswith("fox"))
    for o in list(scene.objects):
        if o.type == "MESH" and o is not fox:
            bpy.data.objects.remove(o)  # the sample's stray icosphere
    r = scene.render
    r.engine = "CYCLES"
    r.resolution_x = r.resolution_y = SIZE
    r.resolution_percentage = 100
    r.use_motion_blur = False
    scene.cycles.device, scene.cycles.samples = "CPU", 1
    scene.cycles.use_denoising = False
    world = bpy.data.worlds.new("World")
    scene.world = world
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    cam.data.clip_end = 10000.0
    centre = fox.matrix_world @ Vector((0.0, 0.0, 0.0))
    cam.location = centre + Vector((250.0, -250.0, 120.0))
    cam.rotation_euler = (centre + Vector((0.0, 0.0, 40.0)) - cam.location).to_track_quat("-Z", "Y").to_euler()
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    scene.collection.objects.link(sun)
    layer = scene.view_layers[0]
    layer.use_pass_z = True
    layer.use_pass_vector = vector
    settings = r.image_settings
    if hasattr(settings, "media_type"):
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    scene.frame_start, scene.frame_end = 10, 13
    out.mkdir(parents=True, exist_ok=True)
    r.filepath = str(out / "fox_")
    bpy.ops.render.render(animation=True)
    return out


def test_stylize_blender_exr_frames_of_the_skinned_fox(bpy_module, tmp_path, capsys):
    import numpy as np

    from concord.frames.io import FrameFolder

    frames = render_fox(bpy_module, tmp_path / "exr")
    fs, _ = FrameFolder(frames).read(0, 4)
    fg = fs.depth > 0
    assert 0.03 < fg.mean() < 0.9  # the fox is in the picture
    assert np.abs(fs.motion[1:][fg[1:]]).max() > 0.2  # and it moves (the skinned "Survey" animation)
    out = tmp_path / "out"
    assert main([str(frames), "--prompt", "a brown and white dots capsule", "--out", str(out), "--steps", "4",
                 "--device", "cpu", "--chunk-frames", "2"]) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["motion_source"] == "renderer" and m["frames"] == 4
    assert all(v is not None for v in m["warping_error"]["per_frame"][1:])
    assert all(v is not None for v in m["input_warping_error"]["per_frame"][1:])
    assert len(list((out / "frames").glob("frame_*.png"))) == 4 and (out / "preview.mp4").exists()


def test_exr_without_vector_pass_and_no_flow_names_the_pass(bpy_module, tmp_path, capsys):
    frames = render_fox(bpy_module, tmp_path / "exr", vector=False)
    assert main([str(frames), "--prompt", "a red sphere", "--out", str(tmp_path / "o"), "--no-flow"]) == 1
    err = capsys.readouterr().err
    assert "Vector" in err and "Traceback" not in err
