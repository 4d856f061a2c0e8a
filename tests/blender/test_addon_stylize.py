""""Stylize Animation" end to end, headless: the bpy wheel, Cycles on the CPU, and the real Concord app with the `tiny`
model on a loopback port (tests/harness.py InProcessServer), so a test can hold the model at a chosen step.

The scene: a 16 px cube (emission only) that moves 2 px right and 1 px up per frame in front of an orthographic camera
(0.1 scene units per pixel), frames 1..4. The user's own output settings are deliberately odd (128 px at 50 %, JPEG at
quality 77, a "//user_renders/" path, the current frame 2) so that "restored" is tested against values the capture
had to change. What is asserted (the `tiny` model's pictures are noise; the plumbing is what is tested):

* the capture gives, per frame, the user's own render (Standard view: the emission's sRGB value), and Cycles' depth
  and motion in the FrameSet contract's conventions (planar z of the cube's top face; motion = previous - current,
  y down: (-2, +1) px on the cube, 0 elsewhere), the render and the passes aligned; an image sequence's frames are
  read (and resized) instead of rendered; the user's scene, settings, frame and object positions are as before;
* the operator sends the range as a sequence of `stylize` requests (one per chunk, one sequence name, first_frame
  0, 3, sequence_frames 4), writes one PNG per frame into the output folder under Blender's frame numbers, adds an
  image strip of them to the Video Sequencer at the range's start with one element per frame, leaves the user's
  settings unchanged, and one undo removes the strip;
* a cancel while the server runs the second chunk stops at once (no denoising step after it), keeps the first
  chunk's frames, leaves no half-written file or download folder and no strip; running again sends only the second
  chunk, with resume: true, and leaves the first chunk's frames untouched;
* a server that is down, a scene without a camera, no prompt, a missing image: a clear error and the scene unchanged.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.harness import StepGate

from addon_scene import addon_prefs as _prefs
from addon_scene import addon_server, cancel_on_server
from moving_cube import CAMERA_Z, CUBE, EMISSION, FRAMES, add_moving_cube, cube_rect

pytestmark = pytest.mark.blender

SIZE = 64  # frames of 64 x 64 px
SRGB = np.rint([(1.055 * v ** (1 / 2.4) - 0.055) * 255 for v in EMISSION])


def animated_scene(bpy):
    """The moving cube (tests/blender/moving_cube.py) and the user's own (odd) output settings; returns the cube."""
    scene = bpy.context.scene
    r = scene.render
    r.resolution_x = r.resolution_y = 2 * SIZE
    r.resolution_percentage = 50
    r.filepath = "//user_renders/"
    r.image_settings.file_format = "JPEG"
    r.image_settings.quality = 77
    scene.view_settings.view_transform = "Standard"
    cube = add_moving_cube(bpy, SIZE)
    scene.frame_set(2)
    return cube


def cube_mask(frame: int) -> np.ndarray:
    """The cube's pixels in frame `frame`, row 0 = top."""
    m = np.zeros((SIZE, SIZE), bool)
    m[cube_rect(frame, SIZE, SIZE)] = True
    return m


def user_state(bpy, snapshot) -> dict:
    """The conftest snapshot plus what the stylize capture touches for a moment."""
    scene = bpy.context.scene
    r, f = scene.render, scene.render.image_settings
    editor = scene.sequence_editor
    return {
        **snapshot(),
        "frame": (scene.frame_current, scene.frame_subframe),
        "output": (r.filepath, r.use_file_extension, r.resolution_percentage, r.pixel_aspect_x, r.pixel_aspect_y,
                   r.use_border, r.use_sequencer, r.use_multiview, r.use_motion_blur, r.use_compositing),
        "format": (getattr(f, "media_type", None), f.file_format, f.color_mode, f.color_depth, f.quality),
        "view": (scene.view_settings.view_transform, scene.cycles.samples, scene.cycles.device),
        "positions": {o.name: tuple(round(v, 6) for v in o.matrix_world.translation) for o in scene.objects},
        "strips": sorted(s.name for s in editor.strips) if editor is not None else [],
    }


