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

from _common import add_micro_arguments, load_micro_for_bench, quiet_diffusion, report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    quiet_diffusion()

    from concord.micro.evaluate import TARGETS, evaluate
    from concord.micro.model import count_parameters

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_micro_arguments(p, samples=200, name="micro_eval")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    pipe = load_micro_for_bench(args, "micro_eval", device=args.device)
    if pipe is None:
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
    params += count_parameters(pipe.head) if pipe.head is not None else 0
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
