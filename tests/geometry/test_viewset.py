"""The ViewSet array contract (concord.geometry.viewset): validation names the offending field, npz round trip,
pose conversions at the Blender edge."""

import io

import numpy as np
import pytest

from concord.geometry.mesh import icosphere_with_uv
from concord.geometry.render import render_views
from concord.geometry.rigs import orbit
from concord.geometry.viewset import (
    ViewSet,
    ViewSetError,
    blender_camera_to_world_from_opencv,
    opencv_from_blender_camera_to_world,
)


@pytest.fixture(scope="module")
def good() -> ViewSet:
    mesh = icosphere_with_uv(3)
    c, r = mesh.bounding_sphere()
    vs = render_views(mesh, orbit(3).cameras(c, r, 40, 32), 40, 32)
    vs.image = np.full(vs.mask.shape + (3,), 128, np.uint8)
    return vs.validate()


def _copy(vs: ViewSet) -> ViewSet:
    return ViewSet(**{k: (None if v is None else v.copy()) for k, v in vs.__dict__.items()})


def test_good_viewset_properties(good):
    assert (good.num_views, good.height, good.width) == (3, 32, 40)
    c2w = good.camera_to_world
    assert c2w.dtype == np.float32
    np.testing.assert_allclose(c2w @ good.world_to_camera, np.broadcast_to(np.eye(4), (3, 4, 4)), atol=1e-5)


def _set(name, fn):
    def mutate(vs):
        setattr(vs, name, fn(getattr(vs, name)))
    return mutate


def _fg_first(vs):
    return tuple(np.argwhere(vs.mask)[0])


def _bg_first(vs):
    return tuple(np.argwhere(~vs.mask)[0])


def _depth_neg(vs):
    vs.depth[_fg_first(vs)] = -1.0


def _depth_zero_fg(vs):
    vs.depth[_fg_first(vs)] = 0.0


def _depth_bg(vs):
    vs.depth[_bg_first(vs)] = 1e10  # Blender's background value, not mapped at the edge


def _mask_disagrees(vs):
    vs.mask[_bg_first(vs)] = True  # mask says foreground where depth is 0


def _empty_view(vs):
    vs.mask[1] = False
    vs.depth[1] = 0
    vs.uv[1] = 0
    vs.normal[1] = 0


def _nan_uv(vs):
    vs.uv[_fg_first(vs) + (0,)] = np.nan


def _inf_depth(vs):
    vs.depth[_fg_first(vs)] = np.inf


def _uv_on_bg(vs):
    vs.uv[_bg_first(vs)] = 0.5


def _short_normal(vs):
    vs.normal[_fg_first(vs)] *= 0.5


def _scaled_pose(vs):
    vs.world_to_camera[0, :3, :3] *= 2.0


def _mirrored_pose(vs):
    vs.world_to_camera[0, 0, :3] *= -1.0


def _bad_bottom_row(vs):
    vs.world_to_camera[2, 3, 0] = 0.1


def _bad_focal(vs):
    vs.intrinsics[0, 0, 0] = -5.0


def _bad_k_row(vs):
    vs.intrinsics[1, 2, 0] = 1.0


def _float_image_range(vs):
    vs.image = np.full(vs.image.shape, 2.0, np.float32)


MALFORMED = [
    ("depth_2d", _set("depth", lambda a: a[0]), "depth"),
    ("depth_float64", _set("depth", lambda a: a.astype(np.float64)), "depth"),
    ("mask_uint8", _set("mask", lambda a: a.astype(np.uint8)), "mask"),
    ("mask_wrong_size", _set("mask", lambda a: a[:, :-1]), "mask"),
    ("uv_three_channels", _set("uv", lambda a: np.concatenate([a, a[..., :1]], -1)), "uv"),
    ("normal_wrong_views", _set("normal", lambda a: a[:2]), "normal"),
    ("intrinsics_shape", _set("intrinsics", lambda a: a[:, :2]), "intrinsics"),
    ("pose_3x4", _set("world_to_camera", lambda a: a[:, :3]), "world_to_camera"),
    ("image_rgba", _set("image", lambda a: np.concatenate([a, a[..., :1]], -1)), "image"),
    ("image_int16", _set("image", lambda a: a.astype(np.int16)), "image"),
    ("depth_negative_on_fg", _depth_neg, "depth"),
    ("depth_zero_on_fg", _depth_zero_fg, "depth"),
    ("depth_on_background", _depth_bg, "depth"),
    ("mask_depth_disagree", _mask_disagrees, "depth"),
    ("view_sees_nothing", _empty_view, "mask"),
    ("nan_uv", _nan_uv, "uv"),
    ("inf_depth", _inf_depth, "depth"),
    ("uv_on_background", _uv_on_bg, "uv"),
    ("non_unit_normal", _short_normal, "normal"),
    ("scaled_pose", _scaled_pose, "world_to_camera"),
    ("mirrored_pose", _mirrored_pose, "world_to_camera"),
    ("pose_bottom_row", _bad_bottom_row, "world_to_camera"),
    ("negative_focal", _bad_focal, "intrinsics"),
    ("k_not_pinhole", _bad_k_row, "intrinsics"),
    ("float_image_out_of_range", _float_image_range, "image"),
]


