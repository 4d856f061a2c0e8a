"""Benchmark of back-projection (concord.geometry.bake): table on stdout, JSON at bench/results/bake.json.

1. Bake of six 512x512 views (barrel fixture, Zero123++ rig) into a 2048x2048 texture. Target: <= 100 ms on
   2 cores for the bake. Reported separately: the one-time work per set of views (pixel weights, texel index,
   sparse matrix, padding map) and each bake step (scatter = the weighted mean T(u), padding, pull-push
   fill). Median of ``--runs`` runs.
2. The latent-space UV sync of the texture job: six 64x64 views (SD's latent size for 512^2 images),
   4 channels, into textures of 64..512: ``scatter_mean`` and ``gather`` per call (done every diffusion
   step) and the one-time index build.

Usage: ``python bench/bake.py [--runs 7]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))

from concord.geometry import bake as B  # noqa: E402
from concord.geometry.mesh import load_mesh  # noqa: E402
from concord.geometry.render import render_views  # noqa: E402
from concord.geometry.rigs import zero123pp  # noqa: E402

MESH = ROOT / "tests" / "fixtures" / "meshes" / "barrel" / "barrel.glb"


def timed(fn, runs: int) -> tuple[float, object]:
    """Median seconds over ``runs`` calls (after one warm-up call) and the last result."""
    out = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bake.json"))
    args = ap.parse_args(argv)

    mesh = load_mesh(MESH)
    c, r = mesh.bounding_sphere()
    rig = zero123pp(mesh.up, mesh.front)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "runs": args.runs,
        "mesh": {"file": MESH.name, "faces": mesh.num_faces},
    }

    # --- 1. six 512^2 views into 2048^2
    vs = render_views(mesh, rig.cameras(c, r, 512, 512), 512, 512, texture=True)
    images = np.round(vs.image * 255).astype(np.uint8)
    once = {}
    once["pixel_weights_s"], w = timed(lambda: B.pixel_weights(vs), max(1, args.runs // 2))
    once["texel_index_s"], idx = timed(lambda: B.build_texel_index(vs, 2048, weights=w), max(1, args.runs // 2))

    def first_use():
        i = B.build_texel_index(vs, 2048, weights=w)
        t0 = time.perf_counter()
        i.scatter_matrix()
        t1 = time.perf_counter()
        i.padding_map(B.DEFAULT_PADDING)
        t2 = time.perf_counter()
        i.fill_map(B.DEFAULT_PADDING)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    mats = [first_use() for _ in range(max(1, args.runs // 2))]
    once["scatter_matrix_s"] = statistics.median(m[0] for m in mats)
    once["padding_map_s"] = statistics.median(m[1] for m in mats)
    once["fill_map_s"] = statistics.median(m[2] for m in mats)
    idx.scatter_matrix()
    idx.padding_map(B.DEFAULT_PADDING)
    idx.fill_map(B.DEFAULT_PADDING)
    steps: dict[str, list[float]] = {"scatter_s": [], "padding_s": [], "fill_s": []}
    totals = []
    for _ in range(args.runs + 1):
        t0 = time.perf_counter()
        res = B.bake_views(vs, images, 2048, index=idx)
        totals.append(time.perf_counter() - t0)
        for k in steps:
            steps[k].append(res.timings[k])
    totals, steps = totals[1:], {k: v[1:] for k, v in steps.items()}
    bake = {k: statistics.median(v) for k, v in steps.items()}
    bake["total_s"] = statistics.median(totals)
    results["bake_6x512_into_2048"] = {
        "foreground_pixels": idx.n_pixels,
        "coverage": float(idx.coverage.mean()),
        "one_time": once,
        "per_bake": bake,
        "target_s": 0.100,
    }

    # --- 2. latent sync: six 64^2 views, 4 channels
    lat = render_views(mesh, rig.cameras(c, r, 64, 64), 64, 64)
    x = np.random.default_rng(0).normal(size=lat.mask.shape + (4,)).astype(np.float32)
    sync = []
    for size in (64, 128, 256, 512):
        t_index, li = timed(lambda: B.build_texel_index(lat, size, splat="bilinear"), args.runs)
        li.scatter_matrix()
        li.gather_matrix()
        t_scatter, tex = timed(lambda: B.scatter_mean(li, x), args.runs * 3)
        t_gather, _ = timed(lambda: B.gather(li, tex), args.runs * 3)
        sync.append(
            {"texture": size, "index_s": t_index, "scatter_mean_s": t_scatter, "gather_s": t_gather,
             "coverage": float(li.coverage.mean())}
        )
    results["latent_sync_6x64"] = sync

    # --- table
    b = results["bake_6x512_into_2048"]
    print(f"bake: six 512x512 views ({b['foreground_pixels']} foreground px) -> 2048x2048, "
          f"median of {args.runs} runs, {os.cpu_count()} cpus")
    print(f"  {'one-time (per set of views)':34s}")
    for k, v in b["one_time"].items():
        print(f"    {k:32s} {1e3 * v:8.1f} ms")
    print(f"  {'per bake':34s}")
    for k, v in b["per_bake"].items():
        print(f"    {k:32s} {1e3 * v:8.1f} ms")
    ok = b["per_bake"]["scatter_s"] + b["per_bake"]["padding_s"]
    print(f"    {'scatter + padding (target 100)':32s} {1e3 * ok:8.1f} ms")
    print("latent sync: six 64x64 views, 4 channels")
    print(f"  {'texture':>8s} {'index ms':>10s} {'scatter_mean ms':>16s} {'gather ms':>10s} {'coverage':>9s}")
    for row in sync:
        print(f"  {row['texture']:8d} {1e3 * row['index_s']:10.2f} {1e3 * row['scatter_mean_s']:16.3f} "
              f"{1e3 * row['gather_s']:10.3f} {row['coverage']:9.3f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
