"""`concord stylize` on a folder of PNG frames (+ depth .npy): optical-flow motion when there are no vectors, the
outputs (frames, metrics, preview), resume, and one-line errors for what a user gets wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from concord.stylize_command import main
from concord.micro.animation import spinning_frames
from tests.harness import one_torch_thread


_one_thread = one_torch_thread()


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    fs, prompt = spinning_frames(4)
    (root / "rgb").mkdir()
    (root / "depth").mkdir()
    for i in range(4):
        Image.fromarray(fs.image[i]).save(root / "rgb" / f"shot_{i + 1}.png")
        np.save(root / "depth" / f"shot_{i + 1}.npy", fs.depth[i])
    return root, prompt


def test_png_frames_with_depth_stylize_with_optical_flow(png_folder, tmp_path, capsys):
    root, prompt = png_folder
    args = [str(root / "rgb"), "--prompt", prompt, "--out", str(tmp_path / "out"), "--depth", str(root / "depth"),
            "--steps", "3", "--chunk-frames", "2", "--device", "cpu"]
    assert main(args) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"frame_{i:04d}.png" for i in range(4)]
    m = json.loads((out / "metrics.json").read_text())
    assert m["motion_source"] == "optical_flow:dis" and m["settings"]["steps"] == {"value": 3, "source": "user"}
    assert m["settings"]["guidance"]["source"] == "model"
    assert m["warping_error"]["mean"] is not None and len(m["warping_error"]["per_frame"]) == 4
    assert (out / "preview.mp4").stat().st_size > 0
    assert "warping error" in capsys.readouterr().out
    # resume on a finished run: nothing left to denoise
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["denoiser_calls"] == 0


def test_what_a_user_gets_wrong_is_one_line(png_folder, tmp_path, capsys):
    root, prompt = png_folder
    assert main([str(root / "rgb"), "--prompt", prompt, "--out", str(tmp_path / "a"), "--steps", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("concord stylize: error:") and "--depth" in err and "Traceback" not in err
    assert main([str(root / "rgb"), "--prompt", prompt, "--out", str(tmp_path / "b"), "--no-flow", "--depth",
                 str(root / "depth")]) == 1
    err = capsys.readouterr().err
    assert "motion" in err and "Traceback" not in err
    assert main([str(tmp_path / "nothing-here"), "--prompt", prompt, "--out", str(tmp_path / "c")]) == 1
    assert "concord stylize: error:" in capsys.readouterr().err
