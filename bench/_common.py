"""Shared bits of the benchmarks: timing, a table on stdout, a JSON file in bench/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def quiet_diffusion() -> None:
    """No library warnings or per-call progress bars (diffusers, transformers) in a benchmark's table."""
    from concord.models.registry import quiet_libraries

    quiet_libraries()
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def add_micro_arguments(parser, samples: int, name: str) -> None:
    """The options every micro-model bench shares, with one set of defaults (the model card's evaluation setting:
    held-out `eval` samples, 20 DDIM steps, guidance 2, seed 1234, two threads), so their figures line up."""
    from concord.micro.model import DEFAULT_WEIGHTS

    parser.add_argument("--model", default=str(DEFAULT_WEIGHTS), help="a MicroPipeline folder (default: the shipped weights)")
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0,
                        help="classifier-free guidance (2 measured best: docs/micro-model.md)")
    parser.add_argument("--seed", type=int, default=1234, help="eval split seed (the noise is seeded from it too)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=name, help="results file name (bench/results/NAME.json)")


def load_micro_for_bench(args, prog: str, device: str = "cpu"):
    """torch on --threads, then the --model weights; None (after one error line on stderr) if there are none."""
    import sys

    import torch

    from concord.micro.model import load_micro

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return load_micro(args.model, device=device)
    except FileNotFoundError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None


def timed(fn, repeat: int = 5, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeat}


def report(name: str, rows: list[dict], columns: list[str]) -> Path:
    """Print rows as a table and write {machine, rows} to bench/results/<name>.json."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