def _settings(bpy, out: Path | None, **extra):
    s = bpy.context.scene.concord_stylize
    s.model_defaults = False  # small sizes of its own; Model Defaults is the texture panel's switch, tested there
    s.prompt = "ink wash"
    s.steps, s.guidance, s.frame_size, s.chunk_size = 2, 1.0, SIZE, 3
    s.output_dir = str(out) if out is not None else ""
    for k, v in extra.items():
        setattr(s, k, v)
    return s


@pytest.fixture
def sent(addon, bpy_module, monkeypatch) -> list[dict]:
    """The animated scene (the add-on enabled), and the params of every job the add-on submits from then on (the
    real client still sends them)."""
    from blender_addon.core.client import ConcordClient

    sent: list[dict] = []
    original = ConcordClient.submit

    def submit(self, kind, params, arrays=None):
        sent.append({"kind": kind, **params, "frames": int(arrays["image"].shape[0])})
        return original(self, kind, params, arrays)

    monkeypatch.setattr(ConcordClient, "submit", submit)
    animated_scene(bpy_module)
    return sent


def _frames_in(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("frame_"))


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------- capture


def test_capture_gives_the_users_render_and_the_contracts_depth_and_motion(addon, bpy_module, snapshot, tmp_path):
    bpy = bpy_module
    from blender_addon.capture import CaptureError
    from blender_addon.capture.frames import FrameCapture

    animated_scene(bpy)
    before = user_state(bpy, snapshot)
    scene = bpy.context.scene
    with FrameCapture(scene, bpy.context.view_layer.name, SIZE, SIZE) as capture:
        for frame in (1, 3):
            got = capture.capture(frame)
            on = cube_mask(frame)
            assert got["image"].shape == (SIZE, SIZE, 3) and got["image"].dtype == np.uint8
            np.testing.assert_array_equal(got["depth"] > 0, on)
            np.testing.assert_allclose(got["depth"][on], CAMERA_Z - CUBE / 2, rtol=1e-5)
            # previous - current with y down: the cube was 2 px to the left and 1 px lower
            np.testing.assert_allclose(got["motion"][on], np.broadcast_to((-2.0, 1.0), (on.sum(), 2)), atol=0.05)
            np.testing.assert_array_equal(got["motion"][~on], 0.0)
            inner = on & np.roll(on, 1, 0) & np.roll(on, -1, 0) & np.roll(on, 1, 1) & np.roll(on, -1, 1)
            assert np.abs(got["image"][inner].astype(int) - SRGB).max() <= 2  # the user's render, in place
            assert np.abs(got["image"][~on].astype(int) - SRGB).max(axis=-1).min() > 20  # the cube is only there
            assert user_state(bpy, snapshot) == before  # between frames the scene is the user's

    # an existing image sequence (twice the frame size: resized) instead of the render
    seq = {}
    for frame, value in ((1, 40), (2, 200)):
        path = tmp_path / f"seq_{frame:04d}.png"
        Image.fromarray(np.full((2 * SIZE, 2 * SIZE, 3), value, np.uint8)).save(path)
        seq[frame] = (path, value)
    # an EXR holds scene-linear light: 0.5 is sRGB 188 (Blender's Standard view)
    from blender_addon.capture import passes

    oiio = passes._oiio()
    exr = tmp_path / "seq_0003.exr"
    spec = oiio.ImageSpec(2 * SIZE, 2 * SIZE, 3, "float")
    spec.channelnames = ("R", "G", "B")
    writer = oiio.ImageOutput.create(str(exr))
    assert writer.open(str(exr), spec) and writer.write_image(np.full((2 * SIZE, 2 * SIZE, 3), 0.5, np.float32))
    writer.close()
    seq[3] = (exr, 188)
    try:
        with FrameCapture(scene, bpy.context.view_layer.name, SIZE, SIZE, source="SEQUENCE",
                          images={f: p for f, (p, _) in seq.items()}) as capture:
            for frame, (_, value) in seq.items():
                got = capture.capture(frame)
                assert (got["image"] == value).all()
                np.testing.assert_array_equal(got["depth"] > 0, cube_mask(frame))
        wide = tmp_path / "wide.png"
        Image.fromarray(np.zeros((SIZE, 2 * SIZE, 3), np.uint8)).save(wide)
        with FrameCapture(scene, bpy.context.view_layer.name, SIZE, SIZE, source="SEQUENCE", images={1: wide}) as capture:
            with pytest.raises(CaptureError, match="aspect ratio"):
                capture.capture(1)
    finally:
        for path, _ in seq.values():
            path.unlink(missing_ok=True)
    assert user_state(bpy, snapshot) == before


