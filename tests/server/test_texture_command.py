"""`concord texture`: in-process and against a real server process; bad input is one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from concord.cli import main as cli_main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BOX = FIXTURES / "meshes" / "boxtextured" / "BoxTextured.glb"
TINY_ARGS = ["--views-size", "64", "--texture-size", "128", "--steps", "2", "--model", "tiny", "--device", "cpu"]


def check_outputs(out: Path) -> None:
    import trimesh

    for name in ("textured.glb", "texture.png", "grid.png", "transforms.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "views").iterdir()) == [f"view_{k:02d}.png" for k in range(6)]
    assert not [p for p in out.iterdir() if p.name.startswith("concord-texture-")]  # temp folder gone
    scene = trimesh.load(out / "textured.glb", force="scene")
    (geom,) = scene.geometry.values()
    assert len(geom.faces) == 12
    tex = geom.visual.material.baseColorTexture
    assert tex is not None and tex.size == (128, 128)
    m = json.loads((out / "metrics.json").read_text())
    # coverage: the share of UV-island texels the views see (the command sends the mesh's triangles); the
    # whole-texture share of baked texels is texture_fill_fraction, smaller (empty space between islands).
    assert m["views"] == 6 and m["coverage"] > 0.8 and m["texture_fill_fraction"] < m["coverage"]
    # the rig round-trips for `concord bake`: cameras + the view images it names
    from concord.geometry.transforms_json import read_transforms_json

    tj = read_transforms_json(out / "transforms.json")
    assert len(tj) == 6 and tj.load_images().shape[:3] == (6, 64, 64)


def test_texture_in_process_writes_a_textured_glb(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["texture", str(BOX), "--prompt", "a wooden crate", "--unwrap", "--out", str(out), *TINY_ARGS])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    check_outputs(out)
    assert "textured.glb" in captured.out and str(out) in captured.out
    m = json.loads((out / "metrics.json").read_text())
    assert f"coverage {100 * m['coverage']:.1f}% of the UV islands" in captured.out


def test_texture_against_a_server_process(tmp_path, capsys):
    from concord.serve_process import ServerProcess

    out = tmp_path / "out"
    with ServerProcess(tmp_path / "data") as server:
        rc = cli_main(
            ["texture", str(BOX), "--prompt", "a crate", "--unwrap", "--server", server.url, "--out", str(out),
             "--grid", "--no-uv-noise", *TINY_ARGS]
        )
    captured = capsys.readouterr()
    assert rc == 0, captured.err + server.output()
    check_outputs(out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["grid"] == [3, 2] and m["params"]["consistency"]["uv_noise"] is False


@pytest.mark.parametrize(
    "args,needle",
    [
        ([str(FIXTURES / "meshes" / "nope.glb")], "file not found"),
        ([str(FIXTURES / "README.md")], "unsupported file type"),
        ([str(BOX), "--rig", "spiral"], "unknown rig"),
        ([str(BOX), "--views-size", "100"], "--view-size"),
        ([str(BOX), "--server", "http://127.0.0.1:9"], "error"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, args, needle):
    cmd = [sys.executable, "-m", "concord.cli", "texture", *args, "--prompt", "x", "--out", str(tmp_path / "o")]
    if "--views-size" not in args:
        cmd += ["--views-size", "64", "--steps", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("concord texture: error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr
