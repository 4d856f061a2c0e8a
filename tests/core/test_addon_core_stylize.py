"""The add-on's plain logic for "Stylize Animation" (blender_addon/core/stylize.py), without Blender.

* Chunk planning: the chunks cover the range once, in order, consecutive, none longer than the chunk size, the first
  at sequence index 0 and each next one right after the previous one's last frame; the resume point is the first
  chunk with a missing frame.
* Blender's Vector and Depth passes become the FrameSet contract's motion and depth with the same formulas as the
  server's `concord.frames.frameset` functions (the add-on may not import them), for both row orders.
* Frame sizes: multiples of 8 in 64..1024 that keep the scene's aspect ratio to within the rounding.
* The output folder: frames of another run or files Concord did not make are never overwritten; an interrupted
  default folder is found again; a chunk's download is moved in under Blender frame numbers, or, when the server's
  result lacks a frame, nothing is moved.
* Image sequences: frame numbers come from the last digits of the names.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from blender_addon.core import stylize as st


@pytest.mark.parametrize("start,end,size", [(1, 1, 8), (1, 4, 3), (0, 63, 8), (10, 29, 7), (5, 100, 64), (3, 9, 1)])
def test_chunks_cover_the_range_in_order(start, end, size):
    chunks = st.plan_chunks(start, end, size)
    frames = [f for c in chunks for f in c.frames]
    assert frames == list(range(start, end + 1))
    assert chunks[0].first_index == 0 and chunks[0].frames[0] == start
    for k, c in enumerate(chunks):
        assert c.index == k and 1 <= len(c) <= size
        assert list(c.frames) == list(range(c.frames[0], c.frames[-1] + 1))
        assert c.frames[0] - start == c.first_index  # sequence index = offset in the range
        if k:
            assert c.first_index == chunks[k - 1].first_index + len(chunks[k - 1])
    assert all(len(c) == size for c in chunks[:-1])  # only the last one may be short


def test_bad_ranges_and_chunk_sizes_are_refused():
    with pytest.raises(st.StylizeError, match="empty"):
        st.plan_chunks(10, 9, 8)
    for size in (0, 65):
        with pytest.raises(st.StylizeError, match="chunk size"):
            st.plan_chunks(1, 10, size)


def test_resume_point_is_the_first_chunk_with_a_missing_frame(tmp_path):
    chunks = st.plan_chunks(1, 10, 4)  # 1-4, 5-8, 9-10
    assert st.resume_point(tmp_path, chunks) == 0
    for f in (1, 2, 3, 4, 5, 6, 9, 10):
        (tmp_path / st.frame_file(f)).write_bytes(b"png")
    assert st.resume_point(tmp_path, chunks) == 1  # 7 and 8 missing: chunk 1 and every later one are sent again
    for f in (7, 8):
        (tmp_path / st.frame_file(f)).write_bytes(b"png")
    assert st.resume_point(tmp_path, chunks) == len(chunks)


def _server_frameset():
    return pytest.importorskip("concord.frames.frameset")


@pytest.mark.parametrize("bottom_up", [True, False])
def test_vector_and_depth_conversion_agree_with_the_servers(bottom_up):
    fs = _server_frameset()
    rng = np.random.default_rng(4)
    vector = rng.normal(0, 5, (3, 6, 8, 4)).astype(np.float32)
    np.testing.assert_array_equal(st.motion_from_blender_vector(vector, bottom_up),
                                  fs.motion_from_blender_vector(vector, bottom_up))
    np.testing.assert_array_equal(st.motion_from_blender_vector(vector[0], bottom_up),
                                  fs.motion_from_blender_vector(vector[0], bottom_up))
    z = rng.uniform(0.5, 20, (2, 6, 8)).astype(np.float32)
    z[0, 0, 0], z[1, 2, 3], z[1, 5, 7] = 1e10, np.inf, np.nan
    np.testing.assert_array_equal(st.depth_from_blender(z, bottom_up), fs.depth_from_blender(z, bottom_up))


def test_vector_conversion_follows_the_contract():
    # A point moved 2 px right and 1 px up since the previous frame: Blender's Vector XY (previous - current, y up)
    # is (-2, -1); the contract's motion (previous - current, y down) is (-2, +1). Rows flip when bottom-up.
    v = np.zeros((4, 5, 4), np.float32)
    v[0, 1] = (-2.0, -1.0, 7.0, 7.0)  # bottom row in Blender's memory
    m = st.motion_from_blender_vector(v, rows_bottom_up=True)
    assert m.shape == (4, 5, 2)
    np.testing.assert_array_equal(m[3, 1], (-2.0, 1.0))  # the bottom row is the last row top-down
    assert np.count_nonzero(m) == 2
    with pytest.raises(st.StylizeError):
        st.motion_from_blender_vector(np.zeros((4, 5, 1)))


@pytest.mark.parametrize("res", [(1920, 1080), (1080, 1920), (64, 64), (1000, 999), (4096, 512), (640, 480), (333, 777)])
@pytest.mark.parametrize("longest", [64, 200, 512, 1024, 2000])
def test_frame_sizes_keep_the_aspect_ratio(res, longest):
    W, H = st.frame_size(*res, 1.0, 1.0, longest)
    assert W % 8 == 0 and H % 8 == 0 and 64 <= min(W, H) and max(W, H) <= 1024
    aspect = res[0] / res[1]
    if max(aspect, 1 / aspect) <= 1024 / 64:
        # rounding moves one side by at most 4 px
        assert abs(W / H - aspect) / aspect <= 4.0 / min(W, H) + 1e-9
    if min(W, H) > 64:  # nothing forced the short side up: the long side is the one asked for
        assert max(W, H) == max(64, min(1024, longest // 8 * 8))


def test_frame_size_counts_the_pixel_aspect():
    assert st.frame_size(100, 100, 2.0, 1.0, 512) == (512, 256)
    with pytest.raises(st.StylizeError, match="resolution"):
        st.frame_size(0, 100, 1.0, 1.0, 512)


def test_params_and_their_checks():
    p = st.stylize_params("  ink  ", steps=None, guidance=None)
    assert p["prompt"] == "ink" and "steps" not in p and "guidance" not in p
    assert st.stylize_params("ink", steps=5, guidance=2.0)["steps"] == 5
    for bad, match in (({"prompt": " "}, "prompt"), ({"keyframes": "middle"}, "keyframes"),
                       ({"noise": "pink"}, "noise"), ({"strength": 0.0}, "strength"), ({"chunk_frames": 0}, "chunk")):
        kw = {"prompt": "ink", **bad}
        with pytest.raises(st.StylizeError, match=match):
            st.stylize_params(kw.pop("prompt"), **kw)
    chunk = st.plan_chunks(5, 30, 8)[2]
    sent = st.chunk_params(p, chunk, "blender-x", 26, resume=True)
    assert (sent["first_frame"], sent["sequence_frames"], sent["resume"]) == (16, 26, True)
    assert sent["chunk_frames"] == p["chunk_frames"]  # the same in every request of the sequence
    with pytest.raises(st.StylizeError, match="sequence name"):
        st.chunk_params(p, chunk, "no spaces allowed", 26, resume=False)


def test_sequence_names_differ_by_run_and_folder(tmp_path):
    base = st.stylize_params("ink")

    def fp_of(params=base, start=1, end=9, size=(64, 64), source="RENDER", model="m", scene="S"):
        return st.fingerprint(params, frame_start=start, frame_end=end, size=size, source=source, model=model,
                              scene=scene)

    fp = fp_of()
    assert fp == fp_of(dict(base))
    others = [fp_of({**base, "prompt": "oil"}), fp_of(end=10), fp_of(size=(64, 72)), fp_of(source="SEQUENCE:/x"),
              fp_of(model="n"), fp_of(scene="T")]
    assert fp not in others and len(set(others)) == len(others)
    a, b = st.sequence_name(fp, tmp_path / "a"), st.sequence_name(fp, tmp_path / "b")
    assert a != b and st.SEQUENCE_NAME.match(a) and st.SEQUENCE_NAME.match(b)


def test_output_folder_never_mixes_runs(tmp_path):
    out = tmp_path / "out"
    assert st.check_output_folder(out, "fp1") is False  # does not exist yet
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert st.check_output_folder(out, "fp1") is False  # other files are fine
    (out / st.frame_file(1)).write_bytes(b"png")
    with pytest.raises(st.OutputFolderError, match="did not make"):
        st.check_output_folder(out, "fp1")
    st.write_manifest(out, {"fingerprint": "fp1"})
    assert st.check_output_folder(out, "fp1") is True
    with pytest.raises(st.OutputFolderError, match="another Concord run"):
        st.check_output_folder(out, "fp2")
    (out / st.frame_file(1)).unlink()
    assert st.check_output_folder(out, "fp2") is False  # a manifest without frames is taken over
    (tmp_path / "file").write_text("x")
    with pytest.raises(st.OutputFolderError, match="is a file"):
        st.check_output_folder(tmp_path / "file", "fp1")


def test_default_output_continues_an_interrupted_run(tmp_path):
    root = tmp_path / "concord"
    first, resumed = st.default_output(root, "My Scene", "fp", "20260101-000000")
    assert not resumed and first.is_dir() and first.name == "My_Scene_stylize_20260101-000000"
    st.write_manifest(first, {"fingerprint": "fp", "complete": False})
    again, resumed = st.default_output(root, "My Scene", "fp", "20260101-000001")
    assert resumed and again == first
    other, resumed = st.default_output(root, "My Scene", "other", "20260101-000001")
    assert not resumed and other != first
    st.write_manifest(first, {"fingerprint": "fp", "complete": True})  # finished: a new run gets a new folder
    new, resumed = st.default_output(root, "My Scene", "fp", "20260101-000002")
    assert not resumed and new not in (first, other)


def _download(tmp_path, chunk, drop=None):
    d = st.download_dir(tmp_path, chunk)
    (d / "frames").mkdir(parents=True)
    for i in range(len(chunk)):
        if i != drop:
            (d / "frames" / st.server_frame_file(chunk.first_index + i)).write_bytes(f"frame {i}".encode())
    (d / "metrics.json").write_text(json.dumps({"kind": "stylize"}))
    return d


def test_collect_moves_frames_under_blender_numbers(tmp_path):
    chunk = st.plan_chunks(11, 20, 4)[1]  # frames 15..18, sequence indices 4..7
    d = _download(tmp_path, chunk)
    moved = st.collect_chunk_frames(d, chunk, tmp_path)
    assert [p.name for p in moved] == ["frame_0015.png", "frame_0016.png", "frame_0017.png", "frame_0018.png"]
    assert (tmp_path / "frame_0016.png").read_bytes() == b"frame 1"
    assert (tmp_path / "metrics" / "frames_15-18.json").is_file()
    assert not d.exists()
    assert st.frame_files_in(tmp_path) == [p.name for p in moved]


def test_collect_moves_nothing_when_a_frame_is_missing(tmp_path):
    chunk = st.plan_chunks(1, 8, 4)[0]
    d = _download(tmp_path, chunk, drop=2)
    with pytest.raises(st.StylizeError, match="frame_0002.png"):
        st.collect_chunk_frames(d, chunk, tmp_path)
    assert st.frame_files_in(tmp_path) == []


def test_discard_leaves_nothing_of_a_run_without_frames(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    st.write_manifest(out, {"fingerprint": "x"})
    _download(out, st.plan_chunks(1, 2, 2)[0])
    st.discard_run_files(out, remove_folder=True)
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    st.write_manifest(kept, {"fingerprint": "x"})
    (kept / st.frame_file(3)).write_bytes(b"png")
    st.discard_run_files(kept, remove_folder=True)
    assert (kept / st.MANIFEST).is_file()  # frames were written: the run can be continued


def test_image_sequence_numbers(tmp_path):
    names = ["render_0001.png", "render_0002.jpg", "shot3_take_0010.exr", "notes.txt", ".hidden_0004.png",
             "cover.png", "render_0003.PNG"]
    assert st.image_sequence_files(names) == {1: "render_0001.png", 2: "render_0002.jpg", 3: "render_0003.PNG",
                                              10: "shot3_take_0010.exr"}
    with pytest.raises(st.StylizeError, match="two images for frame 1"):
        st.image_sequence_files(["a_0001.png", "a_1.jpg"])
    for n in (1, 2, 3):
        (tmp_path / f"r_{n:04d}.png").write_bytes(b"png")
    assert st.sequence_for_range(tmp_path, [2, 3]) == {2: tmp_path / "r_0002.png", 3: tmp_path / "r_0003.png"}
    with pytest.raises(st.StylizeError, match="no image for frame 4.*numbered 1..3"):
        st.sequence_for_range(tmp_path, [3, 4])
    with pytest.raises(st.StylizeError, match="does not exist"):
        st.sequence_for_range(tmp_path / "nope", [1])


def test_pack_frames_checks_the_contract():
    frame = {"image": np.zeros((64, 72, 3), np.uint8), "depth": np.ones((64, 72), np.float32),
             "motion": np.zeros((64, 72, 2), np.float32)}
    arrays = st.pack_frames([frame, frame])
    assert arrays["image"].shape == (2, 64, 72, 3) and arrays["motion"].dtype == np.float32
    with pytest.raises(st.StylizeError, match="width 60"):
        st.pack_frames([{**frame, "image": np.zeros((64, 60, 3), np.uint8)}])
    with pytest.raises(st.StylizeError, match="depth"):
        st.pack_frames([{**frame, "depth": np.full((64, 72), np.inf, np.float32)}])
    with pytest.raises(st.StylizeError, match="no frames"):
        st.pack_frames([])


def test_linear_to_srgb_matches_the_servers():
    io = pytest.importorskip("concord.frames.io")
    x = np.linspace(-0.2, 1.3, 3000, dtype=np.float32).reshape(-1, 1, 3)
    expected = io._to_u8(io.linear_to_srgb(x))
    np.testing.assert_array_equal(st.linear_to_srgb_u8(x), expected)
