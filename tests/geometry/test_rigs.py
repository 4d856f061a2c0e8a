"""Camera rigs (concord.geometry.rigs): cameras look at the centre, the bounding sphere fits the frame,
Zero123++ angles are exact, frames (Blender Z-up vs glTF Y-up) agree, rig names parse with clear errors."""

import math

import numpy as np
import pytest

from concord.geometry.rigs import (
    BLENDER_FRAME,
    GLTF_FRAME,
    RigError,
    explicit,
    orbit,
    parse_rig,
    zero123pp,
)

CENTER = np.array([0.3, -1.2, 2.0])
RADIUS = 1.7


def _angles(T, center, up, front):
    """Azimuth/elevation (degrees) of the camera centre around `center` in the (up, front) frame."""
    up, front = np.asarray(up, float), np.asarray(front, float)
    right = np.cross(up, front)
    R, t = T[:3, :3], T[:3, 3]
    eye = -R.T @ t
    d = eye - center
    d /= np.linalg.norm(d)
    el = math.degrees(math.asin(d @ up))
    az = math.degrees(math.atan2(d @ right, d @ front)) % 360.0
    return az, el


@pytest.mark.parametrize("frame", [BLENDER_FRAME, GLTF_FRAME], ids=["blender", "gltf"])
def test_zero123pp_angles_exact(frame):
    up, front = frame
    cams = zero123pp(up=up, front=front).cameras(CENTER, RADIUS, 320, 320)
    assert len(cams) == 6
    got = [_angles(T, CENTER, up, front) for _, T in cams]
    np.testing.assert_allclose([a for a, _ in got], [30, 90, 150, 210, 270, 330], atol=1e-9)
    np.testing.assert_allclose([e for _, e in got], [20, -10, 20, -10, 20, -10], atol=1e-9)
    for K, _ in cams:  # 30 degree vertical field of view, centred principal point
        fov = 2 * math.degrees(math.atan((320 / 2) / K[1, 1]))
        assert fov == pytest.approx(30.0, abs=1e-9)
        assert K[0, 0] == K[1, 1] and K[0, 2] == 160 and K[1, 2] == 160


def test_azimuth_origin_is_blender_front():
    # azimuth 0 would be the Front view (camera on -Y); azimuth 90 the Right view (camera on +X)
    rig = orbit(4, elevations_deg=[0])
    eyes = [-T[:3, :3].T @ T[:3, 3] for _, T in rig.cameras(np.zeros(3), 1.0, 64, 64)]
    dirs = [e / np.linalg.norm(e) for e in eyes]
    np.testing.assert_allclose(dirs, [[0, -1, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0]], atol=1e-12)


@pytest.mark.parametrize("rig", [zero123pp(), orbit(8, [0, 30, -45]), zero123pp(*GLTF_FRAME)],
                         ids=["zero123pp", "orbit", "zero123pp_gltf"])