# ---------------------------------------------------------------------------------------------------- the operator


def test_stylizes_the_range_into_numbered_frames_and_the_sequencer(sent, bpy_module, snapshot, tiny_model, tmp_path):
    bpy = bpy_module
    out = tmp_path / "stylized"
    with addon_server(bpy, tiny_model, tmp_path / "data"):
        _settings(bpy, out)
        before = user_state(bpy, snapshot)
        bpy.ops.ed.undo_push(message="before Concord")

        assert bpy.ops.concord.stylize_animation(blocking=True) == {"FINISHED"}

    # the requests: one sequence, chunks of 3 + 1 frames, in order
    assert [(j["kind"], j["first_frame"], j["frames"], j["sequence_frames"], j["resume"]) for j in sent] == [
        ("stylize", 0, 3, 4, False), ("stylize", 3, 1, 4, False)]
    assert len({j["sequence"] for j in sent}) == 1
    # one PNG per frame, named by Blender frame numbers; nothing half-done or hidden left
    assert _frames_in(out) == [f"frame_{f:04d}.png" for f in range(FRAMES[0], FRAMES[1] + 1)]
    for name in _frames_in(out):
        with Image.open(out / name) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert _hidden(out) == []
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["frames_1-3.json", "frames_4-4.json"]
    state = bpy.context.window_manager.concord_stylize_job
    assert Path(state.last_result) == out.resolve() and state.last_report.startswith("Stylized 4 frames")
    assert not state.running
    # the Video Sequencer: one image strip of those frames at the range's start
    strips = list(bpy.context.scene.sequence_editor.strips)
    assert len(strips) == 1
    strip = strips[0]
    assert strip.type == "IMAGE" and strip.frame_final_start == FRAMES[0]
    assert strip.frame_final_duration == FRAMES[1] - FRAMES[0] + 1
    assert [e.filename for e in strip.elements] == _frames_in(out)
    assert Path(bpy.path.abspath(strip.directory)).resolve() == out.resolve()
    # the user's settings, frame and objects are as before; the strip is the only change
    after = user_state(bpy, snapshot)
    assert after["strips"] == [strip.name]
    assert {**after, "strips": []} == before
    # one undo takes the strip away again
    bpy.ops.ed.undo()
    editor = bpy.context.scene.sequence_editor
    assert editor is None or len(editor.strips) == 0


class ArmedGate(StepGate):
    """A StepGate that counts only the calls after ``arm()``: it holds ``module.forward`` (the model's UNet) at the
    first of them until released; ``calls`` counts the calls after arming."""

    def __init__(self, module):
        super().__init__(module, at_call=1)
        self.armed = threading.Event()

    def arm(self) -> None:
        self.armed.set()

    def __enter__(self) -> "ArmedGate":
        original = self._original
        super().__enter__()
        gated = self.module.forward
        self.module.forward = lambda *args, **kwargs: (gated if self.armed.is_set() else original)(*args, **kwargs)
        return self


