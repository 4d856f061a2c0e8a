"""What every diffusion job does before its first denoising step, written once: the model's sampler parts, the
settings the request left out filled from the model's recommended ones, the latent size, and a private copy of the
model's own scheduler (ARCHITECTURE rule 11: every job steps the model's scheduler class and config).

What this module must never do: know a job kind's inputs beyond their pixel size, or change the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from concord.errors import JobInputError

__all__ = ["JobSetup", "prepare_job", "job_scheduler"]


@dataclass
class JobSetup:
    parts: object  # concord.pipelines.denoiser.DiffusionParts
    params: object  # the job's params with omitted settings filled in
    settings: dict  # {name: {"value", "source": "user" | "model"}}
    recommended: object  # concord.models.recommended.RecommendedSettings
    latent_hw: tuple[int, int]


def prepare_job(model, params, kind: str, width: int, height: int, field: str, parts=None) -> JobSetup:
    """The sampler parts (`denoiser_from_model` unless `parts` is given), the params with the model's recommended
    settings where the request left them out (`resolve_job_settings`), and the latent size; JobInputError naming
    `field` when width x height does not divide into the codec's latent pixels."""
    from concord.models.recommended import resolve_job_settings
    from concord.models.registry import model_settings
    from concord.pipelines.denoiser import denoiser_from_model

    if parts is None:
        parts = denoiser_from_model(model, params.conditioning_scale)
    recommended = model_settings(model, parts.kind)
    params, settings = resolve_job_settings(params, recommended, kind)
    f = parts.codec.scale_factor
    if height % f or width % f:
        raise JobInputError(f"pictures of {width}x{height} px do not divide into {f}x{f} latent pixels", field)
    return JobSetup(parts, params, settings, recommended, (height // f, width // f))


def job_scheduler(model, parts, scheduler=None):
    """A private scheduler for one job: the class of `scheduler` (a class or an instance) if given, else of the
    model's own pipeline scheduler, else the class its config names (DDIM when none), on the parts' config."""
    import diffusers

    from concord.pipelines.sampler import fresh_scheduler

    base = scheduler if scheduler is not None else getattr(getattr(model, "pipe", None), "scheduler", None)
    if base is None:
        base = getattr(diffusers, dict(parts.scheduler_config).get("_class_name") or "DDIMScheduler")
    return fresh_scheduler(base if isinstance(base, type) else type(base), parts.scheduler_config)
