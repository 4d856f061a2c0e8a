"""The one sampler loop (`concord.pipelines.sampler`, ARCHITECTURE rule 11): with no hooks it is the model's own
diffusers pipeline (tiny: StableDiffusionControlNetPipeline; micro: MicroPipeline), other schedulers run through it
unchanged, the x0 <-> model-output conversion is exact, micro's `clip_sample` is in force in texture jobs, and grid
filler cells are conditioned as background for every codec kind."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from concord.api.schemas import TextureParams
from concord.jobs.context import JobContext
from concord.models.registry import offline_status
from concord.pipelines import texture as T
from concord.pipelines.denoiser import ConcatDenoiser, ControlNetDenoiser, denoiser_from_model, ddim_step, eps_from_x0
from concord.pipelines.depth_image import depth_to_control
from concord.pipelines.sampler import (
    Hooks,
    abar_at,
    fresh_scheduler,
    guided_output,
    output_from_x0,
    sample,
    x0_from_output,
)

BOX = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "boxtextured" / "BoxTextured.glb"
PROMPT = "a wooden crate"
# No-hook equality with the model's own pipeline: the same operations in the same order, except that the pipelines
# encode the negative and positive prompts in separate text-encoder calls (batch 1 each) while the job encodes them
# as one batch of 2 -- batched fp32 matmuls may round differently. Measured max |difference| of the final latents:
# 0 on this CPU (tiny and micro); the tolerance allows float32 rounding noise.
ATOL = 1e-5

has_micro = offline_status("micro")[0]


@pytest.fixture(scope="module")
def views():
    from concord.geometry.mesh import load_mesh
    from concord.geometry.render import render_views
    from concord.geometry.rigs import parse_rig

    mesh = load_mesh(BOX)
    cams = parse_rig("zero123pp").with_frame(mesh.up, mesh.front).cameras(*mesh.bounding_sphere(), 64, 64)
    return render_views(mesh, [(c.K, c.world_to_camera) for c in cams], 64, 64).validate()


@pytest.fixture(scope="module")
def micro():
    from concord.micro.model import load_micro

    return load_micro()


def guided(den, emb, control, g: float):
    """The pipelines' classifier-free guidance over one batch [uncond, cond] (Ho & Salimans 2022)."""

    def model_output(xin, t):
        out = den.predict(torch.cat([xin, xin]), t, emb, control).float()
        u, c = out.chunk(2)
        return u + g * (c - u)

    return model_output


def tiny_parts(tiny_model, depth):
    parts = denoiser_from_model(tiny_model)
    img = torch.from_numpy(depth_to_control(depth))[None, None]
    ctrl = parts.denoiser.prepare_control(img, (8, 8))
    emb = parts.text_embeddings(PROMPT, "", guidance=True)
    return parts, img, guided(parts.denoiser, emb, ctrl.repeat(2, 1, 1, 1), 2.0)