def test_cancel_in_the_second_chunk_keeps_the_first_and_a_new_run_continues(sent, bpy_module, snapshot, tiny_model,
                                                                              tmp_path, monkeypatch):
    bpy = bpy_module
    from blender_addon.core import stylize as core_stylize
    from blender_addon.ops import stylize as stylize_ops

    out = tmp_path / "stylized"
    with addon_server(bpy, tiny_model, tmp_path / "data") as srv:
        _settings(bpy, out)
        before = user_state(bpy, snapshot)
        with ArmedGate(tiny_model.pipe.unet) as gate:
            collect = core_stylize.collect_chunk_frames

            def collect_then_arm(downloaded, chunk, out_dir):  # the first chunk is in: hold the second one's job
                moved = collect(downloaded, chunk, out_dir)
                if chunk.index == 0:
                    gate.arm()
                return moved

            monkeypatch.setattr(core_stylize, "collect_chunk_frames", collect_then_arm)
            # the user presses Cancel while the server runs the second chunk
            with cancel_on_server(srv.url, gate, stylize_ops.active_run, stylize_ops.request_cancel):
                assert bpy.ops.concord.stylize_animation(blocking=True) == {"CANCELLED"}
            assert gate.calls == 1, "no denoising step starts after the cancel"
        monkeypatch.setattr(core_stylize, "collect_chunk_frames", collect)

        first = {name: (out / name).read_bytes() for name in _frames_in(out)}
        assert sorted(first) == ["frame_0001.png", "frame_0002.png", "frame_0003.png"]
        assert _hidden(out) == []  # no download folder, no temporary file
        assert (out / core_stylize.MANIFEST).is_file()
        report = bpy.context.window_manager.concord_stylize_job.last_report
        assert "cancelled" in report and "3 of 4 frames" in report
        assert user_state(bpy, snapshot) == before  # no strip, settings as they were

        # a new run with the same settings continues: only the second chunk, resumed
        assert bpy.ops.concord.stylize_animation(blocking=True) == {"FINISHED"}
    assert [(j["first_frame"], j["resume"]) for j in sent] == [(0, False), (3, False), (3, True)]
    assert len({j["sequence"] for j in sent}) == 1
    assert _frames_in(out) == [f"frame_{f:04d}.png" for f in range(1, 5)]
    assert {name: (out / name).read_bytes() for name in first} == first
    assert "continued an interrupted run" in bpy.context.window_manager.concord_stylize_job.last_report
    assert len(bpy.context.scene.sequence_editor.strips) == 1

    # once more: every frame is there, nothing is sent, the strip is replaced (not a second one)
    with addon_server(bpy, tiny_model, tmp_path / "data"):
        assert bpy.ops.concord.stylize_animation(blocking=True) == {"FINISHED"}
    assert len(sent) == 3
    assert bpy.context.window_manager.concord_stylize_job.last_report.startswith("All 4 frames")
    assert len(bpy.context.scene.sequence_editor.strips) == 1


def test_image_sequence_source_model_defaults_and_no_sequencer(sent, bpy_module, snapshot, tiny_model, tmp_path):
    bpy = bpy_module
    seq = tmp_path / "renders"
    seq.mkdir()
    for f in (1, 2):
        Image.fromarray(np.full((SIZE, SIZE, 3), 60 * f, np.uint8)).save(seq / f"render_{f:04d}.png")
    out = tmp_path / "stylized"
    with addon_server(bpy, tiny_model, tmp_path / "data"):
        s = _settings(bpy, out, source="SEQUENCE", sequence_dir=str(seq), range_mode="CUSTOM", frame_start=1,
                      frame_end=2, load_in_sequencer=False, model_defaults=True, frame_size=512, steps=9)
        before = user_state(bpy, snapshot)
        assert bpy.ops.concord.stylize_animation(blocking=True) == {"FINISHED"}
    # Model Defaults: the frame size is the model's view size, steps and guidance are left to the server
    rec = tiny_model.settings
    assert (s.frame_size, s.steps, s.model_defaults_from) == (rec.view_size, rec.steps, "tiny")
    assert [(j["first_frame"], j["frames"], j["sequence_frames"]) for j in sent] == [(0, 2, 2)]
    assert "steps" not in sent[0] and "guidance" not in sent[0]
    metrics = json.loads((out / "metrics" / "frames_1-2.json").read_text())
    assert {k: v["source"] for k, v in metrics["settings"].items()} == {"steps": "model", "guidance": "model"}
    assert _frames_in(out) == ["frame_0001.png", "frame_0002.png"]
    assert user_state(bpy, snapshot) == before  # no strip either
    assert sorted(p.name for p in seq.iterdir()) == ["render_0001.png", "render_0002.png"]  # the renders untouched


# ---------------------------------------------------------------------------------------------------- errors


