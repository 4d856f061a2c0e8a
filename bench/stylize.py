"""Benchmark of the stylize job: table on stdout, JSON at bench/results/stylize.json.

(a) Peak memory against sequence length: the whole job (`concord.pipelines.stylize.stylize`) on the shipped `micro`
    model on the CPU at 64x64, 10 steps, default settings (keyframes first+previous, warped noise, chunk_frames 8,
    the model's guidance), over 8, 64 and 256 frames of a spinning procedural object with exact motion. Each length
    runs in a FRESH subprocess (max RSS, resource.getrusage, is a high-water mark) and reads its frames from a LAZY
    source (`SpinningSource`: `spinning_frame_range` renders the frames asked for, chunk by chunk), so the input is
    never all in memory. Per length: peak RSS, its rise over the baseline taken after the model loaded, the job's
    `attention_cache_bytes` (its peak keyframe record + carry), seconds per frame, the warping error of the output
    and of the input (the floor), and -- for scale -- what the input frames and the output frames would take if
    they were kept in memory. What it shows: memory does not grow with the number of frames.
(b) Real size on the CPU: a Stable Diffusion 1.5 UNet + depth ControlNet from SD1.5's config with random weights
    (same FLOPs and time as the real checkpoint; `bench/texture.py`'s builder), 512x512 frames, classifier-free
    guidance, fp32. Not the whole job (a real-size step takes minutes on 2 cores, a whole job hours): the job's
    own pieces around ONE timed denoiser call each -- `FrameMemory` + `frame_attention` from
    `concord.attention.keyframe`, the previous-frame plan from `concord.pipelines.stylize.previous_plan`, batches
    laid out as the job lays them out ([uncond frames..., cond frames...]):
      - plain:     independent per-frame img2img, a chunk of frames with ordinary self-attention;
      - keyframes: the two keyframes denoised together, attending to each other, their keys/values recorded (once
                   per sequence, so its cost per frame vanishes over a long sequence);
      - stylize:   a chunk of frames, each attending to itself, the two keyframes' cached keys/values and its
                   previous frame (the first frame's previous is a keyframe, from the record; the next one's is live).
    Seconds per frame per step, scaled to the job's 20 nominal steps x strength 0.7 = 14 steps run (SDEdit runs
    int(steps x strength) of them; VAE encode/decode per frame, equal in both, left out), the stylize / plain ratio,
    FLOPs per frame per step counted by torch.utils.flop_counter.FlopCounterMode on the same models built on the meta
    device (the extended attention included: the CPU flash-attention op's formula is registered as in
    `bench/texture.py`), the peak-RSS rise per configuration (run in increasing expected memory), and the
    keyframe record's size for the whole job (one step's record x 14 steps).
(c) CUDA only (skipped on the CPU with a note): the whole job at 512x512, 20 steps, CFG, two keyframes (keyframes
    'explicit' [0, N/2]: the job's keyframe setting with two keyframes), fp16, on a real-size random-weight SD1.5
    ControlNet pipeline (`concord.models.synthetic`, the loading path users' checkpoints take); seconds per frame
    (target <= 0.2 s on an H100) and MFU: the denoiser's FLOPs (counted by FlopCounterMode around every denoiser
    call in a warm-up run) / the timed run's denoising time / the GPU's peak (H100/H200 SXM dense fp16: 989 TFLOPS).

Usage: ``python bench/stylize.py [--quick] [--skip-cpu-real]``. --quick: only (a), with 8 and 64 frames.
--skip-cpu-real: skip (b) (about 10 minutes on 2 idle cores). ``--gpu-path-check`` runs (c)'s code on the CPU with
the `tiny` model at 64x64 (a check that it runs; its figures mean nothing; prints them, writes no results file).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report  # noqa: E402

LENGTHS = (8, 64, 256)
QUICK_LENGTHS = (8, 64)
MICRO_SIZE, MICRO_STEPS = 64, 10
REAL_STEPS, REAL_STRENGTH = 20, 0.7  # the job's nominal schedule at real size (strength: StylizeParams' default)

COLUMNS = ["part", "case", "frames", "s_per_frame", "peak_rss_mib", "rise_mib", "cache_mib", "tflop_frame_step",
           "ratio", "warp_err", "input_warp_err", "mfu", "note"]


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers


class SpinningSource:
    """A FrameSource (`concord.pipelines.stylize.FrameSource`) over `n` frames of micro's spinning procedural object,
    rendered on demand: `read(start, stop)` renders exactly those frames (`spinning_frame_range`, exact motion to
    the previous frame), so the sequence is never all in memory."""

    motion_source = "renderer"

    def __init__(self, n: int, size: int = 64, seed: int = 0, degrees_per_frame: float = 8.0):
        from concord.micro.animation import spinning_frame_range

        if n < 1:
            raise ValueError(f"a sequence needs at least one frame, got {n}")
        self.n, self.size, self.seed, self.degrees = int(n), int(size), int(seed), float(degrees_per_frame)
        self._range = spinning_frame_range
        self.prompt = spinning_frame_range(0, 1, self.degrees, self.seed, self.size)[1]

    def __len__(self) -> int:
        return self.n

    @property
    def height(self) -> int:
        return self.size

    @property
    def width(self) -> int:
        return self.size

    def read(self, start: int, stop: int):
        if not 0 <= start < stop <= self.n:
            raise IndexError(f"frames [{start}, {stop}) are outside the sequence's {self.n} frames")
        return self._range(start, stop, self.degrees, self.seed, self.size)[0], None


def steps_run(steps: int, strength: float) -> int:
    """Denoising steps an img2img run takes: int(steps x strength), at least 1, at most `steps` (the sampler's
    SDEdit start, `concord.pipelines.sampler.sample`, diffusers' `get_timesteps` rule)."""
    return min(max(int(steps * strength), 1), steps)


def frames_mib(n: int, size: int, bytes_per_pixel: int) -> float:
    """What n square frames of `size` take at `bytes_per_pixel` (for scale next to the measured memory)."""
    return n * size * size * bytes_per_pixel / 2**20


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------------
# (a) memory against sequence length, one fresh process per length


def run_length(n: int, size: int = MICRO_SIZE, steps: int = MICRO_STEPS) -> dict:
    """In this (fresh) process: the stylize job on micro over n lazily rendered frames; its memory and metrics."""
    import torch

    from concord.api.schemas import StylizeParams
    from concord.jobs.context import JobContext
    from concord.models.registry import load_model
    from concord.pipelines.stylize import stylize

    torch.manual_seed(0)
    model = load_model("micro", "cpu")
    source = SpinningSource(n, size)
    params = StylizeParams(prompt=source.prompt, steps=steps)
    base = max_rss_mib()
    with tempfile.TemporaryDirectory(prefix="concord-bench-stylize-") as tmp:
        ctx = JobContext(Path(tmp) / "out", lambda *a: None, threading.Event())
        t0 = time.perf_counter()
        m = stylize(model, params, source, Path(tmp) / "work", ctx)
        wall = time.perf_counter() - t0
    peak = max_rss_mib()
    return {
        "frames": n,
        "baseline_rss_mib": base,
        "peak_rss_mib": peak,
        "rise_mib": peak - base,
        "cache_mib": m["attention_cache_bytes"] / 2**20,
        "s_per_frame": wall / n,
        "denoise_s_per_frame": (m["timings_s"]["keyframes_s"] + m["timings_s"]["frames_s"]) / n,
        "warp_err": m["warping_error"]["mean"],
        "input_warp_err": m["input_warping_error"]["mean"],
        "denoiser_calls": m["denoiser_calls"],
        "steps": m["params"]["steps"],
        "guidance": m["params"]["guidance"],
        "keyframes": m["params"]["keyframes"],
        "noise": m["params"]["noise"],
        "chunk_frames": m["params"]["chunk_frames"],
        "threads": torch.get_num_threads(),
    }


def bench_lengths(rows: list, lengths) -> None:
    for n in lengths:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-length", str(n)],
                              capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode != 0:
            raise RuntimeError(f"the {n}-frame run failed:\n{proc.stderr[-4000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update({
            "part": "a",
            "case": f"micro {MICRO_SIZE}px, {r['steps']} steps, {r['keyframes']}, {r['noise']} noise, chunk {r['chunk_frames']}",
            "input_in_memory_mib": frames_mib(n, MICRO_SIZE, 3 + 4 + 8),  # uint8 RGB + float depth + float motion
            "output_in_memory_mib": frames_mib(n, MICRO_SIZE, 3 * 4),  # float RGB
            "process_s": time.perf_counter() - t0,
            "note": "fresh process, lazy source; rise over RSS after model load",
        })
        rows.append(r)
        print(f"(a) {n} frames: peak {r['peak_rss_mib']:.1f} MiB (rise {r['rise_mib']:.1f}), cache "
              f"{r['cache_mib']:.3f} MiB, {r['s_per_frame']:.3f} s/frame, warping error {r['warp_err']:.4f}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# (b) real size on the CPU: one denoiser call per configuration


def _texture_bench():
    import texture  # bench/texture.py: the real-size SD1.5 builders, the CPU SDPA FLOP formula, peak memory

    return texture


def _real_inputs(frames: int, device: str, dtype, seed: int):
    """Latents, control and text embeddings of `frames` frames under CFG, laid out as the job does:
    [uncond frames..., cond frames...]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    groups = 2
    lat = torch.randn(groups * frames, 4, 64, 64, generator=g).to(device)
    ctrl = torch.rand(groups * frames, 3, 512, 512, generator=g).to(device)
    emb = torch.randn(groups, 77, 768, generator=g).repeat_interleave(frames, dim=0).to(device, dtype)
    return lat, ctrl, emb


def _stylize_calls(den, memory, chunk: int, keys: list[int], device: str, dtype):
    """The three denoiser calls of (b) as (name, frames, fn): plain (ordinary attention), the keyframes' call
    (recording), a chunk attending to the keyframes' record and its previous frame. Run them in this order inside
    `frame_attention` for the last two (the chunk needs the record)."""
    import torch

    from concord.pipelines.stylize import previous_plan

    t = torch.tensor(500, device=device)
    chunk_frames = [keys[0] + 1 + i for i in range(chunk)]  # right after the first keyframe: previous = key, then live
    xp, cp, ep = _real_inputs(chunk, device, dtype, 1)
    xk, ck, ek = _real_inputs(len(keys), device, dtype, 2)

    def plain():
        return den.predict(xp, t, ep, cp)

    def keyframes():
        memory.phase, memory.keyframe_count, memory.step = "keyframes", len(keys), 0
        return den.predict(xk, t, ek, ck)

    def frames():
        memory.phase, memory.step, memory.use_keyframes, memory.record_last = "frames", 0, True, True
        memory.previous = previous_plan(chunk_frames, keys, True, 0)
        return den.predict(xp, t, ep, cp)

    return [("plain", chunk, plain), ("keyframes", len(keys), keyframes), ("stylize", chunk, frames)]


def count_real_flops(chunk: int, keys: list[int]) -> dict:
    """FLOPs of each (b) call on meta-device copies of the models (shapes only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from concord.attention.keyframe import FrameMemory, frame_attention
    from concord.pipelines.denoiser import ControlNetDenoiser

    tex = _texture_bench()
    tex._register_cpu_sdpa_flops()
    with torch.device("meta"):
        unet, controlnet = tex.sd15_models("meta", torch.float32)
    den = ControlNetDenoiser(unet, controlnet)
    memory = FrameMemory()
    out = {}
    for name, _, fn in _stylize_calls(den, memory, chunk, keys, "meta", torch.float32):
        ctx = frame_attention(den.modules, memory) if name != "plain" else _null()
        with ctx, torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        out[name] = counter.get_total_flops()
    return out


def bench_real_cpu(rows: list, chunk: int = 2, keys=(0, 8)) -> None:
    import torch

    from concord.attention.keyframe import FrameMemory, frame_attention
    from concord.pipelines.denoiser import ControlNetDenoiser

    tex = _texture_bench()
    keys = list(keys)
    flops = count_real_flops(chunk, keys)
    t0 = time.perf_counter()
    unet, controlnet = tex.sd15_models("cpu", torch.float32)
    build_s = time.perf_counter() - t0
    den = ControlNetDenoiser(unet, controlnet)
    memory = FrameMemory()
    run = steps_run(REAL_STEPS, REAL_STRENGTH)
    out = {}
    for name, frames, fn in _stylize_calls(den, memory, chunk, keys, "cpu", torch.float32):
        ctx = frame_attention(den.modules, memory) if name != "plain" else _null()
        with ctx, torch.no_grad():
            start = max_rss_mib()
            t1 = time.perf_counter()
            fn()
            step_s = time.perf_counter() - t1
            rise = max_rss_mib() - start
        out[name] = {"step_s": step_s, "frames": frames}
        print(f"(b) {name}: {step_s:.1f} s for one step of {frames} frame(s) under CFG", flush=True)
        rows.append({
            "part": "b",
            "case": {"plain": f"plain img2img step, chunk of {chunk} (batch {2 * chunk})",
                     "keyframes": f"keyframes step, {len(keys)} keyframes attending to each other (batch {2 * len(keys)})",
                     "stylize": f"stylize step, chunk of {chunk}: self + {len(keys)} cached keyframes + previous"}[name],
            "frames": frames,
            "step_s": step_s,
            "s_per_frame_step": step_s / frames,
            "s_per_frame": step_s / frames * run,
            "tflop_frame_step": flops[name] / frames / 1e12,
            "tflop_per_step": flops[name] / 1e12,
            "achieved_tflops": flops[name] / step_s / 1e12,
            "rise_mib": rise,
            "build_s": build_s,
            "note": f"1 timed step; s_per_frame = step x {run} steps ({REAL_STEPS} x strength {REAL_STRENGTH}), "
                    "no VAE; fp32" + ("" if name == "plain" else ", the job's FrameMemory + frame_attention")
                    + ("; once per sequence (per keyframe)" if name == "keyframes" else ""),
        })
    cache_step = sum(t.numel() * t.element_size() for d in (memory.keyframes, memory.next_carry)
                     for kv in d.values() for t in kv)
    rows.append({
        "part": "b",
        "case": "stylize / plain, per frame",
        "ratio": out["stylize"]["step_s"] / out["plain"]["step_s"],
        "flop_ratio": flops["stylize"] / flops["plain"],
        "cache_mib": cache_step * run / 2**20,
        "note": f"ratio: seconds; flop_ratio: counted FLOPs; cache_mib: keyframe record + carry for {run} steps "
                f"(one step's x {run}), fp32 (fp16 on CUDA: half)",
    })
    print(f"(b) stylize / plain: {rows[-1]['ratio']:.2f}x time, {rows[-1]['flop_ratio']:.2f}x FLOPs", flush=True)
    del unet, controlnet, den


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------------------------------------
# (c) the whole job on CUDA


class _CountingDenoiser:
    """The job's denoiser with every `predict` call's FLOPs counted (`count=True`) or its time summed (synchronised
    on CUDA); everything else is the wrapped denoiser's."""

    def __init__(self, inner, device: str, count: bool):
        self._inner, self._device, self._count = inner, device, count
        self.flops, self.seconds, self.calls = 0, 0.0, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def predict(self, *args, **kwargs):
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        self.calls += 1
        if self._count:
            with FlopCounterMode(display=False) as counter:
                out = self._inner.predict(*args, **kwargs)
            self.flops += counter.get_total_flops()
            return out
        cuda = self._device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self._inner.predict(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return out


def bench_full_job(rows: list, model, size: int, frames: int, steps: int, label: str, peak_flops: float | None) -> None:
    """(c): the whole stylize job, twice (the first counts the denoiser's FLOPs and warms up), timed the second time."""
    import dataclasses

    import torch

    from concord.api.schemas import StylizeParams
    from concord.jobs.context import JobContext
    from concord.micro.animation import spinning_frames
    from concord.pipelines.denoiser import denoiser_from_model
    from concord.pipelines.stylize import ArraySource, stylize

    _texture_bench()._register_cpu_sdpa_flops()
    device = str(model.device)
    fs, prompt = spinning_frames(frames, size=size)  # in memory: the job's time, not the renderer's
    source = ArraySource(fs)
    params = StylizeParams(prompt=prompt, steps=steps, keyframes="explicit", keyframe_list=[0, frames // 2])
    base = denoiser_from_model(model, params.conditioning_scale)
    results = {}
    for count in (True, False):
        den = _CountingDenoiser(base.denoiser, device, count)
        parts = dataclasses.replace(base, denoiser=den)
        with tempfile.TemporaryDirectory(prefix="concord-bench-stylize-") as tmp:
            ctx = JobContext(Path(tmp) / "out", lambda *a: None, threading.Event())
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            m = stylize(model, params, source, Path(tmp) / "work", ctx, parts=parts)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            results[count] = (den, m, time.perf_counter() - t0)
    flops = results[True][0].flops
    den, m, total = results[False]
    cuda = device.startswith("cuda")
    peak = {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if cuda else {"peak_rss_mib": max_rss_mib()}
    rows.append({
        "part": "c",
        "case": f"{label}: whole job, {frames} frames {size}px, {m['params']['steps']} steps, CFG "
                f"{m['params']['guidance']}, keyframes {m['keyframes']}, {model.dtype}",
        "frames": frames,
        "s_per_frame": total / frames,
        "frames_s_per_frame": m["timings_s"]["frames_s"] / max(frames - len(m["keyframes"]), 1),
        "denoise_s": den.seconds,
        "denoiser_calls": den.calls,
        "tflop_job": flops / 1e12,
        "achieved_tflops": flops / den.seconds / 1e12 if den.seconds else None,
        "mfu": flops / den.seconds / peak_flops if (peak_flops and den.seconds) else None,
        **peak,
        "cache_mib": m["attention_cache_bytes"] / 2**20,
        "warp_err": m["warping_error"]["mean"],
        "input_warp_err": m["input_warping_error"]["mean"],
        "device": torch.cuda.get_device_name(0) if cuda else device,
        "note": "second of two runs (the first counts FLOPs, warms up); mfu = denoiser FLOPs / denoising time / "
                "989 TFLOPS" if peak_flops else "a check that (c)'s code runs; figures meaningless",
    })
    print(f"(c) {label}: {total / frames:.3f} s per frame", flush=True)


def real_size_model_cuda():
    """A real-size SD1.5 + depth ControlNet pipeline with random weights, fp16 on CUDA, as a LoadedModel."""
    import torch

    from concord.models import synthetic
    from concord.models.registry import KIND_RECOMMENDED, LoadedModel

    ckpt = synthetic.build("sd15", "real", dtype=torch.float16, device="cuda")
    pipe = synthetic.build_pipeline(ckpt)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda")
    return LoadedModel(name="sd15-random", kind="controlnet", pipe=pipe, device="cuda", dtype="float16",
                       recommended=KIND_RECOMMENDED["controlnet"])


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only (a), with 8 and 64 frames")
    ap.add_argument("--skip-cpu-real", action="store_true", help="skip (b), the real-size steps on the CPU")
    ap.add_argument("--lengths", type=int, nargs="+", help=f"(a)'s sequence lengths (default {' '.join(map(str, LENGTHS))})")
    ap.add_argument("--real-chunk", type=int, default=2, help="(b)'s frames per chunk (default 2)")
    ap.add_argument("--cuda-frames", type=int, default=24, help="(c)'s sequence length (default 24)")
    ap.add_argument("--gpu-path-check", action="store_true",
                    help="run only (c)'s code on the CPU with `tiny` at 64x64 (a check; no results file)")
    ap.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from concord.models.registry import quiet_libraries

    quiet_libraries()
    if args.child_length is not None:
        print(json.dumps(run_length(args.child_length)), flush=True)
        return 0
    import torch

    rows: list[dict] = []
    if args.gpu_path_check:
        from concord.models.registry import load_model

        bench_full_job(rows, load_model("tiny", "cpu"), 64, 5, 2, "tiny on the CPU (check)", None)
        print(json.dumps(rows, indent=2))  # a check: no results file
        return 0
    bench_lengths(rows, args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS))
    if not args.quick and not args.skip_cpu_real:
        bench_real_cpu(rows, chunk=args.real_chunk)
    if not args.quick:
        if torch.cuda.is_available():
            tex = _texture_bench()
            bench_full_job(rows, real_size_model_cuda(), 512, args.cuda_frames, REAL_STEPS, "SD1.5+ControlNet random",
                           tex.H100_FP16_DENSE)
        else:
            rows.append({"part": "c", "case": "whole job on CUDA, 512px, 20 steps, CFG, two keyframes, fp16",
                         "note": "skipped: no CUDA GPU here (target <= 0.2 s per frame on an H100)"})
            print("(c) skipped: no CUDA GPU", flush=True)
    report("stylize", rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
