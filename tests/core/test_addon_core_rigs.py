"""The add-on's rigs (blender_addon/core/rigs.py, no server import) give the server's cameras.

Same bounding sphere, same image size -> the same K and world_to_camera as concord.geometry.rigs (Blender
frame), to 1e-9. Also: scene cameras read back as the K / pose they were placed with, and camera math
round-trips (OpenCV <-> Blender matrix_world, K <-> lens/shift for every sensor fit).
"""

from __future__ import annotations

import numpy as np
import pytest

from blender_addon.core import camera, rigs
from concord.geometry import rigs as server_rigs

SPHERES = [((0.0, 0.0, 0.0), 1.0), ((0.3, -2.0, 5.0), 0.25), ((-10.0, 4.0, 1.0), 37.5)]
SIZES = [(512, 512), (320, 192), (160, 240)]


@pytest.mark.parametrize("center, radius", SPHERES)
@pytest.mark.parametrize("W, H", SIZES)
def test_zero123pp_matches_server(center, radius, W, H):
    ours = rigs.zero123pp(center, radius, W, H)
    theirs = server_rigs.zero123pp().cameras(center, radius, W, H)
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.K, b.K, atol=1e-9)
        np.testing.assert_allclose(a.world_to_camera, b.world_to_camera, atol=1e-9)


@pytest.mark.parametrize("n, elevation", [(1, 0.0), (4, 15.0), (8, -30.0), (16, 60.0)])
def test_orbit_matches_server(n, elevation):
    c, r = (1.0, 2.0, -0.5), 2.0
    ours = rigs.orbit(n, c, r, 256, 256, elevation_deg=elevation)
    theirs = server_rigs.orbit(n, (elevation,)).cameras(c, r, 256, 256)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.K, b.K, atol=1e-9)
        np.testing.assert_allclose(a.world_to_camera, b.world_to_camera, atol=1e-9)


def test_zero123pp_convention_front_and_right():
    cams = rigs.zero123pp((0, 0, 0), 1.0, 64, 64)
    centres = [camera.rigid_inverse(c.world_to_camera)[:3, 3] for c in cams]
    # view 1: azimuth 90 = Blender's Right view (camera on +X), elevation -10 (below)
    assert centres[1][0] > 0 and abs(centres[1][1]) < 1e-9 and centres[1][2] < 0
    # view 0: azimuth 30 from the front (-Y) towards +X, elevation +20
    assert centres[0][1] < 0 and centres[0][0] > 0 and centres[0][2] > 0


def test_bounding_sphere_like_server_mesh():
    from concord.geometry.mesh import icosphere_with_uv

    mesh = icosphere_with_uv(2, radius=1.5, center=(1, 2, 3))
    c, r = rigs.bounding_sphere(mesh.vertices)
    c2, r2 = mesh.bounding_sphere()
    np.testing.assert_allclose(c, c2)
    assert r == pytest.approx(r2)


@pytest.mark.parametrize("fit", ["AUTO", "HORIZONTAL", "VERTICAL"])
@pytest.mark.parametrize("W, H", [(400, 300), (300, 400), (256, 256)])
def test_scene_camera_intrinsics_round_trip(fit, W, H):
    # a camera placed from K (the add-on's own conversion) reads back as the same K
    K = rigs.intrinsics_from_fov(40.0, W, H)
    K[0, 2] += 11.0
    K[1, 2] -= 7.0
    s = camera.blender_camera_settings(K, W, H)
    K2 = camera.intrinsics_from_blender_camera(s["lens"], s["sensor_width"], 24.0, "HORIZONTAL", s["shift_x"], s["shift_y"], W, H)
    np.testing.assert_allclose(K2, K, atol=1e-9)
    # and Blender's own fit rules: the same lens under each fit
    K3 = camera.intrinsics_from_blender_camera(50.0, 36.0, 24.0, fit, 0.1, -0.05, W, H)
    horizontal = fit == "HORIZONTAL" or (fit == "AUTO" and W >= H)
    size = W if horizontal else H
    sensor = 24.0 if fit == "VERTICAL" else 36.0
    assert K3[0, 0] == pytest.approx(50.0 * size / sensor)
    assert K3[0, 2] == pytest.approx(W / 2 - 0.1 * size) and K3[1, 2] == pytest.approx(H / 2 - 0.05 * size)


def test_scene_cameras_pose_round_trip_and_scale_ignored():
    cams = rigs.zero123pp((0, 0, 0), 1.0, 128, 96)
    specs = []
    for i, c in enumerate(cams):
        M = camera.blender_matrix_world_from_opencv(c.world_to_camera)
        M[:3, :3] *= 2.5  # a scaled camera object still looks the same way
        s = camera.blender_camera_settings(c.K, 128, 96)
        specs.append(rigs.SceneCamera(f"cam{i}", M, "PERSP", s["lens"], s["sensor_width"], 24.0, "HORIZONTAL", s["shift_x"], s["shift_y"]))
    back = rigs.scene_cameras(specs, 128, 96)
    for a, b in zip(cams, back):
        np.testing.assert_allclose(b.world_to_camera, a.world_to_camera, atol=1e-9)
        np.testing.assert_allclose(b.K, a.K, atol=1e-9)


def test_rig_errors():
    with pytest.raises(rigs.RigError, match="no cameras"):
        rigs.scene_cameras([], 64, 64)
    with pytest.raises(rigs.RigError, match="perspective"):
        rigs.scene_cameras([rigs.SceneCamera("o", np.eye(4), "ORTHO", 50, 36, 24, "AUTO")], 64, 64)
    with pytest.raises(rigs.RigError, match="no size"):
        rigs.zero123pp((0, 0, 0), 0.0, 64, 64)
    with pytest.raises(rigs.RigError, match="1 to 360"):
        rigs.orbit(0, (0, 0, 0), 1.0, 64, 64)