@pytest.mark.parametrize("mutate, field", [(m, f) for _, m, f in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_viewset_names_field(good, mutate, field):
    vs = _copy(good)
    mutate(vs)
    with pytest.raises(ViewSetError) as info:
        vs.validate()
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_view_sees_nothing_message_names_view(good):
    vs = _copy(good)
    _empty_view(vs)
    with pytest.raises(ViewSetError, match="view 1 sees nothing"):
        vs.validate()


def test_npz_round_trip(good):
    buf = io.BytesIO()
    np.savez(buf, **good.to_npz_dict())
    buf.seek(0)
    with np.load(buf) as z:
        assert set(z.files) == {"depth", "mask", "uv", "normal", "intrinsics", "world_to_camera", "image"}
        back = ViewSet.from_arrays(dict(z))
    for k, v in good.to_npz_dict().items():
        np.testing.assert_array_equal(getattr(back, k), v)
        assert getattr(back, k).dtype == v.dtype


def test_from_arrays_normalises_dtypes(good):
    arrays = good.to_npz_dict()
    arrays["mask"] = arrays["mask"].astype(np.uint8)
    for k in ("depth", "uv", "normal", "intrinsics", "world_to_camera"):
        arrays[k] = arrays[k].astype(np.float64)
    arrays.pop("image")
    vs = ViewSet.from_arrays(arrays)
    assert vs.mask.dtype == np.bool_ and vs.depth.dtype == np.float32 and vs.image is None


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda a: a.pop("uv"), "uv"),
        (lambda a: a.__setitem__("colour", a["depth"]), "colour"),
        (lambda a: a.__setitem__("mask", a["mask"].astype(np.uint8) * 255), "mask"),
        (lambda a: a.__setitem__("mask", a["mask"].astype(np.float32)), "mask"),
    ],
    ids=["missing_key", "unknown_key", "mask_0_255", "mask_float"],
)
def test_from_arrays_rejects(good, edit, field):
    arrays = dict(good.to_npz_dict())
    edit(arrays)
    with pytest.raises(ViewSetError) as info:
        ViewSet.from_arrays(arrays)
    assert info.value.field == field


def test_subset(good):
    sub = good.subset([2, 0])
    assert sub.num_views == 2
    np.testing.assert_array_equal(sub.depth[0], good.depth[2])
    np.testing.assert_array_equal(sub.world_to_camera[1], good.world_to_camera[0])
    np.testing.assert_array_equal(sub.image[1], good.image[0])
    sub.validate()
    # a copy, not a view: writing into every array of the subset leaves the original as it was
    before = _copy(good)
    for v in sub.__dict__.values():
        if isinstance(v, np.ndarray):
            v[...] = ~v if v.dtype == np.bool_ else v + 7
    for k, v in good.__dict__.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, before.__dict__[k], err_msg=k)
    with pytest.raises(IndexError):
        good.subset([3])


def test_blender_pose_conversion():
    # a Blender camera at (0, -5, 0) looking along +Y (rotation X by 90 deg): its local -Z is world +Y,
    # local +Y (image up) is world +Z.
    c2w_gl = np.array([[1, 0, 0, 0], [0, 0, -1, -5], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    w2c = opencv_from_blender_camera_to_world(c2w_gl)
    # OpenCV: a point in front of the camera on the world +Y axis has z > 0, a point above has y < 0 (up)
    p = w2c @ np.array([0, 0, 0, 1.0])
    assert np.allclose(p[:3], [0, 0, 5])
    p = w2c @ np.array([0, 0, 1, 1.0])
    assert p[1] < 0
    p = w2c @ np.array([1, 0, 0, 1.0])
    assert p[0] > 0
    np.testing.assert_allclose(blender_camera_to_world_from_opencv(w2c), c2w_gl, atol=1e-12)
    # batched
    rng = np.random.default_rng(0)
    from scipy.spatial.transform import Rotation

    T = np.tile(np.eye(4), (5, 1, 1))
    T[:, :3, :3] = Rotation.random(5, random_state=rng).as_matrix()
    T[:, :3, 3] = rng.normal(size=(5, 3))
    np.testing.assert_allclose(opencv_from_blender_camera_to_world(blender_camera_to_world_from_opencv(T)), T,
                               atol=1e-12)
