"""Coverage of the UV islands (concord.geometry.metrics.surface_coverage): the figure and its cost per job.

Six views (Zero123++ rig) of a mesh at 128 and 512 px, textures of 512..2048: coverage (the share of UV-island
texels the views see), the old whole-texture figure (``texture_fill_fraction``: the share of the image view
pixels were splatted into), the splatted share of the island texels, and the time of the coverage computation
(median of ``--runs``, CPU and wall time; the island rasterisation alone reported too; textures over 1024^2
are measured on a 1024^2 grid). Coverage should not move with the texture
or view size; the splatted shares do.

Usage: ``python bench/coverage.py [--mesh PATH ...] [--runs 3]`` (default mesh: the Barrel fixture).
Prints a table, writes bench/results/coverage.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from concord.geometry import bake as B  # noqa: E402
from concord.geometry.mesh import load_mesh  # noqa: E402
from concord.geometry.metrics import coverage_fraction, surface_arrays, surface_coverage, uv_texels  # noqa: E402
from concord.geometry.render import render_views  # noqa: E402
from concord.geometry.rigs import zero123pp  # noqa: E402

BARREL = ROOT / "tests" / "fixtures" / "meshes" / "barrel" / "barrel.glb"


def median_seconds(fn, runs: int):
    """Median (wall, CPU) seconds of ``runs`` calls and the last result. CPU time (this process) is the cost
    on a shared, loaded machine; wall time is what a user waits on an idle one."""
    out, wall, cpu = None, [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mesh", nargs="*", default=[str(BARREL)])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    for path in args.mesh:
        mesh = load_mesh(path)
        tris = surface_arrays(mesh)
        c, r = mesh.bounding_sphere()
        rig = zero123pp(mesh.up, mesh.front)
        for view_size in (128, 512):
            cams = rig.cameras(c, r, view_size, view_size)
            vs = render_views(mesh, [(k.K, k.world_to_camera) for k in cams], view_size, view_size)
            for size in (512, 1024, 2048):
                _, raster_s, _ = median_seconds(
                    lambda: sum(ch.texel.size for ch in uv_texels(tris["triangle_uv"], size)), args.runs)
                wall_s, cov_s, sc = median_seconds(
                    lambda: surface_coverage(vs, tris["triangles"], tris["triangle_uv"], size), args.runs)
                baked = B.build_texel_index(vs, size).coverage
                rows.append({
                    "mesh": Path(path).name, "faces": mesh.num_faces, "views": f"6x{view_size}", "texture": size,
                    "coverage": round(sc.coverage, 4),
                    "texture_fill_fraction": round(coverage_fraction(baked), 4),
                    "splatted_island_share": round(coverage_fraction(baked, sc.islands), 4),
                    "uv_island_fraction": round(sc.island_fraction, 4),
                    "raster_cpu_ms": round(1e3 * raster_s, 1), "coverage_cpu_ms": round(1e3 * cov_s, 1),
                    "coverage_wall_ms": round(1e3 * wall_s, 1),
                })
    report("coverage", rows, ["mesh", "views", "texture", "coverage", "texture_fill_fraction", "splatted_island_share",
                              "raster_cpu_ms", "coverage_cpu_ms", "coverage_wall_ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
