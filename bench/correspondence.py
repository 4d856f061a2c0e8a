"""Benchmark: Blender-free correspondence maps (concord.geometry.render.render_views).

Target (docs/performance): six 512x512 views of a ~20k-face mesh in <= 0.5 s in total on 2 CPU cores.
Meshes: an icosphere with equirectangular UVs (subdivisions 5: 20480 faces) and the barrel fixture (1148 faces);
cameras: the Zero123++ rig framed on each mesh's bounding sphere. Each case runs once to warm up, then
``--repeats`` times; the table reports the median and best wall time and the rays per second.

    python bench/correspondence.py [--repeats 5] [--size 512] [--out bench/results/correspondence.json]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))

import numpy as np  # noqa: E402
import trimesh  # noqa: E402

from concord.geometry.mesh import icosphere_with_uv, load_mesh  # noqa: E402
from concord.geometry.render import has_embree, render_views  # noqa: E402
from concord.geometry.rigs import zero123pp  # noqa: E402

TARGET_S = 0.5


def bench_case(name, mesh, size, repeats):
    c, r = mesh.bounding_sphere()
    cams = zero123pp(up=mesh.up, front=mesh.front).cameras(c, r, size, size)
    vs = render_views(mesh, cams, size, size)  # warm-up (page faults, thread pool start)
    vs.validate()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        render_views(mesh, cams, size, size)
        times.append(time.perf_counter() - t0)
    rays = len(cams) * size * size
    med = statistics.median(times)
    return {
        "case": name,
        "faces": mesh.num_faces,
        "views": len(cams),
        "size": size,
        "rays": rays,
        "median_s": med,
        "best_s": min(times),
        "times_s": times,
        "mrays_per_s": rays / med / 1e6,
        "foreground_share": float(vs.mask.mean()),
        "target_s": TARGET_S if mesh.num_faces >= 20_000 else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "correspondence.json")
    args = ap.parse_args(argv)

    cases = [("icosphere-20k", icosphere_with_uv(5))]
    barrel = ROOT / "tests" / "fixtures" / "meshes" / "barrel" / "barrel.glb"
    if barrel.exists():
        cases.append(("barrel", load_mesh(barrel)))
    results = [bench_case(name, mesh, args.size, args.repeats) for name, mesh in cases]

    print(f"{'case':<15} {'faces':>7} {'views':>5} {'size':>5} {'median s':>9} {'best s':>8} {'Mrays/s':>8} {'target':>8}")
    for r in results:
        target = "" if r["target_s"] is None else ("ok" if r["median_s"] <= r["target_s"] else "MISSED") + f" {r['target_s']}"
        print(f"{r['case']:<15} {r['faces']:>7} {r['views']:>5} {r['size']:>5} {r['median_s']:>9.3f} "
              f"{r['best_s']:>8.3f} {r['mrays_per_s']:>8.2f} {target:>8}")

    report = {
        "benchmark": "correspondence",
        "machine": {
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {"numpy": np.__version__, "trimesh": trimesh.__version__, "embree": has_embree()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
