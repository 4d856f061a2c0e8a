"""Benchmark of the texture job's sampler: table on stdout, JSON at bench/results/texture.json.

(a) UV sync per diffusion step: `LatentSync.sync` on six 64x64x4 latents (SD's latent size for 512^2 views), the
    views of the barrel fixture through the Zero123++ rig; plus the one-time build.
(b) One denoising step of a REAL-SIZE Stable Diffusion 1.5 UNet + depth ControlNet (diffusers classes built from
    SD1.5's config with random weights: same FLOPs and time as the real checkpoint) for six 512x512 views under
    classifier-free guidance, fp32 on the CPU (fp16 on CUDA):
      - plain:  batch 12 (2 CFG halves x 6 views) at 64x64 latents, ordinary self-attention
      - shared: the same batch, extended self-attention across the 6 views of each half
      - grid:   3x2 grid stacking, batch 2 of one 192x128 latent canvas each
    per configuration: seconds per step, FLOPs per step counted by torch.utils.flop_counter.FlopCounterMode on the
    same models built on the meta device (no compute; attention included: torch 2.13 has no formula for the CPU
    flash-attention op, so one is registered here with torch's own `sdpa_flop_count`), peak memory (CPU: the rise of the process's max RSS, resource.getrusage -- a high-water mark, so
    configurations run in increasing expected memory; CUDA: torch.cuda.max_memory_allocated).
(c) CUDA only: the whole job (`concord.pipelines.texture.run`) -- six 512x512 views, 30 steps, CFG, shared attention,
    UV sync and noise, fp16 -- on a real-size random-weight SD1.5 ControlNet pipeline, with its model FLOPs
    utilisation: counted denoising FLOPs / denoising time / the GPU's peak (H100 SXM dense fp16: 989 TFLOPS).

Usage: ``python bench/texture.py [--quick] [--steps-cpu 1]``. --quick skips (c); on the CPU one timed step per
configuration is the default (a real-size step takes 1-6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import report, timed  # noqa: E402

MESH = ROOT / "tests" / "fixtures" / "meshes" / "barrel" / "barrel.glb"
H100_FP16_DENSE = 989e12

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)


def barrel_views(size: int = 512):
    from concord.geometry.mesh import load_mesh
    from concord.geometry.render import render_views
    from concord.geometry.rigs import zero123pp

    mesh = load_mesh(MESH)
    c, r = mesh.bounding_sphere()
    cams = zero123pp(mesh.up, mesh.front).cameras(c, r, size, size)
    return render_views(mesh, [(k.K, k.world_to_camera) for k in cams], size, size).validate()


def bench_sync(rows: list, runs: int) -> None:
    from concord.geometry.sync import LatentSync

    vs = barrel_views(512)
    t0 = time.perf_counter()
    sync = LatentSync.from_viewset(vs, (64, 64), device="cpu", dtype=torch.float32)
    build = time.perf_counter() - t0
    x0 = torch.randn(6, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    t = timed(lambda: sync.sync(x0), repeat=runs)
    rows.append({"case": "uv_sync per step (6x4x64x64)", "seconds": t["median_s"], "build_s": build, "device": "cpu"})


def sd15_models(device: str, dtype):
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    if device == "meta":
        return unet, ControlNetModel.from_unet(unet)
    controlnet = ControlNetModel.from_unet(unet)
    return unet.to(device, dtype).eval(), controlnet.to(device, dtype).eval()


def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode counts CUDA's SDPA kernels but not the CPU flash-attention op: register torch's formula."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fc.flop_registry:
        return

    @fc.register_flop_formula(op)
    def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(configs, views: int) -> dict:
    """FLOPs of one denoiser call per configuration, on meta-device copies of the models (shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from concord.attention.extended import extended_attention
    from concord.pipelines.denoiser import ControlNetDenoiser

    _register_cpu_sdpa_flops()
    with torch.device("meta"):
        unet, controlnet = sd15_models("meta", torch.float32)
    den = ControlNetDenoiser(unet, controlnet)
    out = {}
    for name, x, c, e, shared in configs:
        ctx = extended_attention([unet, controlnet], views) if shared else _null()
        with ctx, torch.no_grad(), FlopCounterMode(display=False) as counter:
            den.predict(x.to("meta"), torch.tensor(500, device="meta"), e.to("meta", torch.float32), c.to("meta"))
        out[name] = counter.get_total_flops()
    return out


def _peak_start(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB on Linux


def _peak_mib(device: str, start: float) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - start


def bench_step(rows: list, device: str, quick: bool, steps: int) -> dict:
    from concord.attention.extended import extended_attention
    from concord.pipelines.denoiser import ControlNetDenoiser
    from concord.pipelines.texture import tile_views

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    unet, controlnet = sd15_models(device, dtype)
    build_s = time.perf_counter() - t0
    den = ControlNetDenoiser(unet, controlnet)
    g = torch.Generator().manual_seed(1)
    views, halves = 6, 2
    lat = torch.randn(views * halves, 4, 64, 64, generator=g).to(device)
    ctrl = torch.rand(views * halves, 3, 512, 512, generator=g).to(device)
    emb = torch.randn(halves, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    grid_lat = torch.cat([tile_views(h_, 3, 2) for h_ in lat.chunk(halves)])
    grid_ctrl = torch.cat([tile_views(h_, 3, 2) for h_ in ctrl.chunk(halves)])
    configs = [  # increasing measured peak memory (max RSS is a high-water mark)
        ("plain (batch 12 @ 64x64)", lat, ctrl, emb.repeat_interleave(views, 0), False),
        ("grid 3x2 (batch 2 @ 192x128)", grid_lat, grid_ctrl, emb, False),
        ("shared attention (batch 12 @ 64x64)", lat, ctrl, emb.repeat_interleave(views, 0), True),
    ]
    flops_by = count_flops(configs, views)
    out = {}
    for name, x, c, e, shared in configs:
        ctx = extended_attention([unet, controlnet], views, chunk_size=None) if shared else _null()
        with ctx, torch.no_grad():
            start = _peak_start(device)

            def one():
                den.predict(x, t, e, c)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()

            step_s = timed(one, repeat=steps, warmup=0 if device == "cpu" else 1)["median_s"]
            peak = _peak_mib(device, start)
        flops = flops_by[name]
        out[name] = {"flops": flops, "seconds": step_s}
        rows.append(
            {
                "case": f"SD1.5+ControlNet step, {name}",
                "seconds": step_s,
                "tflop_per_step": flops / 1e12,
                "achieved_tflops": flops / step_s / 1e12,
                "peak_mem_mib": peak,
                "device": f"{device} {str(dtype).replace('torch.', '')}",
                "build_s": build_s,
                "timing": f"median of {steps}",
            }
        )
    base = out["plain (batch 12 @ 64x64)"]
    sh = out["shared attention (batch 12 @ 64x64)"]
    rows.append(
        {
            "case": "shared / plain",
            "seconds": sh["seconds"] / base["seconds"],
            "tflop_per_step": sh["flops"] / base["flops"],
            "device": device,
        }
    )
    del unet, controlnet
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def bench_full_job_cuda(rows: list, step_flops: float) -> None:
    """(c): the whole job on CUDA in fp16 with its MFU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionControlNetPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from concord.api.schemas import TextureParams
    from concord.jobs.context import JobContext
    from concord.models.registry import LoadedModel
    from concord.models.tiny import build_tokenizer
    from concord.pipelines import texture

    unet, controlnet = sd15_models("cuda", torch.float16)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
    ).to("cuda", torch.float16)
    tok = build_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                       vocab_size=max(len(tok), 1000), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    ).to("cuda", torch.float16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, controlnet=controlnet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    model = LoadedModel(name="sd15-random", kind="controlnet", pipe=pipe, device="cuda", dtype="float16")
    arrays = barrel_views(512).to_npz_dict()
    params = TextureParams.model_validate({"prompt": "a barrel", "steps": 30, "texture_size": 1024})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ctx = JobContext(Path(tmp), lambda *a: None, threading.Event())
        texture.run(model, params, arrays, ctx)  # warm-up (kernels, allocator)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        m = texture.run(model, params, arrays, ctx)
        total = time.perf_counter() - t0
    den_s = m["timings_s"]["denoising_s"]
    flops = step_flops * 30
    rows.append(
        {
            "case": "full job, 6x512^2, 30 steps, CFG, shared attn, fp16",
            "seconds": total,
            "denoising_s": den_s,
            "tflop_per_step": step_flops / 1e12,
            "achieved_tflops": flops / den_s / 1e12,
            "mfu": flops / den_s / H100_FP16_DENSE,
            "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20,
            "device": torch.cuda.get_device_name(0),
        }
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one step per configuration; no full CUDA job")
    ap.add_argument("--steps-cpu", type=int, default=1, help="timed steps per configuration on the CPU")
    ap.add_argument("--runs", type=int, default=5, help="runs of the UV sync timing")
    args = ap.parse_args(argv)
    from concord.models.registry import quiet_libraries

    quiet_libraries()
    rows: list[dict] = []
    bench_sync(rows, args.runs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = args.steps_cpu if device == "cpu" else 5
    out = bench_step(rows, device, args.quick, steps)
    rows.append(
        {
            "case": "grid / plain",
            "seconds": out["grid 3x2 (batch 2 @ 192x128)"]["seconds"] / out["plain (batch 12 @ 64x64)"]["seconds"],
            "tflop_per_step": out["grid 3x2 (batch 2 @ 192x128)"]["flops"] / out["plain (batch 12 @ 64x64)"]["flops"],
            "device": device,
        }
    )
    if device == "cuda" and not args.quick:
        bench_full_job_cuda(rows, out["shared attention (batch 12 @ 64x64)"]["flops"])
    report(
        "texture",
        rows,
        ["case", "seconds", "tflop_per_step", "achieved_tflops", "mfu", "peak_mem_mib", "build_s", "device", "timing"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
