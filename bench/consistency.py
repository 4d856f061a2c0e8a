"""Consistency measured on the shipped `micro` model: cross-view disagreement of six generated views of a
fixture mesh for independent generation, shared attention alone, UV sync alone, both, all (with UV noise), and
grid stacking alone (`concord.consistency_eval.CONFIGS`).

    .venv/bin/python bench/consistency.py [--model micro] [--seeds 3] [--steps 20] [--size 64] [--procedural] [--open]

Two kinds of prompt: the FULL prompt names shape, pattern and both colours ("a red and yellow checker cylinder"),
so independent views can disagree only on the pattern's phase; the OPEN prompt (`--open`) names no colour ("a
checker cylinder", `concord.micro.data.open_prompt`), so independent views also pick their colours apart -- as
real prompts leave most things open -- and shared attention has something to make them agree on.

Prints a table, writes bench/results/consistency.json and docs/images/consistency.png (independent vs
synchronized views side by side, same seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from concord.consistency_eval import CONFIGS, PROCEDURAL_OBJECTS, measure, procedural_mesh_file, render_fixture_views  # noqa: E402
from concord.models.registry import load_model  # noqa: E402

MESH = ROOT / "tests" / "fixtures" / "meshes" / "barrel" / "barrel.glb"
PROMPT = "a red and yellow checker cylinder"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="micro")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench-consistency"))
    ap.add_argument("--procedural", action="store_true",
                    help="also measure held-out procedural meshes (box, capsule, cylinder; xatlas UVs): independent, "
                         "shared attention, all")
    ap.add_argument("--open", action="store_true",
                    help="also measure the open prompts (no colours named) on the same meshes and seeds")
    args = ap.parse_args()
    model = load_model(args.model, "auto")
    views = render_fixture_views(MESH, args.size)
    out = Path(args.out)
    seeds = tuple(range(args.seeds))
    rows = measure(model, views, PROMPT, seeds=seeds, steps=args.steps, out_dir=out)
    for r in rows:
        r.update(model=args.model, mesh=MESH.name, prompt=PROMPT, views=views.num_views, size=args.size, steps=args.steps)
    pick = {k: CONFIGS[k] for k in ("independent", "shared attention", "grid", "all")}
    if args.open:
        prompt = open_form(PROMPT)
        extra = measure(model, views, prompt, seeds=seeds, steps=args.steps, out_dir=out / "open")
        for r in extra:
            r.update(model=args.model, mesh=MESH.name, prompt=prompt, views=views.num_views, size=args.size, steps=args.steps)
        rows += extra
    if args.procedural:
        for name, _build, full in PROCEDURAL_OBJECTS:
            mesh_views = render_fixture_views(procedural_mesh_file(name, out), args.size, unwrap=True)
            for prompt in (full, open_form(full)) if args.open else (full,):
                sub = f"procedural-{name}" + ("-open" if prompt != full else "")
                extra = measure(model, mesh_views, prompt, seeds=seeds, steps=args.steps, out_dir=out / sub, configs=pick)
                for r in extra:
                    r.update(model=args.model, mesh=f"procedural {name}", prompt=prompt, views=mesh_views.num_views,
                             size=args.size, steps=args.steps)
                rows += extra
    report("consistency", rows,
           ["mesh", "prompt", "config", "disagreement", "ratio_to_independent", "per_seed", "coverage", "seconds"])
    # Picture: the same seed, independent (left) vs all mechanisms (right).
    pics = [np.asarray(Image.open(out / name / "seed0" / "grid.png").convert("RGB")) for name in ("independent", "all")]
    half = [p[: p.shape[0] // 2] for p in pics]  # the views, without the control row
    sheet = np.concatenate(half, axis=1)
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(images / "consistency.png")
    print(f"wrote {images / 'consistency.png'} (left: independent, right: shared attention + UV sync + UV noise)")
    if args.open:
        pics = [np.asarray(Image.open(out / "open" / name / "seed0" / "grid.png").convert("RGB"))
                for name in ("independent", "shared_attention")]
        sheet = np.concatenate([p[: p.shape[0] // 2] for p in pics], axis=1)
        Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(
            images / "consistency-open.png")
        print(f"wrote {images / 'consistency-open.png'} ({open_form(PROMPT)!r}; left: independent, right: shared "
              "attention alone)")


def open_form(prompt: str) -> str:
    """The open form of a full micro prompt: the same shape and pattern, no colours."""
    from concord.micro.data import parse_prompt, prompt_for

    shape, pattern, _c1, _c2 = parse_prompt(prompt)
    return prompt_for(shape, pattern, -1)


if __name__ == "__main__":
    main()
