"""transforms.json reading/writing (concord.geometry.transforms_json): both intrinsics forms, every error case."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from concord.geometry.rigs import look_at
from concord.geometry.transforms_json import (
    TransformsError,
    read_transforms_json,
    write_transforms_json,
)
from concord.geometry.viewset import blender_camera_to_world_from_opencv

W, H = 64, 48


def _c2w_gl(eye=(0.0, 0.0, 3.0)):
    return blender_camera_to_world_from_opencv(look_at(eye, (0.0, 0.0, 0.0), (0.0, 1.0, 0.0)))


def _write(tmp_path, doc, images=("a.png",), size=(W, H)):
    for name in images:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10, 20, 30)).save(p)
    path = tmp_path / "transforms.json"
    path.write_text(json.dumps(doc))
    return path


def _frame(name="a", eye=(0.0, 0.0, 3.0), **extra):
    return {"file_path": name, "transform_matrix": _c2w_gl(eye).tolist(), **extra}


def test_focal_length_form_and_extensionless_path(tmp_path):
    doc = {"fl_x": 50.0, "fl_y": 55.0, "cx": 31.5, "cy": 24.25, "w": W, "h": H, "frames": [_frame("a")]}
    t = read_transforms_json(_write(tmp_path, doc))
    assert len(t) == 1 and t.width == W and t.height == H
    assert t.image_paths[0] == tmp_path / "a.png"  # "a" resolved by trying ".png"
    np.testing.assert_allclose(t.intrinsics[0], [[50, 0, 31.5], [0, 55, 24.25], [0, 0, 1]])
    # OpenGL c2w -> OpenCV w2c: the camera at z=3 looking at the origin sees the origin at camera z = +3.
    w2c = t.world_to_camera[0]
    np.testing.assert_allclose(w2c @ [0, 0, 0, 1], [0, 0, 3, 1], atol=1e-6)
    # A point above the origin (+y world, the up vector) is above the image centre: OpenCV y < 0.
    assert (w2c @ [0, 0.5, 0, 1])[1] < 0
    imgs = t.load_images()
    assert imgs.shape == (1, H, W, 3) and imgs.dtype == np.uint8


def test_camera_angle_form_per_frame_override_and_size_from_image(tmp_path):
    ax = math.radians(60.0)
    doc = {
        "camera_angle_x": ax,
        "frames": [_frame("a.png"), _frame("b.png", eye=(3.0, 0.0, 0.0), camera_angle_x=math.radians(40.0),
                                           camera_angle_y=math.radians(35.0))],
    }
    t = read_transforms_json(_write(tmp_path, doc, images=("a.png", "b.png")))
    k0, k1 = t.intrinsics
    f0 = 0.5 * W / math.tan(0.5 * ax)
    np.testing.assert_allclose(k0, [[f0, 0, W / 2], [0, f0, H / 2], [0, 0, 1]], rtol=1e-6)  # w, h from the PNG
    np.testing.assert_allclose(k1[0, 0], 0.5 * W / math.tan(math.radians(20.0)), rtol=1e-6)
    np.testing.assert_allclose(k1[1, 1], 0.5 * H / math.tan(math.radians(17.5)), rtol=1e-6)


def test_writer_round_trip(tmp_path):
    k = np.array([[[60.0, 0, 32], [0, 60, 24], [0, 0, 1]]] * 2)
    w2c = np.stack([look_at((0, 0, 3), (0, 0, 0), (0, 1, 0)), look_at((2, 1, 2), (0, 0, 0), (0, 1, 0))])
    for name in ("v0.png", "v1.png"):
        Image.new("RGB", (W, H)).save(tmp_path / name)
    path = write_transforms_json(tmp_path / "transforms.json", k, w2c, ["v0.png", "v1.png"], W, H)
    doc = json.loads(path.read_text())
    assert doc["fl_x"] == 60.0 and doc["w"] == W and "fl_x" not in doc["frames"][0]
    t = read_transforms_json(path)
    np.testing.assert_allclose(t.world_to_camera, w2c, atol=1e-6)
    np.testing.assert_allclose(t.intrinsics, k)
    # Per-frame intrinsics when they differ.
    k2 = k.copy()
    k2[1, 0, 0] = 70.0
    path = write_transforms_json(tmp_path / "t2.json", k2, w2c, ["v0.png", "v1.png"], W, H)
    assert "fl_x" in json.loads(path.read_text())["frames"][1]
    np.testing.assert_allclose(read_transforms_json(path).intrinsics, k2)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.pop("frames"), "'frames'"),
        (lambda d: d["frames"][0].pop("file_path"), "missing 'file_path'"),
        (lambda d: d["frames"][0].pop("transform_matrix"), "missing 'transform_matrix'"),
        (lambda d: [d.pop(k) for k in ("fl_x", "fl_y")], "no intrinsics"),
        (lambda d: d["frames"][0].update(transform_matrix=np.zeros((4, 4)).tolist()), "last row"),
        (
            lambda d: d["frames"][0].update(
                transform_matrix=[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
            ),
            "not invertible",
        ),
        (
            lambda d: d["frames"][0].update(
                transform_matrix=[[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]
            ),
            "not a rotation",
        ),
        (lambda d: d["frames"][0].update(transform_matrix=[[1, 0], [0, 1]]), "expected 4x4"),
        (lambda d: d["frames"][0].update(transform_matrix=[[float("nan")] * 4] * 4), "NaN"),
        (lambda d: d["frames"][0].update(file_path="missing"), "image file not found"),
        (lambda d: d.update(k1=0.1), "distortion"),
        (lambda d: d.update(fl_x="big"), "finite number"),
        (lambda d: d.update(camera_model="OPENCV_FISHEYE"), "not supported"),
    ],
)
def test_errors_are_transforms_errors_with_a_message(tmp_path, mutate, expected):
    doc = {"fl_x": 50.0, "fl_y": 50.0, "w": W, "h": H, "frames": [_frame("a.png")]}
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(TransformsError, match=expected) as info:
        read_transforms_json(path)
    assert isinstance(info.value, ValueError)


def test_image_size_mismatch(tmp_path):
    doc = {"fl_x": 50.0, "w": W, "h": H, "frames": [_frame("a.png")]}
    t = read_transforms_json(_write(tmp_path, doc, size=(W + 1, H)))
    with pytest.raises(TransformsError, match="image is 65x48 but transforms.json says 64x48") as info:
        t.load_images()
    assert info.value.hint


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(TransformsError, match="no such file"):
        read_transforms_json(tmp_path / "nope.json")
    p = tmp_path / "transforms.json"
    p.write_text("{not json")
    with pytest.raises(TransformsError, match="not valid JSON"):
        read_transforms_json(p)
    # A folder is accepted for its transforms.json.
    with pytest.raises(TransformsError, match="not valid JSON"):
        read_transforms_json(tmp_path)