def test_server_down_is_a_clear_error_and_nothing_is_left(addon, bpy_module, snapshot, free_port, tmp_path):
    bpy = bpy_module
    _prefs(bpy).server_url = f"http://127.0.0.1:{free_port}"
    animated_scene(bpy)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))  # the default output: tmp_path/concord
    _settings(bpy, None)
    before = user_state(bpy, snapshot)
    with pytest.raises(RuntimeError, match="connection refused"):
        bpy.ops.concord.stylize_animation(blocking=True)
    assert user_state(bpy, snapshot) == before
    assert not (tmp_path / "concord").exists() or not any((tmp_path / "concord").iterdir())
    state = bpy.context.window_manager.concord_stylize_job
    assert "concord serve" in state.last_report and not state.running


def test_settings_errors_before_any_connection(addon, bpy_module, snapshot, tmp_path):
    bpy = bpy_module
    _prefs(bpy).server_url = "http://127.0.0.1:9"  # never reached: every error comes first
    animated_scene(bpy)
    out = tmp_path / "out"
    _settings(bpy, out, prompt="")
    before = user_state(bpy, snapshot)
    with pytest.raises(RuntimeError, match="write a prompt"):
        bpy.ops.concord.stylize_animation(blocking=True)
    _settings(bpy, out, range_mode="CUSTOM", frame_start=5, frame_end=3)
    with pytest.raises(RuntimeError, match="empty"):
        bpy.ops.concord.stylize_animation(blocking=True)
    _settings(bpy, out, source="SEQUENCE", sequence_dir=str(tmp_path), range_mode="SCENE")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "render_0001.png")
    with pytest.raises(RuntimeError, match="no image for frame 2"):
        bpy.ops.concord.stylize_animation(blocking=True)
    _settings(bpy, tmp_path, source="SEQUENCE", sequence_dir=str(tmp_path), range_mode="CUSTOM", frame_start=1,
              frame_end=1)
    with pytest.raises(RuntimeError, match="image sequence's folder"):
        bpy.ops.concord.stylize_animation(blocking=True)
    with pytest.warns(RuntimeWarning, match="blend relative"):  # Blender warns too, and keeps the value
        _settings(bpy, None, output_dir="//stylized/", source="RENDER")  # the file was never saved
    with pytest.raises(RuntimeError, match="not saved yet"):
        bpy.ops.concord.stylize_animation(blocking=True)
    assert user_state(bpy, snapshot) == before
    bpy.context.scene.camera = None
    before = user_state(bpy, snapshot)
    _settings(bpy, out, source="RENDER")
    with pytest.raises(RuntimeError, match="no camera"):
        bpy.ops.concord.stylize_animation(blocking=True)
    assert user_state(bpy, snapshot) == before
    assert not out.exists()


def test_panel_draws_every_state(addon, bpy_module):
    """The panel's draw() names only properties and operators that exist, idle and while running."""
    bpy = bpy_module
    from blender_addon.ui.stylize import CONCORD_PT_stylize

    drawn: list[str] = []

    class Layout:
        enabled, scale_y, use_property_split, use_property_decorate = True, 1.0, False, False

        def column(self, **_):
            return self

        row = box = column

        def separator(self, **_):
            pass

        def label(self, text="", **_):
            drawn.append(f"label:{text}")

        def prop(self, data, name, **_):
            assert name in data.bl_rna.properties, name
            drawn.append(f"prop:{name}")

        def operator(self, idname, **_):
            mod, op = idname.split(".")
            assert hasattr(getattr(bpy.ops, mod), op), idname
            drawn.append(f"op:{idname}")

        def progress(self, text="", **_):
            drawn.append(f"progress:{text}")

    panel = type("Panel", (), {})()
    panel.layout = Layout()
    s, state = bpy.context.scene.concord_stylize, bpy.context.window_manager.concord_stylize_job
    CONCORD_PT_stylize.draw(panel, bpy.context)
    assert "op:concord.stylize_animation" in drawn and "prop:sequence_dir" not in drawn
    drawn.clear()
    s.source, s.range_mode, s.model_defaults = "SEQUENCE", "CUSTOM", False
    state.running, state.stage, state.step, state.total = True, "stylizing", 2, 8
    try:
        CONCORD_PT_stylize.draw(panel, bpy.context)
    finally:
        state.running = False
    assert {"prop:sequence_dir", "prop:frame_start", "op:concord.cancel_stylize", "progress:Stylizing 2/8"} <= set(drawn)
