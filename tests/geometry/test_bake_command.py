"""``concord bake`` end to end (concord.geometry.bake_command) on the barrel fixture, with renders of its own
texture (render_views + sample_texture) standing in for photos."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from concord.geometry.bake_command import add_arguments, main_from_args, run_bake
from concord.geometry.mesh import load_mesh
from concord.geometry.metrics import psnr
from concord.geometry.render import render_views
from concord.geometry.rigs import orbit
from concord.geometry.transforms_json import write_transforms_json

BARREL = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "barrel" / "barrel.glb"
SIZE = 256


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six renders of the barrel's own texture and their transforms.json (mesh file coordinates)."""
    root = tmp_path_factory.mktemp("photos")
    mesh = load_mesh(BARREL)
    c, r = mesh.bounding_sphere()
    cams = orbit(6, (15.0,), up=mesh.up, front=mesh.front).cameras(c, r, SIZE, SIZE)
    vs = render_views(mesh, cams, SIZE, SIZE, texture=True)
    names = []
    for i, img in enumerate(vs.image):
        names.append(f"images/view_{i:02d}")  # no extension: nerfstudio allows it
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(root / f"{names[-1]}.png")
    write_transforms_json(root / "transforms.json", vs.intrinsics, vs.world_to_camera, names, SIZE, SIZE)
    return root, mesh


def test_run_bake_end_to_end(photos, tmp_path):
    root, mesh = photos
    res = run_bake(BARREL, root / "transforms.json", tmp_path / "out", texture_size=512)
    paths = {k: Path(v) for k, v in res["paths"].items()}
    assert all(p.is_file() for p in paths.values())
    tex = np.asarray(Image.open(paths["texture"]), dtype=np.float32) / 255.0
    cov = res["masks"]["baked"]
    assert tex.shape == (512, 512, 3) and cov.shape == (512, 512)
    # Compare with the fixture's own 2048^2 texture, box-filtered to 512^2, on the texels view pixels were baked into.
    truth = np.asarray(mesh.texture.convert("RGB").resize((512, 512), Image.BOX), dtype=np.float32) / 255.0
    value = psnr(tex, truth, cov)
    # Measured 31.2 dB (six 256^2 renders point-sample the 2048^2 texture, aliasing its detail, which the
    # bake cannot restore; the box-filtered truth keeps it; uint8 photos).
    assert value >= 29.0, value
    m = json.loads(paths["metrics"].read_text())
    assert m["view_count"] == 6 and m["texture_size"] == 512
    assert 0.5 < m["coverage"] <= 1.0
    assert m["coverage"] == pytest.approx(res["metrics"]["coverage"])
    # coverage is what coverage.png shows: seen texels over UV-island texels (white + grey).
    png = np.asarray(Image.open(paths["coverage"]))
    assert m["coverage"] == pytest.approx((png == 255).sum() / (png > 0).sum())
    assert m["uv_island_fraction"] == pytest.approx((png > 0).mean())
    assert 0.0 < m["texture_fill_fraction"] < m["uv_island_fraction"] + 0.05
    # Renders of one texture agree across views up to resampling (of a detailed 2048^2 texture): measured 0.0105.
    assert m["cross_view_disagreement"]["mean_abs_difference"] < 0.02
    assert {"render_views_s", "scatter_s", "fill_s"} <= set(m["timings_s"])
    # The GLB holds the mesh with its UVs and the new texture.
    import trimesh

    scene = trimesh.load(paths["mesh"], force="scene")
    (g,) = scene.geometry.values()
    assert len(g.faces) == mesh.num_faces
    assert np.allclose(np.sort(g.visual.uv, axis=0), np.sort(mesh.uv, axis=0), atol=1e-6)
    glb_tex = np.asarray(g.visual.material.baseColorTexture.convert("RGB"))
    assert np.array_equal(glb_tex, np.asarray(Image.open(paths["texture"]).convert("RGB")))


