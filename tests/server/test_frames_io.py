"""concord.frames.io without Blender: PNG/JPEG folders in natural order, DIS optical flow with its forward-backward
check on a synthetic sequence of known motion, depth folders, malformed folders, the preview video and atomic PNGs.
(EXR folders rendered by the bpy wheel: tests/blender/test_frames_exr.py.)"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from concord.frames.frameset import FrameSetError
from concord.frames.io import (
    MIN_FLOW_SIZE,
    MOTION_DIS,
    FrameFolder,
    PreviewWriter,
    linear_to_srgb,
    natural_key,
    write_png_atomic,
)

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def save_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb, "RGB").save(path, format="PNG")


def texture(h: int, w: int, seed: int) -> np.ndarray:
    """Colour noise at three scales (fine detail for sub-pixel flow, coarse for DIS's coarse-to-fine search)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float32)
    for sigma in (1.0, 2.5, 6.0):
        out += cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), sigma) * sigma
    out = (out - out.min()) / (out.max() - out.min())
    return np.rint(out * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ order and images


@given(st.lists(st.integers(0, 100_000), min_size=2, max_size=30, unique=True))
def test_natural_key_orders_frame_numbers_by_value(numbers):
    names = [f"frame_{n}.png" for n in numbers]
    assert sorted(names, key=natural_key) == [f"frame_{n}.png" for n in sorted(numbers)]


@SETTINGS
@given(
    numbers=st.lists(st.integers(0, 5000), min_size=1, max_size=6, unique=True),
    size=st.tuples(st.integers(MIN_FLOW_SIZE, 24), st.integers(MIN_FLOW_SIZE, 24)),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_png_folder_round_trip_in_natural_order(numbers, size, seed, data):
    h, w = size
    rng = np.random.default_rng(seed)
    frames = {n: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for n in numbers}
    with tempfile.TemporaryDirectory() as d:
        for n in data.draw(st.permutations(numbers)):  # the order of writing must not matter
            save_png(Path(d) / f"frame_{n}.png", frames[n])
        folder = FrameFolder(d)
        order = sorted(numbers)
        assert [p.name for p in folder.paths] == [f"frame_{n}.png" for n in order]
        assert (len(folder), folder.height, folder.width, folder.motion_source) == (len(order), h, w, MOTION_DIS)
        fs, valid = folder.read(0, len(folder))
        assert fs.image.dtype == np.uint8 and fs.depth is None
        np.testing.assert_array_equal(fs.image, np.stack([frames[n] for n in order]))
        assert valid.shape == (len(order), h, w) and fs.motion.shape == (len(order), h, w, 2)


def test_frame_2_comes_before_frame_10_and_hidden_files_are_skipped(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    for i, name in enumerate(["frame_10.png", "frame_2.png", "frame_1.png", ".frame_3.png.abc.tmp", ".x.png"]):
        save_png(tmp_path / name, img + i)
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub").mkdir()
    save_png(tmp_path / "sub" / "frame_0.png", img)
    folder = FrameFolder(tmp_path)
    assert [p.name for p in folder.paths] == ["frame_1.png", "frame_2.png", "frame_10.png"]
    fs, _ = folder.read(0, 3)
    assert [int(f[0, 0, 0]) for f in fs.image] == [2, 1, 0]


def test_grey_rgba_16bit_and_jpeg_frames_become_rgb_uint8(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (20, 18), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "f_1.png"), cv2.cvtColor(np.dstack([rgb, rgb[..., :1]]), cv2.COLOR_RGBA2BGRA))
    cv2.imwrite(str(tmp_path / "f_2.png"), grey16)
    Image.fromarray(rgb[..., 0], "L").save(tmp_path / "f_3.png")
    smooth = texture(20, 18, 4)
    Image.fromarray(smooth, "RGB").save(tmp_path / "f_4.jpg", quality=95)
    fs, _ = FrameFolder(tmp_path).read(0, 4)
    np.testing.assert_array_equal(fs.image[0], rgb)  # alpha dropped
    np.testing.assert_array_equal(fs.image[1], np.repeat(np.rint(grey16 / 257.0).astype(np.uint8)[..., None], 3, -1))
    np.testing.assert_array_equal(fs.image[2], np.repeat(rgb[..., :1], 3, -1))
    assert np.abs(fs.image[3].astype(int) - smooth).mean() < 8  # JPEG: lossy, but the same picture


@given(st.floats(0.0, 1.0, allow_nan=False))
def test_linear_to_srgb_inverts_the_srgb_decoding(v):
    # the sRGB decoding function (IEC 61966-2-1), written out independently of the module
    linear = v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4
    assert float(linear_to_srgb(np.float32(linear))) == pytest.approx(v, abs=2e-6)


def test_linear_to_srgb_clips_scene_light():
    out = linear_to_srgb(np.array([-1.0, 0.0, 1.0, 7.5, np.nan], np.float32))
    np.testing.assert_array_equal(out, [0.0, 0.0, 1.0, 1.0, 0.0])


# ------------------------------------------------------------------------------------------------ optical flow

H, W, S = 120, 160, 48  # frame size and the moving square's side
X0, Y0 = 50, 34  # the square's top-left corner in frame 0
PATCH = 8  # DIS's patch size: flow is smoothed about this far across a motion boundary
BACKGROUND, SQUARE = texture(H, W, 10), texture(S, S, 20)


def square_frames(dx: int, dy: int, n: int) -> list[np.ndarray]:
    """Frame k: the textured square at (X0 + k dx, Y0 + k dy) over the static textured background."""
    out = []
    for k in range(n):
        f = BACKGROUND.copy()
        f[Y0 + k * dy:Y0 + k * dy + S, X0 + k * dx:X0 + k * dx + S] = SQUARE
        out.append(f)
    return out


def square_mask(x: int, y: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y:y + S, x:x + S] = True
    return m


shifts = st.tuples(st.integers(-6, 6), st.integers(-6, 6)).filter(lambda s: max(abs(s[0]), abs(s[1])) >= 3)


@settings(SETTINGS, max_examples=25)
@given(shift=shifts)
def test_dis_flow_recovers_a_translated_square_and_flags_the_disoccluded_strip(shift):
    dx, dy = shift
    with tempfile.TemporaryDirectory() as d:
        for k, f in enumerate(square_frames(dx, dy, 3)):
            save_png(Path(d) / f"shot_{k + 1}.png", f)
        folder = FrameFolder(d)
        fs, valid = folder.read(0, 3)
        assert folder.motion_source == "optical_flow:dis" and fs.motion.dtype == np.float32
        # frame 0 has no predecessor: zero motion, nothing valid
        assert not fs.motion[0].any() and not valid[0].any()
        for k in (1, 2):
            x, y = X0 + k * dx, Y0 + k * dy
            interior = (slice(y + PATCH, y + S - PATCH), slice(x + PATCH, x + S - PATCH))
            # the contract's motion: where the pixel was in frame k - 1 minus where it is now = -(dx, dy)
            np.testing.assert_allclose(fs.motion[k][interior], np.broadcast_to([-dx, -dy], (S - 2 * PATCH,) * 2 + (2,)),
                                       atol=0.5)
            assert valid[k][interior].all()
            now, before = square_mask(x, y), square_mask(x - dx, y - dy)
            disoccluded = before & ~now  # background in frame k that the square covered in frame k - 1
            # DIS smooths flow across the square's edge, so in the 1 px band next to it both flows can agree on the
            # same wrong value; beyond that band the check rejects (nearly) all of the strip. Worst over all shifts
            # with these textures: 97 % beyond the band, 84 % of the whole strip.
            beyond_band = disoccluded & ~cv2.dilate(now.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            assert (~valid[k][beyond_band]).mean() >= 0.95
            assert (~valid[k][disoccluded]).mean() >= 0.8
            far = ~cv2.dilate((now | before).astype(np.uint8), np.ones((2 * PATCH + 1,) * 2, np.uint8)).astype(bool)
            assert valid[k][far].mean() >= 0.95  # the static background keeps its correspondences
            np.testing.assert_allclose(fs.motion[k][far], 0.0, atol=0.5)


def test_a_chunk_reads_like_the_whole_sequence(tmp_path):
    for k, f in enumerate(square_frames(4, -3, 4)):
        save_png(tmp_path / f"f{k:03d}.png", f)
    folder = FrameFolder(tmp_path)
    whole, valid_whole = folder.read(0, 4)
    chunk, valid_chunk = folder.read(2, 4)  # needs frame 1 for frame 2's flow
    np.testing.assert_array_equal(chunk.image, whole.image[2:])
    np.testing.assert_array_equal(chunk.motion, whole.motion[2:])
    np.testing.assert_array_equal(valid_chunk, valid_whole[2:])
    with pytest.raises(IndexError):
        folder.read(3, 5)
    with pytest.raises(IndexError):
        folder.read(2, 2)


# ------------------------------------------------------------------------------------------------ depth folders


def test_depth_folder_of_npy_maps_matched_in_natural_order(tmp_path):
    frames, depths = tmp_path / "frames", tmp_path / "depth"
    frames.mkdir()
    depths.mkdir()
    rng = np.random.default_rng(5)
    z = {}
    for n in (1, 2, 10):
        save_png(frames / f"frame_{n}.png", rng.integers(0, 256, (16, 20, 3), dtype=np.uint8))
        z[n] = rng.uniform(1.0, 50.0, (16, 20)).astype(np.float32)
        z[n][0, :4] = [0.0, np.inf, 1e10, np.nan]  # the background, written four ways
        np.save(depths / f"depth_{n:04d}.npy", z[n])
    folder = FrameFolder(frames, depth_dir=depths)
    assert folder.has_depth
    fs, _ = folder.read(0, 3)
    for k, n in enumerate((1, 2, 10)):
        np.testing.assert_array_equal(fs.depth[k][0, :4], 0.0)
        np.testing.assert_array_equal(fs.depth[k][1:], z[n][1:])


# ------------------------------------------------------------------------------------------------ malformed input


def _frames(folder: Path, sizes=((16, 16),) * 3, names=None) -> Path:
    folder.mkdir(exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        save_png(folder / (names[i] if names else f"frame_{i + 1}.png"), np.full((h, w, 3), 40 * i, np.uint8))
    return folder


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _depth(folder: Path, arrays) -> Path:
    folder.mkdir()
    for i, a in enumerate(arrays):
        np.save(folder / f"d_{i + 1}.npy", a)
    return folder


MALFORMED = {
    "not a folder": (lambda t: _write(t / "x.png", b"") or {"path": t / "x.png"}, "image", "not a folder"),
    "empty folder": (lambda t: {"path": t}, "image", "no frames"),
    "no frame files": (lambda t: _write(t / "a.txt", b"x") or {"path": t}, "image", "no frames"),
    "mixed sizes": (lambda t: {"path": _frames(t / "f", [(16, 16), (16, 16), (18, 16)])}, "image",
                    "frame_3.png is 16x18"),
    "not an image": (lambda t: _write(_frames(t / "f") / "frame_4.png", b"\x89PNG junk") or {"path": t / "f"},
                     "image", "frame_4.png"),
    "exr and png mixed": (lambda t: _write(_frames(t / "f") / "frame_9.exr", b"x") or {"path": t / "f"},
                          "image", "both OpenEXR"),
    "too many frames": (lambda t: {"path": _frames(t / "f"), "max_frames": 2}, "image", "more than the limit of 2"),
    "too small for flow": (lambda t: {"path": _frames(t / "f", [(8, 40)] * 2)}, "image", "too small"),
    "png without flow": (lambda t: {"path": _frames(t / "f"), "allow_flow": False}, "motion", "no motion vectors"),
    "depth folder missing": (lambda t: {"path": _frames(t / "f"), "depth_dir": t / "nope"}, "depth", "not a folder"),
    "depth count": (lambda t: {"path": _frames(t / "f"), "depth_dir": _depth(t / "d", [np.ones((16, 16))] * 2)},
                    "depth", "2 depth maps for 3 frames"),
    "depth size": (lambda t: {"path": _frames(t / "f"), "depth_dir": _depth(t / "d", [np.ones((16, 17))] * 3)},
                   "depth", "d_1.npy is 17x16"),
    "depth dtype": (lambda t: {"path": _frames(t / "f"), "depth_dir": _depth(t / "d", [np.ones((16, 16), int)] * 3)},
                    "depth", "not a float"),
    "png depth": (lambda t: {"path": _frames(t / "f"), "depth_dir": _frames(t / "d")}, "depth", "PNG/JPEG depth"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_folders_name_the_field(tmp_path, case):
    build, field, words = MALFORMED[case]
    kwargs = build(tmp_path)
    with pytest.raises(FrameSetError) as err:
        FrameFolder(**kwargs)
    assert err.value.field == field
    assert words in str(err.value)
    assert err.value.hint  # says what to do


def test_negative_depth_and_truncated_frames_fail_when_read(tmp_path):
    frames = _frames(tmp_path / "f")
    depth = _depth(tmp_path / "d", [np.ones((16, 16), np.float32), -np.ones((16, 16), np.float32), np.ones((16, 16))])
    folder = FrameFolder(frames, depth_dir=depth)
    folder.read(0, 1)
    with pytest.raises(FrameSetError) as err:
        folder.read(0, 2)
    assert err.value.field == "depth" and "d_2.npy" in str(err.value)

    data = (frames / "frame_3.png").read_bytes()
    (frames / "frame_3.png").write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    folder = FrameFolder(frames)
    with pytest.raises(FrameSetError) as err:
        folder.read(2, 3)
    assert err.value.field == "image" and "frame_3.png" in str(err.value)


# ------------------------------------------------------------------------------------------------ writing


def _read_video(path: Path) -> list[np.ndarray]:
    import imageio.v2 as imageio

    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        return [np.asarray(f) for f in reader]


@pytest.mark.parametrize("h, w, n", [(32, 48, 5), (33, 20, 3)])
def test_preview_writer_writes_a_side_by_side_video(tmp_path, h, w, n):
    yy, xx = np.mgrid[0:h, 0:w]
    inputs = [np.dstack([(xx * 5 + 20 * k) % 256, yy * 6, np.full_like(xx, 90)]).astype(np.uint8) for k in range(n)]
    styled = [255 - f for f in inputs]
    out = tmp_path / "preview.mp4"
    with PreviewWriter(out, fps=12) as writer:
        for a, b in zip(inputs, styled):
            writer.add(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.mp4"]  # no partial file left
    frames = _read_video(out)
    assert len(frames) == n
    assert frames[0].shape == (h + h % 2, 2 * w, 3)  # even height for H.264 / yuv420p
    for f, a, b in zip(frames, inputs, styled):
        expected = np.concatenate([a, b], axis=1)
        assert np.abs(f[:h].astype(int) - expected).mean() < 10  # lossy, but input | stylized in place


def test_preview_writer_leaves_nothing_when_the_job_fails(tmp_path):
    frame = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(RuntimeError), PreviewWriter(tmp_path / "preview.mp4") as writer:
        writer.add(frame, frame)
        raise RuntimeError("the job failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError), PreviewWriter(tmp_path / "p.mp4") as writer:
        writer.add(frame, np.zeros((16, 18, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@settings(SETTINGS, max_examples=20)
@given(size=st.tuples(st.integers(1, 40), st.integers(1, 40)), seed=st.integers(0, 2**31), overwrite=st.booleans())
def test_write_png_atomic_round_trip_leaves_no_temporary_file(size, seed, overwrite):
    rgb = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "frame_0001.png"
        if overwrite:
            target.write_bytes(b"an older, different file")
        write_png_atomic(target, rgb)
        assert [p.name for p in Path(d).iterdir()] == ["frame_0001.png"]
        np.testing.assert_array_equal(np.asarray(Image.open(target)), rgb)


def test_write_png_atomic_failure_leaves_no_temporary_file(tmp_path):
    (tmp_path / "frame.png").mkdir()  # the rename onto a folder fails after the data was written
    with pytest.raises(OSError):
        write_png_atomic(tmp_path / "frame.png", np.zeros((4, 4, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["frame.png"]
    with pytest.raises(ValueError):
        write_png_atomic(tmp_path / "x.png", np.zeros((4, 4), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["frame.png"]
