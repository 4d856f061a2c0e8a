"""Benchmark: a user's own checkpoint at its real size, in each layout users have: load, one small job, memory.

No weights can be downloaded here, so the checkpoints are random weights in the real architectures
(`concord.models.synthetic`, size "real"; fp16 on disk, as most published files are; loaded in the precision the
registry picks, fp32 on the CPU). Per family, written once:
  - hub:          the Hugging Face cache tree as `hf download` leaves it, loaded by preset name with
                  HF_HOME pointing at it and HF_HUB_OFFLINE=1;
  - folder:       the family's depth pipeline written by diffusers' save_pretrained;
  - file+cache:   one original-layout .safetensors (converted from the same weights), configurations and the
                  depth ControlNet from that cache (SD 1.5, SDXL);
  - file+config:  the same file with `config=` a folder of configuration files plus controlnet/, and an empty
                  cache (SD 1.5, SDXL);
  - file offline: the same file, empty cache, no config: must fail with the message naming the file (timed).
Each load runs in a fresh process, so its peak RSS is that layout's alone; the job is depth_image at 64x64, one
step, guidance 3, and must give a varied (finite) picture.

    .venv/bin/python bench/checkpoints.py                      # sd15 and sd2-depth (about 10 GB of disk)
    .venv/bin/python bench/checkpoints.py --families sdxl      # needs ~20 GB of RAM in fp32 on the CPU

Writes bench/results/checkpoints.json. The work folder is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

PRESET = {"sd15": "sd15-depth", "sd2-depth": "sd2-depth", "sdxl": "sdxl-depth"}
SINGLE_FILE_FAMILIES = ("sd15", "sdxl")  # the families the registry loads from one file


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kB


def prepare(family: str, work: Path, size: str = "real") -> dict:
    """Write every layout of `family` under work/<family>; returns the parameter counts and the write times."""
    import torch

    from concord.models import synthetic

    root = work / family
    t0 = time.perf_counter()
    ckpt = synthetic.build(family, size, seed=0, dtype=torch.float16)
    out = {"build_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    synthetic.write_hub_cache(ckpt, root / "hf" / "hub")
    out["hub_write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    synthetic.write_diffusers_folder(ckpt, root / "folder")
    out["folder_write_s"] = time.perf_counter() - t0
    if family in SINGLE_FILE_FAMILIES:
        t0 = time.perf_counter()
        synthetic.write_single_file(ckpt, root / f"{family}-model.safetensors")
        out["file_write_s"] = time.perf_counter() - t0
        synthetic.write_config_folder(ckpt, root / "config", with_controlnet=True)
    (root / "empty-hf" / "hub").mkdir(parents=True, exist_ok=True)
    out["params"] = {n: sum(p.numel() for p in m.parameters()) for n, m in ckpt.models.items()}
    out["bytes_on_disk"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    return out


def child(spec: dict) -> dict:
    """Load one layout through the registry and run the job; runs in its own process."""
    import threading

    import numpy as np
    from PIL import Image

    from concord.api.schemas import DepthImageParams
    from concord.jobs.context import JobContext
    from concord.models.registry import ModelUnavailable, load_model
    from concord.pipelines import depth_image

    out: dict = {}
    t0 = time.perf_counter()  # the libraries' import, apart from the load itself
    import diffusers  # noqa: F401
    from diffusers import StableDiffusionControlNetPipeline  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    out["import_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        model = load_model(spec["model"], spec["device"], config=spec.get("config"))
    except ModelUnavailable as exc:
        out.update(load_s=time.perf_counter() - t0, error=str(exc), peak_rss_gb=_peak_rss_gb())
        return out
    out["load_s"] = time.perf_counter() - t0
    out["rss_after_load_gb"] = _peak_rss_gb()
    out["kind"] = model.kind
    depth = np.zeros((64, 64), np.float32)
    depth[16:48, 16:48] = np.linspace(2.0, 3.0, 32, dtype=np.float32)[None]
    job_dir = Path(spec["job_dir"])
    job_dir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(job_dir, lambda *a: None, threading.Event())
    t0 = time.perf_counter()
    depth_image.run(model, DepthImageParams(prompt="a red box", steps=1, guidance=3.0), {"depth": depth}, ctx)
    out["job_s"] = time.perf_counter() - t0
    img = np.asarray(Image.open(job_dir / "image.png"))
    out["image_ok"] = bool(img.shape == (64, 64, 3) and img.reshape(-1, 3).std(0).min() > 0)
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def run_child(spec: dict, hf_home: Path) -> dict:
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("HF_HUB_CACHE", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True, timeout=3600
    )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"child failed (rc {proc.returncode}): {proc.stderr[-2000:]}", "process_s": wall}
    return dict(json.loads(lines[-1]), process_s=wall)


def cases(family: str, root: Path) -> list[tuple[str, dict, Path, bool]]:
    """(layout, spec, HF_HOME, should_load) for each layout of `family`."""
    hf, empty = root / "hf", root / "empty-hf"
    out = [
        ("hub (preset, offline)", {"model": PRESET[family]}, hf, True),
        ("diffusers folder", {"model": str(root / "folder")}, empty, True),
    ]
    if family in SINGLE_FILE_FAMILIES:
        f = str(root / f"{family}-model.safetensors")
        out += [
            ("single file + cached configs", {"model": f}, hf, True),
            ("single file + --config, empty cache", {"model": f, "config": str(root / "config")}, empty, True),
            ("single file, offline, no config", {"model": f}, empty, False),
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=["sd15", "sd2-depth"], choices=list(PRESET))
    ap.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary folder)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--size", default="real", choices=["real", "small"], help="small: a quick check of this script")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.prepare:
        family, work, size = json.loads(args.prepare)
        print(json.dumps(prepare(family, Path(work), size)), flush=True)
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="concord-bench-ckpt-"))
    rows = []
    try:
        for family in args.families:
            # Writing happens in its own process too: its memory (the real-size model) is gone before loads start.
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--prepare", json.dumps([family, str(work), args.size])],
                capture_output=True, text=True, timeout=7200,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"writing {family} failed: {proc.stderr[-3000:]}")
            written = json.loads(lines[-1])
            print(
                f"{family}: wrote {written['bytes_on_disk'] / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s "
                f"({sum(written['params'].values()) / 1e9:.2f} G parameters)",
                flush=True,
            )
            for layout, spec, hf_home, should_load in cases(family, work / family):
                spec = dict(spec, device=args.device, job_dir=str(work / family / "jobs" / layout.replace(" ", "_")))
                res = run_child(spec, hf_home)
                ok = ("error" not in res and res.get("image_ok")) if should_load else (
                    "error" in res and Path(spec["model"]).name in res["error"] and "--config DIR" in res["error"]
                )
                row = {
                    "family": family,
                    "size": args.size,
                    "layout": layout,
                    "ok": bool(ok),
                    "import_s": res.get("import_s"),
                    "load_s": res.get("load_s"),
                    "job_s": res.get("job_s"),
                    "peak_rss_gb": res.get("peak_rss_gb"),
                    "rss_after_load_gb": res.get("rss_after_load_gb"),
                    "process_s": res.get("process_s"),
                    "params_g": round(sum(written["params"].values()) / 1e9, 3),
                    "note": (res.get("error") or "")[:300],
                }
                print(f"  {layout}: {'ok' if ok else 'FAILED'} {json.dumps({k: row[k] for k in ('load_s', 'job_s', 'peak_rss_gb')})}", flush=True)
                rows.append(row)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report("checkpoints" if args.size == "real" else "checkpoints_small", rows, ["family", "layout", "ok", "load_s", "job_s", "peak_rss_gb", "process_s"])
    if not all(r["ok"] for r in rows):
        raise SystemExit("some layouts did not behave as expected: see the table and bench/results/checkpoints.json")


if __name__ == "__main__":
    main()
