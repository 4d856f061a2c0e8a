"""One denoising loop for every job kind (ARCHITECTURE rule 11), stepping through the loaded model's own diffusers
scheduler, with hooks at the points the consistency methods need.

    sample(model_output, scheduler, latents, steps, hooks=Hooks(...), generator=...) -> final latents

- `model_output(x_in, t) -> out`: the job's (guided) model call on the scheduler-scaled input (classifier-free
  guidance, grid tiling, control maps are the job's business); `out` is in the scheduler's `prediction_type`.
- `scheduler`: a diffusers scheduler; `sample` steps a private copy of it (`fresh_scheduler`), so concurrent jobs
  never share its state and the model's own scheduler is never touched. DDIM by default (the model's config);
  `clip_sample`, `thresholding`, other schedulers (Euler, DPM-Solver++) work unchanged because the step is
  `scheduler.step` itself.
- `Hooks` (all optional):
    before_step(i)                 every step, first: cancel checks
    before_denoise(info, x) -> x   before the denoiser call: loss guidance (SyncDiffusion)
    after_x0(info, x0) -> x0       after the guided x0 prediction: UV sync, window averaging, latent blending
    after_step(i + 1)              every step, last: progress
  A modified x0 goes back to the scheduler as a model output of its prediction type (`output_from_x0`); an x0
  returned unchanged (the same tensor object) passes the model's own output through untouched, so a loop with no
  hooks is exactly the model's own pipeline loop.

What this module must never do: know about views, grids, UV maps or jobs; change the scheduler it is given.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "Hooks",
    "StepInfo",
    "sample",
    "fresh_scheduler",
    "abar_at",
    "x0_from_output",
    "output_from_x0",
    "guided_output",
    "SCHEDULER_PREDICTION_TYPES",
]

SCHEDULER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ---------------------------------------------------------------------------------------------------------------
# Conversions between a model output and the clean-sample prediction x0, at noise level abar = alphas_cumprod[t],
# on the variance-preserving input x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (Ho et al. 2020, eq. 4; for a
# variance-exploding scheduler such as Euler, x_t is its scaled model input x / sqrt(sigma^2 + 1), and
# abar = 1 / (1 + sigma^2)).
#   epsilon   (Ho et al. 2020):             x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
#                                           eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
#                                           (the re-derivation of DDIM, Song et al. 2021, eq. 12's "predicted x0")
#   v_prediction (Salimans & Ho 2022, "Progressive Distillation", section 4 / appendix D):
#                                           v = sqrt(abar) eps - sqrt(1 - abar) x0
#                                           x0 = sqrt(abar) x_t - sqrt(1 - abar) v
#   sample:                                 out = x0
def _coef(abar, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(abar, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32, device=like.device)
    return a.sqrt(), (1.0 - a).sqrt()


def x0_from_output(out: torch.Tensor, x_t: torch.Tensor, abar, prediction_type: str) -> torch.Tensor:
    """The clean-sample prediction x0 from a model output `out` at the (scaled, VP) input x_t."""
    sa, sb = _coef(abar, x_t)
    if prediction_type == "epsilon":
        return (x_t - sb * out) / sa
    if prediction_type == "v_prediction":
        return sa * x_t - sb * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"prediction_type must be one of {SCHEDULER_PREDICTION_TYPES}, got {prediction_type!r}")


def output_from_x0(x0: torch.Tensor, x_t: torch.Tensor, abar, prediction_type: str) -> torch.Tensor:
    """The model output of `prediction_type` whose x0 is `x0` at input x_t (inverse of `x0_from_output`); the
    noise is re-derived from x_t and x0 so that (x0, eps) is an exact decomposition of x_t."""
    sa, sb = _coef(abar, x_t)
    if prediction_type == "sample":
        return x0
    eps = (x_t - sa * x0) / sb
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return sa * eps - sb * x0
    raise ValueError(f"prediction_type must be one of {SCHEDULER_PREDICTION_TYPES}, got {prediction_type!r}")


# Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6, written with
# w = g - 1):   out = out_u + g (out_c - out_u)
# on a batch that holds the unconditional half first and the conditional half second; g = 1 is the conditional
# output, g = 0 the unconditional one. Linear in the output, so it holds for epsilon, v and x0 predictions alike.
def guided_output(out: torch.Tensor, guidance: float) -> torch.Tensor:
    """The guided model output from a batch `out` = [unconditional; conditional] (two equal halves along dim 0)."""
    if out.shape[0] % 2:
        raise ValueError(f"guided_output: a batch of {out.shape[0]} is not an [unconditional; conditional] pair of halves")
    u, c = out.chunk(2)
    return u + guidance * (c - u)


def abar_at(scheduler, t) -> float:
    """alphas_cumprod at timestep t; a fractional t (Euler's interpolated timesteps) interpolates sigma =
    sqrt((1 - abar) / abar) linearly, as those schedulers do, and returns 1 / (1 + sigma^2)."""
    ac = scheduler.alphas_cumprod
    tf = float(t)
    lo = int(tf)
    if tf == lo:
        return float(ac[lo])
    hi = min(lo + 1, len(ac) - 1)
    s_lo, s_hi = (float((1 - ac[k]) / ac[k]) ** 0.5 for k in (lo, hi))
    s = s_lo + (tf - lo) * (s_hi - s_lo)
    return 1.0 / (1.0 + s * s)


def fresh_scheduler(scheduler_or_class, config: dict | None = None):
    """A new scheduler of the same class and config (`Scheduler.from_config`): a private copy for one job.
    `scheduler_or_class` is a scheduler instance (its config is used unless `config` is given) or a class."""
    if isinstance(scheduler_or_class, type):
        return scheduler_or_class.from_config(dict(config or {}))
    return type(scheduler_or_class).from_config(dict(config if config is not None else scheduler_or_class.config))


@dataclass
class StepInfo:
    """What a hook knows about the current step. `predict_x0(x)` runs the same (guided) model call as the step on
    an unscaled sample x and returns its x0 (differentiable when called under torch.enable_grad)."""

    index: int
    total: int
    t: object
    abar: float
    predict_x0: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Hooks:
    before_step: Callable[[int], None] | None = None
    before_denoise: Callable[[StepInfo, torch.Tensor], torch.Tensor] | None = None
    after_x0: Callable[[StepInfo, torch.Tensor], torch.Tensor] | None = None
    after_step: Callable[[int], None] | None = None


def sample(
    model_output: Callable[[torch.Tensor, object], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    steps: int,
    hooks: Hooks | None = None,
    generator: torch.Generator | None = None,
    device=None,
    copy_scheduler: bool = True,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Denoise `latents` (unit-variance noise, float32) over `steps` steps of `scheduler` (a private copy unless
    copy_scheduler=False). Returns the final latents (float32). Multiplies the noise by `init_noise_sigma` and
    feeds the model `scale_model_input`'s output, as diffusers' pipelines do.

    img2img (SDEdit, Meng et al. 2022): with `init` (clean latents) and `strength` < 1, only the last
    round(steps * strength) timesteps run, from `scheduler.add_noise(init, latents, t_start)` -- diffusers'
    img2img pipelines' `get_timesteps` rule, so a strength means what it means there."""
    hooks = hooks or Hooks()
    sched = fresh_scheduler(scheduler) if copy_scheduler else scheduler
    device = device if device is not None else latents.device
    sched.set_timesteps(steps, device=device)
    ptype = sched.config.get("prediction_type", "epsilon")
    step_kw = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    timesteps = sched.timesteps
    if init is not None and strength < 1.0:
        run = min(max(int(steps * strength), 1), steps)
        start = (steps - run) * getattr(sched, "order", 1)
        timesteps = timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        noise = latents.to(device=device, dtype=torch.float32)
        x = sched.add_noise(init.to(device=device, dtype=torch.float32), noise, timesteps[:1].repeat(noise.shape[0]))
    else:
        x = latents.to(device=device, dtype=torch.float32) * sched.init_noise_sigma
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if hooks.before_step is not None:
            hooks.before_step(i)
        abar = abar_at(sched, t)

        def predict_x0(xx, _t=t, _a=abar):
            xin = sched.scale_model_input(xx, _t)
            return x0_from_output(model_output(xin, _t).float(), xin, _a, ptype)

        info = StepInfo(i, total, t, abar, predict_x0)
        if hooks.before_denoise is not None:
            x = hooks.before_denoise(info, x)
        xin = sched.scale_model_input(x, t)
        out = model_output(xin, t).float()
        if hooks.after_x0 is not None:
            x0 = x0_from_output(out, xin, abar, ptype)
            x0_new = hooks.after_x0(info, x0)
            if x0_new is not x0:
                out = output_from_x0(x0_new, xin, abar, ptype)
        x = sched.step(out, t, x, return_dict=False, **step_kw)[0]
        if hooks.after_step is not None:
            hooks.after_step(i + 1)
    return x