def _args(*argv):
    return add_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


def test_cli_errors_are_one_line(photos, tmp_path, capsys):
    root, _ = photos
    assert main_from_args(_args(tmp_path / "nope.glb", "--transforms", root / "transforms.json", "--out", tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("concord bake: error:") and "file not found" in err and "Traceback" not in err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fl_x": 100, "w": SIZE, "h": SIZE, "frames": [{"file_path": "x.png"}]}))
    assert main_from_args(_args(BARREL, "--transforms", bad, "--out", tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("concord bake: error:") and "transform_matrix" in err

    # Cameras that miss the mesh (matrices far away, looking away).
    away = json.loads((root / "transforms.json").read_text())
    for fr in away["frames"]:
        fr["file_path"] = str(root / fr["file_path"])
        fr["transform_matrix"] = [[1, 0, 0, 100], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    (tmp_path / "away.json").write_text(json.dumps(away))
    assert main_from_args(_args(BARREL, "--transforms", tmp_path / "away.json", "--out", tmp_path)) == 1
    assert "sees the mesh" in capsys.readouterr().err

    assert main_from_args(_args(BARREL, "--transforms", root / "transforms.json", "--out", tmp_path,
                                "--texture-size", 0)) == 1
    assert "--texture-size" in capsys.readouterr().err


def test_cli_success_prints_summary(photos, tmp_path, capsys):
    root, _ = photos
    code = main_from_args(_args(BARREL, "--transforms", root / "transforms.json", "--out", tmp_path / "o",
                                "--texture-size", 128, "--padding", 2))
    out = capsys.readouterr().out
    assert code == 0 and "baked 6 views into 128x128" in out and "texture.png" in out
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["settings"]["padding"] == 2


def test_unwrap_and_the_glb_reproduces_the_photos(tmp_path):
    """--unwrap replaces the mesh's UVs (xatlas); re-rendering the written GLB (its UVs + the baked texture)
    from the photos' cameras reproduces the photos, which checks the GLB's UVs, texture and orientation.

    BoxTextured maps every face onto the whole texture (u in 0..6, wrapping) and every face shows the same
    image, so its own UVs give each face 6x the texels of an unwrapped atlas: measured 41.9 dB with the file's
    UVs, 33.7 dB with --unwrap (128^2 photos -> 256^2 texture -> 128^2 renders, sharp lettering)."""
    box = BARREL.parents[1] / "boxtextured" / "BoxTextured.glb"
    mesh = load_mesh(box)
    c, r = mesh.bounding_sphere()
    cams = orbit(4, (30.0, -30.0), up=mesh.up, front=mesh.front).cameras(c, r, 128, 128)
    vs = render_views(mesh, cams, 128, 128, texture=True)
    names = []
    for i, img in enumerate(vs.image):
        names.append(f"v{i}.png")
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(tmp_path / names[-1])
    write_transforms_json(tmp_path / "transforms.json", vs.intrinsics, vs.world_to_camera, names, 128, 128)
    res = run_bake(box, tmp_path / "transforms.json", tmp_path / "out", texture_size=256, unwrap=True)
    m = res["metrics"]
    assert m["settings"]["unwrap"] and any("xatlas" in w for w in m["warnings"])
    assert m["coverage"] > 0.97  # eight views see all six faces
    baked = load_mesh(res["paths"]["mesh"])
    again = render_views(baked, cams, 128, 128, texture=True)
    fg = vs.mask & again.mask
    assert fg.sum() > 0.95 * vs.mask.sum()
    assert psnr(again.image[fg], vs.image[fg]) > 30.0  # measured 33.7 dB
    own = run_bake(box, tmp_path / "transforms.json", tmp_path / "own", texture_size=256)
    rerender = render_views(load_mesh(own["paths"]["mesh"]), cams, 128, 128, texture=True)
    assert psnr(rerender.image[fg], vs.image[fg]) > 38.0  # measured 41.9 dB
