"""The model's defaults end to end (issue 9): ``concord texture MESH --prompt "a blue fox"`` with NO other option,
on a mesh the default model never saw (the glTF Fox, rest pose; micro trained on procedural primitives), timed
as a user runs it, and checked for colour.

    .venv/bin/python bench/defaults.py [--runs 1] [--no-single-thread]

Each row runs the real command in a subprocess (so the time includes Python start-up, imports, loading the model,
rendering the views, the job and writing the results) and reports:

- wall_s: wall-clock seconds of the whole command; target < 60 s on the 2-core development machine;
- cpu_s: the command's user + system CPU seconds (getrusage of the child), and the load average before and after
  (the machine is shared: a wall time measured on a loaded machine is longer than on an idle one). The
  ``OMP_NUM_THREADS=1`` row is the load-robust figure: one thread never spin-waits for a descheduled partner, so
  its CPU seconds are what the command costs one idle core;
- the settings the command used and where each came from (metrics.json ``settings``: all ``model``);
- blue_fraction: of the texels the views cover, the fraction whose nearest colour in micro's palette
  (``concord.micro.data.COLOURS``, the colours it was trained on) is blue, and the covered texels' mean sRGB.
  "Paints blue" = blue is the most frequent palette colour (micro's own colour-accuracy rule,
  docs/micro-model.md).

Prints a table and writes bench/results/defaults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

MESH = ROOT / "tests" / "fixtures" / "meshes" / "fox" / "Fox.glb"
PROMPT = "a blue fox"
TARGET_S = 60.0


def palette_colours(out: Path) -> dict:
    """Colour of the covered texels: nearest-palette-colour counts (micro's palette) and the mean sRGB."""
    from concord.micro.data import COLOURS

    tex = np.asarray(Image.open(out / "texture.png").convert("RGB"), dtype=np.float32)
    covered = np.asarray(Image.open(out / "coverage.png").convert("L")) > 0
    px = tex[covered]
    names = list(COLOURS)
    pal = np.array([COLOURS[n] for n in names], np.float32)
    nearest = np.argmin(((px[:, None, :] - pal[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(names)) / max(1, len(px))
    fractions = {n: float(c) for n, c in zip(names, counts)}
    return {
        "texels": int(covered.sum()),
        "mean_rgb": [round(float(v), 1) for v in px.mean(0)],
        "fractions": fractions,
        "most_frequent": max(fractions, key=fractions.get),
    }


def run_once(out: Path, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "concord.cli", "texture", str(MESH), "--prompt", PROMPT, "--out", str(out)]
    load_before = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"concord texture failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    colours = palette_colours(out)
    s = m["settings"]
    return {
        "case": f"concord texture Fox.glb --prompt {PROMPT!r} (no options)"
        + (f", OMP_NUM_THREADS={threads}" if threads else ""),
        "threads": threads or "default",
        "wall_s": round(wall, 2),
        "cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 2),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "model": m["model"],
        "view_size": s["view_size"]["value"],
        "steps": s["steps"]["value"],
        "guidance": s["guidance"]["value"],
        "texture_size": s["texture_size"]["value"],
        "sources": sorted({v["source"] for v in s.values()}),
        "denoising_s": m["timings_s"]["denoising_s"],
        "coverage": round(m["coverage"], 4),
        "blue_fraction": round(colours["fractions"]["blue"], 4),
        "most_frequent_colour": colours["most_frequent"],
        "mean_rgb": colours["mean_rgb"],
        "target_wall_s": TARGET_S,
        "under_target": wall < TARGET_S,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1, help="runs per configuration")
    ap.add_argument("--no-single-thread", action="store_true", help="skip the OMP_NUM_THREADS=1 row")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench-defaults"))
    args = ap.parse_args()
    rows = []
    for threads in (None,) if args.no_single_thread else (None, 1):
        for k in range(args.runs):
            rows.append(run_once(Path(args.out) / f"threads-{threads or 'default'}-{k}", threads))
    report(
        "defaults",
        rows,
        ["threads", "wall_s", "cpu_s", "load_before", "load_after", "view_size", "steps", "guidance", "texture_size",
         "sources", "denoising_s", "blue_fraction", "most_frequent_colour", "under_target"],
    )


if __name__ == "__main__":
    main()
