"""The texture job's coverage (metrics.json, coverage.png): the share of UV-island texels the views see, measured
from the mesh's triangles the client sends (`triangles`, `triangle_uv`); unknown (null) without them.

Model: `tiny` (random weights, CPU). Views: BoxTextured with xatlas UVs through the Zero123++ rig at 64 px.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blender_addon.core.client import encode_arrays
from concord.api.arrays import ArrayError, validate_arrays
from concord.api.schemas import TextureParams
from concord.geometry.metrics import ISLAND_UNSEEN_GREY, coverage_fraction, surface_arrays, surface_coverage
from concord.geometry.viewset import ViewSet
from concord.jobs.context import JobContext, JobInputError
from concord.pipelines import texture as T

BOX = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "boxtextured" / "BoxTextured.glb"
PARAMS = dict(prompt="a wooden crate", steps=2, seed=1, texture_size=128, guidance=5.0)


@pytest.fixture(scope="module")
def arrays():
    from concord.geometry.mesh import load_mesh
    from concord.geometry.render import render_views
    from concord.geometry.rigs import parse_rig

    mesh = load_mesh(BOX, unwrap="always")
    c, r = mesh.bounding_sphere()
    cams = parse_rig("zero123pp").with_frame(mesh.up, mesh.front).cameras(c, r, 64, 64)
    views = render_views(mesh, [(k.K, k.world_to_camera) for k in cams], 64, 64).validate()
    return validate_arrays({**views.to_npz_dict(), **surface_arrays(mesh)}, T.ARRAYS)


def run_job(model, arrays, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(out, lambda *a: None, threading.Event())
    return T.run(model, TextureParams.model_validate(PARAMS), arrays, ctx)


def test_without_triangles_coverage_is_unknown(tiny_model, arrays, tmp_path):
    bare = {k: a for k, a in arrays.items() if k not in T.SURFACE_ARRAYS}
    m = run_job(tiny_model, bare, tmp_path)
    assert m["coverage"] is None and m["uv_island_fraction"] is None  # said as null, not guessed
    # coverage.png is then the bake's splat mask, and texture_fill_fraction its share of the whole image.
    png = np.asarray(Image.open(tmp_path / "coverage.png"))
    assert set(np.unique(png)) <= {0, 255}
    assert coverage_fraction(png == 255) == m["texture_fill_fraction"] > 0.0


def test_triangles_come_in_pairs_with_matching_shapes(arrays):
    p = TextureParams.model_validate(PARAMS)
    for missing in T.SURFACE_ARRAYS:
        half = {k: a for k, a in arrays.items() if k != missing}
        with pytest.raises(JobInputError, match="came without") as err:
            T.check_inputs(p, half)
        assert err.value.field == f"arrays.{missing}"
    bad = dict(arrays, triangle_uv=arrays["triangle_uv"][:-1])
    with pytest.raises(ArrayError, match="F="):
        validate_arrays(bad, T.ARRAYS)
    nan = dict(arrays, triangles=np.full_like(arrays["triangles"], np.nan))
    with pytest.raises(ArrayError, match="NaN"):
        validate_arrays(nan, T.ARRAYS)


def test_coverage_through_the_app(tiny_model, arrays, tmp_path):
    """The add-on's path: the triangles travel in the .npz; metrics.json and coverage.png in the result say
    the share of UV-island texels the views see, exactly what surface_coverage computes from the same arrays."""
    from fastapi.testclient import TestClient

    from concord.api.app import ServerSettings, create_app

    app = create_app(ServerSettings(data_dir=tmp_path / "data"), model=tiny_model)
    with TestClient(app) as client:
        files = {
            "request": (None, json.dumps({"kind": "texture", "params": PARAMS}), "application/json"),
            "arrays": ("arrays.npz", encode_arrays(arrays), "application/octet-stream"),
        }
        r = client.post("/v1/jobs", files=files)
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        deadline = time.monotonic() + 600.0  # only guards against a hang: the job's final state is awaited
        while True:
            st = client.get(f"/v1/jobs/{jid}").json()
            if st["state"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert st["state"] == "done", st
        zf = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{jid}/result").content))
        m = json.loads(zf.read("metrics.json"))
        png = np.asarray(Image.open(io.BytesIO(zf.read("coverage.png"))))
    vs = ViewSet.from_arrays({k: a for k, a in arrays.items() if k not in T.SURFACE_ARRAYS})
    want = surface_coverage(vs, arrays["triangles"], arrays["triangle_uv"], PARAMS["texture_size"])
    assert m["coverage"] == want.coverage and m["uv_island_fraction"] == want.island_fraction
    assert m["timings_s"]["coverage_s"] >= 0.0
    # The rig (elevations +20 / -10) sees five faces of the box squarely; the -10 degree cameras sit only a
    # little below the bottom face and see it ~2 degrees from edge-on, which does not count (metrics.py).
    assert 0.8 < m["coverage"] < 0.9
    assert np.array_equal(png == 255, want.seen) and np.array_equal(png > 0, want.islands)
    assert set(np.unique(png)) <= {0, ISLAND_UNSEEN_GREY, 255}
    # The whole-image share of texels view pixels were baked into keeps its own name, and is smaller.
    assert 0.0 < m["texture_fill_fraction"] < m["coverage"]
