"""The Blender-free renderer agrees with Cycles (bpy wheel) on real glTF assets.

A fixture mesh is loaded twice: by concord.geometry.mesh (file coordinates, glTF Y-up) and by Blender's glTF
importer (Z-up: file (x, y, z) -> (x, -z, y), ``mesh.blender_from_file``). The same rig camera is used in both
worlds (world_to_camera_blender = world_to_camera_file @ blender_from_file^-1), Cycles renders Depth/UV/Normal
passes, and the two ViewSet-layout results are compared over the pixels both call foreground.
"""

from pathlib import Path

import numpy as np
import pytest

from concord.geometry.mesh import load_mesh
from concord.geometry.render import render_views
from concord.geometry.rigs import zero123pp

pytestmark = pytest.mark.blender

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meshes"
CASES = [  # (mesh, rig view, width, height): square views plus a landscape and a portrait one (sensor fit)
    ("boxtextured/BoxTextured.glb", 0, 256, 256),
    ("boxtextured/BoxTextured.glb", 3, 256, 256),
    ("boxtextured/BoxTextured.glb", 1, 320, 192),
    ("barrel/barrel.glb", 0, 256, 256),
    ("barrel/barrel.glb", 3, 256, 256),
    ("barrel/barrel.glb", 4, 160, 240),
]


@pytest.mark.parametrize("name, view, W, H", CASES, ids=[f"{n.split('/')[0]}-v{v}-{w}x{h}" for n, v, w, h in CASES])
def test_renderer_matches_cycles(cycles_passes, tmp_path, name, view, W, H):
    mesh = load_mesh(FIXTURES / name)
    c, r = mesh.bounding_sphere()
    rig = zero123pp(up=mesh.up, front=mesh.front)
    K, w2c_file = rig.cameras(c, r, W, H)[view]
    ours = render_views(mesh, [(K, w2c_file)], W, H)
    ours.validate()

    B = mesh.blender_from_file
    w2c_blender = w2c_file @ np.linalg.inv(B)
    cycles_passes.new_scene_with_gltf(FIXTURES / name)
    theirs = cycles_passes.render_cycles_passes(K, w2c_blender, W, H, tmp_path)

    m_ours, m_theirs = ours.mask[0], theirs["mask"]
    iou = (m_ours & m_theirs).sum() / (m_ours | m_theirs).sum()
    both = m_ours & m_theirs
    d_ours, d_theirs = ours.depth[0][both], theirs["depth"][both]
    rel_depth = np.abs(d_ours - d_theirs) / d_theirs
    uv_err = np.abs(ours.uv[0][both] - theirs["uv"][both]).max(axis=-1)
    n_theirs_file = theirs["normal"][both] @ B[:3, :3]  # Blender world -> file frame: B^T n
    cos = np.sum(ours.normal[0][both] * n_theirs_file, axis=-1)
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    print(
        f"\n{name} view {view}: IoU {iou:.5f}, depth rel. err median {np.median(rel_depth):.2e} "
        f"p99 {np.percentile(rel_depth, 99):.2e}, UV err median {np.median(uv_err):.2e} "
        f"p99 {np.percentile(uv_err, 99):.2e}, normal angle median {np.median(angle):.3f} deg "
        f"p99 {np.percentile(angle, 99):.3f} deg, foreground {both.sum()} px"
    )
    assert iou >= 0.99
    assert np.median(rel_depth) <= 1e-3 and np.percentile(rel_depth, 99) <= 1e-4
    assert np.median(uv_err) <= 1e-3 and np.percentile(uv_err, 99) <= 1e-3
    assert np.median(angle) <= 0.1 and np.percentile(angle, 99) <= 1.0


def test_off_centre_principal_point_matches_cycles(cycles_passes, tmp_path):
    # portrait image with the principal point moved: checks the shift_x/shift_y conversion of K
    W, H = 160, 240
    mesh = load_mesh(FIXTURES / "boxtextured/BoxTextured.glb")
    c, r = mesh.bounding_sphere()
    K, w2c = zero123pp(up=mesh.up, front=mesh.front).cameras(c, r, W, H)[2]
    K = K.copy()
    K[0, 2] += 17.0
    K[1, 2] -= 23.0
    ours = render_views(mesh, [(K, w2c)], W, H)
    cycles_passes.new_scene_with_gltf(FIXTURES / "boxtextured/BoxTextured.glb")
    theirs = cycles_passes.render_cycles_passes(K, w2c @ np.linalg.inv(mesh.blender_from_file), W, H, tmp_path)
    iou = (ours.mask[0] & theirs["mask"]).sum() / (ours.mask[0] | theirs["mask"]).sum()
    both = ours.mask[0] & theirs["mask"]
    assert iou >= 0.99
    assert np.median(np.abs(ours.uv[0][both] - theirs["uv"][both])) <= 1e-3