def tiny_pipeline(tiny_model, scheduler):
    """The tiny model's own diffusers pipeline with another scheduler (the shared model is not changed)."""
    from diffusers import StableDiffusionControlNetPipeline

    comps = {**tiny_model.pipe.components, "scheduler": scheduler}
    pipe = StableDiffusionControlNetPipeline(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_no_hooks_equals_the_tiny_pipeline(tiny_model, views, name):
    """The loop with no hooks == StableDiffusionControlNetPipeline, same seed, for DDIM (the model's own) and two
    other schedulers built from the model's config (they run through the same loop unchanged)."""
    import diffusers

    sched = getattr(diffusers, name).from_config(tiny_model.pipe.scheduler.config)
    parts, img, model_output = tiny_parts(tiny_model, views.depth[0])
    with torch.no_grad():
        ref = tiny_pipeline(tiny_model, fresh_scheduler(sched))(
            PROMPT, image=img.expand(-1, 3, -1, -1), num_inference_steps=4, guidance_scale=2.0, height=64, width=64,
            generator=torch.Generator().manual_seed(7), output_type="latent",
        ).images
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
        ours = sample(model_output, sched, noise, 4, generator=torch.Generator().manual_seed(7))
    err = float((ours - ref).abs().max())
    print(f"{name}: max |ours - pipeline| = {err:.2e}")
    assert err <= ATOL
    assert float(ref.abs().max()) > 0.1  # not a vacuous comparison
    assert sched.num_inference_steps is None  # the scheduler given is not stepped: the loop steps a copy


@pytest.mark.skipif(not has_micro, reason="the micro weights are not installed")
def test_no_hooks_equals_the_micro_pipeline(micro, views):
    from concord.micro.model import micro_parts

    parts = micro_parts(micro)
    img = torch.from_numpy(depth_to_control(views.depth[1]))[None, None]
    ctrl = parts.denoiser.prepare_control(img, (32, 32))
    model_output = guided(parts.denoiser, parts.text_embeddings(PROMPT, "", guidance=True), ctrl.repeat(2, 1, 1, 1), 2.0)
    with torch.no_grad():
        ref = micro(PROMPT, depth=views.depth[1], num_inference_steps=4, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(5), output_type="pt")
        ref = ref.images if hasattr(ref, "images") else ref[0]
        noise = torch.randn((1, 12, 32, 32), generator=torch.Generator().manual_seed(5))
        ours = parts.codec.decode(sample(model_output, micro.scheduler, noise, 4))
    err = float((ours - torch.as_tensor(ref)).abs().max())
    print(f"micro: max |ours - pipeline| = {err:.2e}")
    assert err <= ATOL


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_x0_output_conversion_round_trips(ptype):
    g = torch.Generator().manual_seed(0)
    x_t, out, x0 = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for abar in (0.999, 0.5, 0.01):
        assert torch.allclose(output_from_x0(x0_from_output(out, x_t, abar, ptype), x_t, abar, ptype), out, atol=1e-12)
        assert torch.allclose(x0_from_output(output_from_x0(x0, x_t, abar, ptype), x_t, abar, ptype), x0, atol=1e-12)


def test_guided_output_spans_the_unconditional_and_conditional_halves():
    g = torch.Generator().manual_seed(1)
    u, c = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    out = torch.cat([u, c])
    assert torch.equal(guided_output(out, 0.0), u)
    assert torch.allclose(guided_output(out, 1.0), c, atol=1e-12)
    # linear in g: the guided outputs at g = 0, 1, 2, 3 are equally spaced by (c - u)
    steps = [guided_output(out, gs) for gs in (0.0, 1.0, 2.0, 3.0)]
    for a, b in zip(steps, steps[1:]):
        assert torch.allclose(b - a, c - u, atol=1e-12)
    with pytest.raises(ValueError, match="halves"):
        guided_output(torch.randn(3, 4), 2.0)


def test_modified_x0_goes_through_the_scheduler_as_the_synced_ddim_step(tiny_model, views):
    """An after_x0 hook on DDIM (no clipping) takes exactly the UV-synced DDIM step (MATH.md section 2:
    x_{t-1} = sqrt(abar_prev) x0s + sqrt(1 - abar_prev) eps', eps' re-derived from x_t), and an x0 returned as a new
    but equal tensor gives the no-hook result."""
    parts, _, model_output = tiny_parts(tiny_model, views.depth[0])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    sched = fresh_scheduler(tiny_model.pipe.scheduler)
    seen = []

    def halve(info, x0):
        seen.append(info.abar)
        return 0.5 * x0

    def record(xs):
        return lambda info, x: xs.append(x) or x

    with torch.no_grad():
        plain = sample(model_output, sched, noise, 3)
        same = sample(model_output, sched, noise, 3, Hooks(after_x0=lambda info, x0: x0.clone()))
        xs = []
        halved = sample(model_output, sched, noise, 3, Hooks(before_denoise=record(xs), after_x0=halve))
        # by hand: the old job loop's synced step with x0s = x0 / 2
        s = fresh_scheduler(sched)
        s.set_timesteps(3)
        stride = s.config.num_train_timesteps // 3
        for i, t in enumerate(s.timesteps):
            a, ti = abar_at(s, t), int(t)
            a_prev = float(s.alphas_cumprod[ti - stride]) if ti - stride >= 0 else float(s.final_alpha_cumprod)
            x0 = x0_from_output(model_output(xs[i], t), xs[i], a, "epsilon")
            x_next = ddim_step(0.5 * x0, eps_from_x0(xs[i], 0.5 * x0, a), a_prev)
            assert torch.allclose(x_next, xs[i + 1] if i + 1 < len(xs) else halved, atol=1e-5), i
    assert torch.allclose(same, plain, atol=1e-6)
    assert len(seen) == 3 and float((halved - plain).abs().max()) > 1e-3


class RecordingDDIM:
    """A DDIMScheduler subclass factory recording every x0 the scheduler used (its pred_original_sample, after
    clipping) and the config it was built from."""

    @staticmethod
    def make():
        from diffusers import DDIMScheduler

        class Rec(DDIMScheduler):
            x0s: list = []
            configs: list = []

            def step(self, model_output, timestep, sample, *a, **kw):
                out = super().step(model_output, timestep, sample, *a, **kw)
                Rec.x0s.append(out[1])
                if not Rec.configs or Rec.configs[-1] is not self.config:
                    Rec.configs.append(self.config)
                return out

        return Rec


def run_texture(model, views, out: Path, guidance: float = 2.0, **kw):
    params = TextureParams(prompt=PROMPT, seed=2, steps=3, guidance=guidance, texture_size=64,
                           consistency={"shared_attention": "off", "uv_sync": True})
    ctx = JobContext(out, lambda *a: None, threading.Event())
    return T.run(model, params, views.to_npz_dict(), ctx, **kw)


@pytest.mark.skipif(not has_micro, reason="the micro weights are not installed")
def test_micro_clip_sample_is_in_force_in_texture_jobs(views, tmp_path):
    """micro's scheduler config sets clip_sample: its texture job builds the scheduler from that config and every
    x0 the scheduler steps with is within the clip range. That the clip acts is checked by an equality the
    scheduler guarantees, whatever the weights: the first step sees the same latents and the same model output
    with and without clipping, so its clipped x0 is exactly the unclipped one clamped to the range. A range of 0.5
    makes the clamp bite (a trained model's x0 reaches the white background's latent values near 1; whether it
    passes 1 itself depends on the weights: the shipped ones stay under it at guidance 8)."""
    from concord.micro.model import micro_parts
    from concord.models.registry import load_model

    model = load_model("micro", "cpu")
    assert model.pipe.scheduler.config.clip_sample
    Rec = RecordingDDIM.make()
    m = run_texture(model, views, tmp_path / "on", guidance=8.0, scheduler=Rec)
    assert m["scheduler"] == "Rec" and Rec.configs[-1].clip_sample and len(Rec.x0s) == 3
    limit = float(Rec.configs[-1].clip_sample_range)
    assert max(float(x.abs().max()) for x in Rec.x0s) <= limit

    def first_x0(**config):
        Rec.x0s.clear()
        parts = micro_parts(model.pipe)
        parts.scheduler_config = {**parts.scheduler_config, **config}
        run_texture(model, views, tmp_path / str(len(Rec.configs)), guidance=8.0, scheduler=Rec, parts=parts)
        assert all(Rec.configs[-1][k] == v for k, v in config.items())
        return [x.clone() for x in Rec.x0s]

    unclipped = first_x0(clip_sample=False)
    clipped = first_x0(clip_sample=True, clip_sample_range=0.5)
    print(f"micro texture job, first step max |x0| without clip_sample: {float(unclipped[0].abs().max()):.2f}")
    assert float(unclipped[0].abs().max()) > 0.5
    assert torch.allclose(clipped[0], unclipped[0].clamp(-0.5, 0.5), atol=1e-6)
    assert max(float(x.abs().max()) for x in clipped) <= 0.5


def test_texture_job_runs_on_another_scheduler(tiny_model, views, tmp_path):
    """The texture job with UV sync on EulerDiscreteScheduler (from the model's config): the same loop, every
    step synced, finite results."""
    from diffusers import EulerDiscreteScheduler

    m = run_texture(tiny_model, views, tmp_path / "euler", scheduler=EulerDiscreteScheduler)
    assert m["scheduler"] == "EulerDiscreteScheduler" and m["synced_steps"] == 3
    assert m["disagreement"] is not None and np.isfinite(m["disagreement"])


def _denoisers(tiny_model, micro):
    from diffusers import UNet2DConditionModel

    yield "controlnet", denoiser_from_model(tiny_model).denoiser
    unet = UNet2DConditionModel(**{**tiny_model.pipe.unet.config, "in_channels": 5})
    yield "concat (SD2-depth)", ConcatDenoiser(unet)
    if micro is not None:
        from concord.micro.model import micro_parts

        yield "micro", micro_parts(micro).denoiser


def test_grid_filler_cells_are_conditioned_as_background(tiny_model, views, request):
    """For every codec kind: a filler cell's prepared control equals that of an all-background view (depth 0
    everywhere), and for the depth-concatenating kinds that is -1 (no object), not the mid-depth 0."""
    micro = request.getfixturevalue("micro") if has_micro else None
    control = torch.from_numpy(np.stack([depth_to_control(d) for d in views.depth]))[:, None]
    background = torch.from_numpy(depth_to_control(np.zeros((64, 64), np.float32)))[None, None]
    kinds = []
    for name, den in _denoisers(tiny_model, micro):
        hw = (32, 32) if name == "micro" else (8, 8)
        prepared = T.state_control(den, control, 8, hw)
        assert prepared.shape[0] == 8
        want = den.prepare_control(background, hw)[0]
        for k in (6, 7):
            assert torch.equal(prepared[k], want), (name, k)
        assert torch.equal(prepared[:6], den.prepare_control(control, hw)), name
        if not isinstance(den, ControlNetDenoiser):
            assert float(want.max()) == -1.0, name
        kinds.append(name)
    print("checked:", kinds)