@pytest.mark.parametrize("size", [(256, 256), (640, 360), (300, 500)])
def test_cameras_look_at_centre_and_sphere_fits(rig, size):
    W, H = size
    for K, T in rig.cameras(CENTER, RADIUS, W, H):
        R = T[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
        # the centre projects to the principal point, in front of the camera
        pc = R @ CENTER + T[:3, 3]
        assert pc[2] > 0
        uvw = K @ pc
        np.testing.assert_allclose(uvw[:2] / uvw[2], [W / 2, H / 2], atol=1e-9)
        # no roll: the camera's y axis (down) points against world up
        up = np.asarray(rig.up)
        assert R[1] @ up < 0 and abs(R[0] @ up) < 1e-12
        # the sphere's silhouette (points at the tangent cone) stays inside the frame with the margin
        d = np.linalg.norm(pc)
        half = math.asin(RADIUS / d)
        fx = K[0, 0]
        assert fx * math.tan(half) <= min(W, H) / 2 / 1.0
        # sample sphere points: all project inside the image
        rng = np.random.default_rng(1)
        s = rng.normal(size=(2000, 3))
        pts = CENTER + RADIUS * s / np.linalg.norm(s, axis=1, keepdims=True)
        cam = pts @ R.T + T[:3, 3]
        pix = cam @ K.T
        pix = pix[:, :2] / pix[:, 2:]
        assert (cam[:, 2] > 0).all()
        assert pix[:, 0].min() > 0 and pix[:, 0].max() < W and pix[:, 1].min() > 0 and pix[:, 1].max() < H
        # and the sphere is not tiny: it fills the narrower side up to the margin (1.1)
        extent = max(np.ptp(pix[:, 0]) / W, np.ptp(pix[:, 1]) / H)
        assert extent > 0.85


def test_frames_agree_through_blender_import():
    # Blender's glTF importer maps file (x, y, z) -> (x, -z, y): a rig in the glTF frame, mapped the same way,
    # equals the rig in Blender's frame.
    B = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    c_file = np.array([0.1, 0.2, 0.3])
    gl = zero123pp(*GLTF_FRAME).cameras(c_file, 2.0, 128, 128)
    bl = zero123pp(*BLENDER_FRAME).cameras(B[:3, :3] @ c_file, 2.0, 128, 128)
    for (_, Tg), (_, Tb) in zip(gl, bl):
        # world_to_camera_blender = world_to_camera_file @ B^-1
        np.testing.assert_allclose(Tg @ np.linalg.inv(B), Tb, atol=1e-12)


def test_orbit_layout():
    rig = orbit(8, [0, 30])
    assert rig.num_views == 16
    assert rig.azimuths_deg[:8] == tuple(45.0 * i for i in range(8))
    assert rig.elevations_deg == (0.0,) * 8 + (30.0,) * 8
    assert orbit(5).elevations_deg == (15.0,) * 5


def test_explicit_rig_returns_given_cameras():
    K = np.array([[100.0, 0, 32], [0, 100, 32], [0, 0, 1]])
    T = np.eye(4)
    T[2, 3] = 4
    rig = explicit([(K, T)])
    (K2, T2), = rig.cameras(CENTER, RADIUS, 64, 64)
    np.testing.assert_array_equal(K2, K)
    np.testing.assert_array_equal(T2, T)


@pytest.mark.parametrize(
    "spec, views, elevations",
    [("zero123pp", 6, None), ("orbit:8", 8, (15.0,)), ("orbit:8@0,30", 16, (0.0, 30.0)),
     (" Orbit:3@-10 ", 3, (-10.0,))],
)
def test_parse_rig(spec, views, elevations):
    rig = parse_rig(spec)
    assert rig.num_views == views
    if elevations is not None:
        assert sorted(set(rig.elevations_deg)) == sorted(elevations)


FORMS = "accepted: 'zero123pp', 'orbit:N', 'orbit:N@ELEV[,ELEV...]'"


# Each message says what went wrong (match), quotes the culprit and, where the name itself is wrong, lists the
# accepted forms (says).
@pytest.mark.parametrize(
    "spec, match, says",
    [("", "empty", (FORMS,)),
     ("zero123", "unknown rig", ("'zero123'", FORMS)),
     ("orbit", "unknown rig", ("'orbit'", FORMS)),
     ("orbit:", "whole number", ("'orbit:'", FORMS)),
     ("orbit:x", "whole number", ("'orbit:x'", FORMS)),
     ("orbit:0", "between 1 and 360", ("'orbit:0'",)),
     ("orbit:4@a,b", "elevations must be numbers", ("'orbit:4@a,b'",)),
     ("orbit:4@90", "strictly between -90 and 90", ("elevation 90",)),
     ("orbit:2.5", "whole number", ("'orbit:2.5'", FORMS))],
)
def test_parse_rig_errors(spec, match, says):
    with pytest.raises(RigError, match=match) as info:
        parse_rig(spec)
    for text in says:
        assert text in str(info.value), (text, str(info.value))


def test_bad_frame_and_sphere():
    with pytest.raises(RigError, match="perpendicular"):
        zero123pp(up=(0, 0, 1), front=(0, 1, 1))
    with pytest.raises(RigError, match="radius"):
        zero123pp().cameras(CENTER, 0.0, 64, 64)
