"""Quality of the micro model on held-out procedural samples: the model card's table (docs/micro-model.md).

    python bench/micro_eval.py                       # the shipped weights, 200 samples, 20 steps
    python bench/micro_eval.py --model runs/micro/model --samples 400 --steps 20 --guidance 3

Prints a table (metric, value, target, pass; per-pattern accuracy; seconds per image) and writes
bench/results/micro_eval.json. Metrics and targets: `concord.micro.evaluate` (its docstring says how each is
measured). Runs on the CPU with two threads unless --device says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import quiet_diffusion, report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    quiet_diffusion()
    import torch

    from concord.micro.evaluate import TARGETS, evaluate
    from concord.micro.model import DEFAULT_WEIGHTS, count_parameters, load_micro

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_WEIGHTS), help="a MicroPipeline folder (default: the shipped weights)")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance (2 measured best: docs/micro-model.md)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="micro_eval", help="results file name (bench/results/NAME.json)")
    args = p.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        pipe = load_micro(args.model, device=args.device)
    except FileNotFoundError as exc:
        print(f"micro_eval: error: {exc}", file=sys.stderr)
        return 2
    res = evaluate(pipe, n_samples=args.samples, seed=args.seed, steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch)

    rows = []
    for metric, target in TARGETS.items():
        rows.append({"metric": metric, "value": res[metric], "target": target, "pass": res["passed"][metric]})
    for name, acc in res["pattern_accuracy_by_pattern"].items():
        rows.append({"metric": f"pattern_accuracy[{name}]", "value": acc})
    rows.append({"metric": "pattern_classifier_holdout_accuracy", "value": res["pattern_classifier_holdout_accuracy"]})
    rows.append({"metric": "seconds_per_image", "value": res["seconds_per_image"]})
    params = count_parameters(pipe.unet) + count_parameters(pipe.text_encoder)
    setting = {
        "model": args.model,
        "samples": args.samples,
        "n_plain": res["n_plain"],
        "n_pair": res["n_pair"],
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "device": args.device,
        "parameters": params,
        "background_tolerance": res["background_tolerance"],
    }
    for r in rows:
        r.update(setting)
    training = Path(args.model) / "training.json"
    if training.exists():
        print(f"model trained as: {training.read_text().strip()}")
    report(args.name, rows, ["metric", "value", "target", "pass"])
    print("confusion (true -> predicted):", res["pattern_confusion"])
    return 0 if all(res["passed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
