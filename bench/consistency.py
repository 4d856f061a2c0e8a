"""Consistency measured on the shipped `micro` model: cross-view disagreement of six generated views of a
fixture mesh for independent generation, shared attention alone (plain, and correspondence-weighted), UV sync alone,
both, all (with UV noise), and grid stacking alone (`concord.consistency_eval.CONFIGS`).

    .venv/bin/python bench/consistency.py [--model micro] [--seeds 3] [--steps 20] [--size 64] [--procedural] [--open]

Two kinds of prompt: the FULL prompt names shape, pattern and both colours ("a red and yellow checker cylinder"),
so independent views can disagree only on the pattern's phase; the OPEN prompt (`--open`) names no colour ("a
checker cylinder", `concord.micro.data.open_prompt`), so independent views also pick their colours apart -- as
real prompts leave most things open -- and shared attention has something to make them agree on.

Prints a table, writes bench/results/consistency.json and docs/images/consistency.png (independent vs
synchronized views side by side, same seed). Each row also gives, per seed, the share of views on the most common
pair of micro's palette colours (`concord.micro.evaluate.colour_pair_agreement`): what shared attention is for on
the open prompt.
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

from concord.consistency_eval import (  # noqa: E402
    CONFIGS,
    PROCEDURAL_OBJECTS,
    measure,
    procedural_mesh_file,
    render_fixture_views,
    views_of,
)
from concord.micro.evaluate import colour_pair_agreement  # noqa: E402
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
    out = Path(args.out)
    seeds = tuple(range(args.seeds))

    def measured(mesh: str, views, prompt: str, sub: str, configs=None) -> list[dict]:
        """`measure` on one mesh and prompt, each row labelled with what was measured."""
        rows = measure(model, views, prompt, seeds=seeds, steps=args.steps, out_dir=out / sub, configs=configs)
        for r in rows:
            r.update(model=args.model, mesh=mesh, prompt=prompt, views=views.num_views, size=args.size, steps=args.steps)
            # micro's palette: the share of views on the most common colour pair, per seed
            r["colour_agreement"] = [colour_pair_agreement(views_of(out / sub, r["config"], s), views.depth > 0)
                                     for s in seeds]
        return rows

    def prompts(full: str) -> list[tuple[str, str]]:
        """(prompt, folder suffix): the full prompt, and with --open its open form."""
        return [(full, "")] + ([(open_form(full), "open")] if args.open else [])

    views = render_fixture_views(MESH, args.size)
    rows = []
    for prompt, suffix in prompts(PROMPT):
        rows += measured(MESH.name, views, prompt, suffix)
    if args.procedural:
        pick = {k: CONFIGS[k] for k in ("independent", "shared attention", "correspondence", "grid", "all")}
        for name, _build, full in PROCEDURAL_OBJECTS:
            mesh_views = render_fixture_views(procedural_mesh_file(name, out), args.size, unwrap=True)
            for prompt, suffix in prompts(full):
                sub = f"procedural-{name}" + (f"-{suffix}" if suffix else "")
                rows += measured(f"procedural {name}", mesh_views, prompt, sub, pick)
    report("consistency", rows,
           ["mesh", "prompt", "config", "disagreement", "ratio_to_independent", "per_seed", "colour_agreement", "coverage",
            "seconds"])
    # Pictures, the same seed: independent (left) vs all mechanisms (right); with --open, the open prompt's
    # independent views vs (correspondence-weighted) shared attention alone.
    side_by_side(out, ("independent", "all"), "consistency.png",
                 "left: independent, right: shared attention + UV sync + UV noise")
    if args.open:
        side_by_side(out / "open", ("independent", "correspondence"), "consistency-open.png",
                     f"{open_form(PROMPT)!r}; left: independent, right: correspondence-weighted shared attention alone")


def side_by_side(folder: Path, configs: tuple[str, str], name: str, caption: str) -> None:
    """docs/images/NAME: seed 0's generated views (each grid.png without its depth row) of two configurations,
    side by side, upscaled 2x."""
    pics = [np.asarray(Image.open(folder / c / "seed0" / "grid.png").convert("RGB")) for c in configs]
    sheet = np.concatenate([p[: p.shape[0] // 2] for p in pics], axis=1)  # the views, without the control row
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(images / name)
    print(f"wrote {images / name} ({caption})")


def open_form(prompt: str) -> str:
    """The open form of a full micro prompt: the same shape and pattern, no colours."""
    from concord.micro.data import parse_prompt, prompt_for

    shape, pattern, _c1, _c2 = parse_prompt(prompt)
    return prompt_for(shape, pattern, -1)


if __name__ == "__main__":
    main()
