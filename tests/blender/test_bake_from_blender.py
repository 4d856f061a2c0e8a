"""``concord bake`` on photos rendered by Blender (bpy wheel, Cycles on the CPU) of a textured fixture.

The barrel glTF is imported into Blender (which converts its Y-up file coordinates to Z-up), every material is
replaced by an emission shader fed by the file's base-colour texture (view transform 'Standard', so a pixel's
sRGB value is the texture's), and six views are rendered to PNG with one ray through each pixel centre. The
cameras' ``matrix_world`` are converted back into the MESH FILE's coordinates for transforms.json
(``file_from_blender @ matrix_world``), then :func:`concord.geometry.bake_command.run_bake` bakes the PNGs and
the result is compared with the fixture's own texture on covered texels.

Measured here: 31.7 dB PSNR on covered texels (texture 512^2, six 256^2 views at elevation 20 deg, 74% of
the UV islands covered, cross-view disagreement 0.0107); the Blender-free path of
tests/geometry/test_bake_command.py (elevation 15 deg) gives 31.2 dB, so Blender's renders, the camera
conversion and the trimesh renderer agree. Bound: 29 dB. Forgetting the axis conversion gives 16.0 dB
(checked below, bound 20 dB).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from concord.geometry.bake_command import run_bake
from concord.geometry.mesh import load_mesh
from concord.geometry.metrics import psnr
from concord.geometry.rigs import orbit
from concord.geometry.transforms_json import read_transforms_json, write_transforms_json
from concord.geometry.viewset import blender_camera_to_world_from_opencv

from pathlib import Path

pytestmark = pytest.mark.blender

BARREL = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "barrel" / "barrel.glb"
SIZE = 256
TEXTURE = 512


def _emission_from_base_colour(bpy) -> None:
    """Replace every mesh material by Emission(base-colour texture): the render shows the texture unlit."""
    for ob in bpy.context.scene.objects:
        if ob.type != "MESH":
            continue
        for slot in ob.material_slots:
            mat = slot.material
            image = None
            for node in mat.node_tree.nodes:
                if node.type == "BSDF_PRINCIPLED":
                    links = node.inputs["Base Color"].links
                    if links and links[0].from_node.type == "TEX_IMAGE":
                        image = links[0].from_node.image
            assert image is not None, f"material {mat.name} has no base-colour texture"
            nodes, links = mat.node_tree.nodes, mat.node_tree.links
            nodes.clear()
            tex = nodes.new("ShaderNodeTexImage")
            tex.image = image
            tex.interpolation = "Linear"
            tex.extension = "REPEAT"
            emission = nodes.new("ShaderNodeEmission")
            emission.inputs["Strength"].default_value = 1.0
            out = nodes.new("ShaderNodeOutputMaterial")
            links.new(tex.outputs["Color"], emission.inputs["Color"])
            links.new(emission.outputs["Emission"], out.inputs["Surface"])


def _setup_render(bpy, size: int) -> None:
    scene = bpy.context.scene
    r = scene.render
    r.engine = "CYCLES"
    r.resolution_x = r.resolution_y = size
    r.resolution_percentage = 100
    r.film_transparent = True
    r.use_compositing = False
    r.use_sequencer = False
    r.dither_intensity = 0.0  # no noise in the 8-bit PNG
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGB"
    r.image_settings.color_depth = "8"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    c = scene.cycles
    c.device = "CPU"
    c.samples = 1
    c.use_adaptive_sampling = False
    c.use_denoising = False
    c.filter_width = 0.01  # one ray through each pixel centre, like concord.geometry.render
    c.max_bounces = 0


def test_bake_blender_renders(bpy_module, cycles_passes, tmp_path):
    bpy = bpy_module
    from mathutils import Matrix

    mesh = load_mesh(BARREL)
    cycles_passes.new_scene_with_gltf(BARREL)
    _emission_from_base_colour(bpy)
    _setup_render(bpy, SIZE)

    # Cameras chosen in the file's coordinates, placed in Blender's world (blender_from_file: Y-up -> Z-up).
    c, r = mesh.bounding_sphere()
    cams = orbit(6, (20.0,), up=mesh.up, front=mesh.front).cameras(c, r, SIZE, SIZE)
    blender_from_file = np.asarray(mesh.blender_from_file, dtype=np.float64)
    file_from_blender = np.linalg.inv(blender_from_file)
    scene = bpy.context.scene
    cam_data = bpy.data.cameras.new("BakeCamera")
    for key, value in cycles_passes.blender_camera_settings(cams[0][0], SIZE, SIZE).items():
        setattr(cam_data, key, value)
    cam = bpy.data.objects.new("BakeCamera", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam

    images = tmp_path / "images"
    images.mkdir()
    names, w2c_file = [], []
    for i, (K, w2c) in enumerate(cams):
        cam.matrix_world = Matrix((blender_from_file @ blender_camera_to_world_from_opencv(w2c)).tolist())
        bpy.context.view_layer.update()
        scene.render.filepath = str(images / f"view_{i}.png")
        bpy.ops.render.render(write_still=True)
        # What a user exporting from Blender does: matrix_world (Blender world, OpenGL camera axes) back
        # into the mesh file's coordinates.
        c2w_file_gl = file_from_blender @ np.array(cam.matrix_world, dtype=np.float64)
        w2c_file.append(np.linalg.inv(c2w_file_gl @ np.diag([1.0, -1.0, -1.0, 1.0])))
        names.append(f"images/view_{i}.png")
    Ks = np.stack([K for K, _ in cams])
    write_transforms_json(tmp_path / "transforms.json", Ks, np.stack(w2c_file), names, SIZE, SIZE)
    np.testing.assert_allclose(read_transforms_json(tmp_path / "transforms.json").world_to_camera,
                               np.stack([w for _, w in cams]), atol=1e-5)

    res = run_bake(BARREL, tmp_path / "transforms.json", tmp_path / "out", texture_size=TEXTURE)
    tex = np.asarray(Image.open(res["paths"]["texture"]), dtype=np.float32) / 255.0
    cov = res["masks"]["baked"]  # texels view pixels were baked into
    truth = np.asarray(mesh.texture.convert("RGB").resize((TEXTURE, TEXTURE), Image.BOX), np.float32) / 255.0
    value = psnr(tex, truth, cov)
    assert value >= 29.0, f"bake of Blender renders: {value:.2f} dB"
    assert res["metrics"]["cross_view_disagreement"]["mean_abs_difference"] < 0.02

    # The same photos with the axis conversion forgotten (Blender-world matrices written as if they were the
    # file's): the bake must be far worse -- the test can tell a correct conversion from a wrong one.
    wrong = json.loads((tmp_path / "transforms.json").read_text())
    for fr in wrong["frames"]:
        fr["transform_matrix"] = (blender_from_file @ np.array(fr["transform_matrix"])).tolist()
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    try:
        bad = run_bake(BARREL, tmp_path / "wrong.json", tmp_path / "bad", texture_size=TEXTURE)
    except ValueError:
        return  # no camera sees the mesh: also a detected failure
    btex = np.asarray(Image.open(bad["paths"]["texture"]), dtype=np.float32) / 255.0
    bcov = bad["masks"]["baked"]
    assert psnr(btex, truth, bcov) < 20.0
