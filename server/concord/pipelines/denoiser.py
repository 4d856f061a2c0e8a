"""What a multi-view sampler talks to instead of "Stable Diffusion": a `Codec` and a `Denoiser` (ARCHITECTURE rule 7).

The consistency code (shared attention, UV sync, UV noise, grid stacking; `concord.pipelines.texture`) never
reaches into a UNet, a VAE or a text encoder. It sees:

- a **Codec**: images in [0, 1] shaped (B, 3, H, W) <-> latents (B, C, H / f, W / f), with `scale_factor` f and
  `latent_channels` C. `VaeCodec` wraps a diffusers `AutoencoderKL` (and applies its `scaling_factor` and
  `shift_factor`); `PixelUnshuffleCodec` is the exact, parameter-free codec of a pixel-space model (space-to-depth
  of [-1, 1] pixels), so a small pixel model can join with no VAE.
- a **Denoiser**: `predict(x_t, t, text_embeddings, control) -> model output`, with its `prediction_type`
  ("epsilon" or "v_prediction"), `prepare_control(...)` saying what the conditioning looks like for this model, and
  `modules` (the networks whose self-attention a shared-attention mode patches). `ControlNetDenoiser` feeds a depth
  ControlNet's residuals into the UNet (SD1.5 + ControlNet); `ConcatDenoiser` concatenates the depth to the input
  channels (SD2-depth, and the shape a micro pixel-space model with depth input takes).
- pure conversion helpers (`x0_and_eps_from_output`, `output_from_x0_and_eps`, `eps_from_x0`, `ddim_step`) with
  the formulas written above them.

`denoiser_from_model(loaded_model)` assembles the parts through the model registry's table "kind -> parts
factory" (`concord.models.registry.PARTS_FACTORIES`, ARCHITECTURE rule 12). This module holds the factories of
the two diffusers architectures: `controlnet_parts` (UNet + depth ControlNet + VAE + CLIP) and
`depth_concat_parts` (SD2-depth: depth concatenated to the UNet input); a concrete model (e.g. `micro`) brings its
own factory in its own package, and the registry names it. SDXL is refused there with a clear JobInputError.

What this module must never do: change a model it is given (no offload, no scheduler swap, no attention processor
installation, no dtype/device moves), perform I/O, know about views, grids or UV maps, or import a concrete model
(`concord.micro`, `concord.models.tiny`) or dispatch on model kinds: those are the registry's
(tests/server/test_layering.py checks the imports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from concord.errors import JobInputError
from concord.models.registry import parts_factory

__all__ = [
    "Codec",
    "VaeCodec",
    "PixelUnshuffleCodec",
    "Denoiser",
    "ControlNetDenoiser",
    "ConcatDenoiser",
    "DiffusionParts",
    "denoiser_from_model",
    "controlnet_parts",
    "depth_concat_parts",
    "encode_prompt",
    "x0_and_eps_from_output",
    "output_from_x0_and_eps",
    "eps_from_x0",
    "ddim_step",
    "PREDICTION_TYPES",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")


# ---------------------------------------------------------------------------------------------------------------
# Conversions between what a model predicts and (x0, eps). `abar` is the cumulative product of alphas at t
# (diffusers' `alphas_cumprod[t]`): x_t = sqrt(abar) x0 + sqrt(1 - abar) eps  (Ho et al. 2020, eq. 4).


def _broadcast(abar, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(abar, dtype=torch.float32, device=like.device)
    while a.dim() < like.dim():
        a = a.unsqueeze(-1)
    return a


# epsilon-prediction (Ho et al. 2020, eq. 15 rearranged):
#   x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar),   eps = model output
# v-prediction (Salimans & Ho 2022, "Progressive Distillation", section 4 / appendix D), v = sqrt(abar) eps -
# sqrt(1 - abar) x0:
#   x0 = sqrt(abar) x_t - sqrt(1 - abar) v,          eps = sqrt(1 - abar) x_t + sqrt(abar) v
def x0_and_eps_from_output(
    model_output: torch.Tensor, x_t: torch.Tensor, abar, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a model's output at noise level `abar` (float or broadcastable tensor)."""
    a = _broadcast(abar, x_t)
    sa, sb = a.sqrt(), (1.0 - a).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sb * eps) / sa
    elif prediction_type == "v_prediction":
        x0 = sa * x_t - sb * model_output
        eps = sb * x_t + sa * model_output
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return x0, eps


# The inverse map, (x0, eps) -> what the model would have output:
#   epsilon: output = eps;   v_prediction: output = v = sqrt(abar) eps - sqrt(1 - abar) x0   (Salimans & Ho 2022)
def output_from_x0_and_eps(x0: torch.Tensor, eps: torch.Tensor, abar, prediction_type: str) -> torch.Tensor:
    a = _broadcast(abar, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1.0 - a).sqrt() * x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


# The noise that makes (x0, eps) an exact decomposition of x_t (Ho et al. 2020, eq. 4 solved for eps; the same
# re-derivation diffusers' DDIM does for `use_clipped_model_output`, after GLIDE):
#   eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar) -> torch.Tensor:
    a = _broadcast(abar, x_t)
    return (x_t - a.sqrt() * x0) / (1.0 - a).sqrt()


# Deterministic DDIM update (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12 with
# eta = 0, so sigma_t = 0):
#   x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) eps
def ddim_step(x0: torch.Tensor, eps: torch.Tensor, abar_prev) -> torch.Tensor:
    a = _broadcast(abar_prev, x0)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * eps


# ---------------------------------------------------------------------------------------------------------------
# Codecs


class Codec:
    """Images in [0, 1] (B, 3, H, W) <-> latents (B, latent_channels, H / scale_factor, W / scale_factor)."""

    scale_factor: int
    latent_channels: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class VaeCodec(Codec):
    """A diffusers AutoencoderKL. Latents are scaled the way the UNet was trained on them:
    z = (E(2 img - 1) - shift) * scaling_factor  and  img = (D(z / scaling_factor + shift) + 1) / 2  (Rombach et al.
    2022, section 3.1 / appendix G; `shift_factor` is 0 for SD1.x/2.x/XL and non-zero for SD3/Flux VAEs).
    The encoder uses the posterior mean (deterministic)."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = (2.0 * images - 1.0).to(self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mean
        return ((z.float() - self.shift) * self.scaling)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents.float() / self.scaling + self.shift).to(self.vae.dtype)
        img = self.vae.decode(z).sample
        return (img.float() / 2.0 + 0.5).clamp(0.0, 1.0)


class PixelUnshuffleCodec(Codec):
    """A pixel-space model's codec: space-to-depth of [-1, 1] pixels (exact, no parameters).

    latents = pixel_unshuffle(2 img - 1, f) with `channels * f**2` channels; decode is its exact inverse (then
    clamped to [0, 1]). `factor=1` is the identity codec."""

    def __init__(self, factor: int = 1, channels: int = 3):
        if factor < 1 or channels < 1:
            raise ValueError("factor and channels must be >= 1")
        self.scale_factor = int(factor)
        self.channels = int(channels)
        self.latent_channels = self.channels * self.scale_factor**2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(2.0 * images.float() - 1.0, self.scale_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (F.pixel_shuffle(latents.float(), self.scale_factor) / 2.0 + 0.5).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Denoisers


class Denoiser:
    """`predict(x_t, t, text_embeddings, control)` -> the model's output for a batch (eps or v).

    `control` is whatever `prepare_control` made of a [0, 1] depth-control map (B, 1, H, W) at image resolution:
    its spatial size says where it lives (image or latent resolution), so grid stacking can tile it like latents.
    `modules` are the networks whose self-attention (`attn1`) shared-attention modes patch.
    """

    prediction_type: str = "epsilon"
    latent_channels: int = 4

    @property
    def modules(self) -> list[torch.nn.Module]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.modules[0].dtype

    def prepare_control(self, control: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, t, text_embeddings: torch.Tensor, control: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _check_prediction_type(p: str) -> str:
    if p not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {p!r}")
    return p


class ControlNetDenoiser(Denoiser):
    """UNet + depth ControlNet (Zhang et al. 2023): the ControlNet sees the control map at image resolution
    (3 channels in [0, 1], as diffusers' ControlNet pipelines feed it) and adds its residuals, times
    `conditioning_scale`, to the UNet's skip connections and middle block."""

    def __init__(self, unet, controlnet, conditioning_scale: float = 1.0, prediction_type: str = "epsilon"):
        self.unet = unet
        self.controlnet = controlnet
        self.conditioning_scale = float(conditioning_scale)
        self.prediction_type = _check_prediction_type(prediction_type)
        self.latent_channels = int(unet.config.out_channels)

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.controlnet]

    def prepare_control(self, control: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        return control.float().expand(-1, 3, -1, -1).contiguous()

    def predict(self, x_t, t, text_embeddings, control):
        dt = self.unet.dtype
        x = x_t.to(dt)
        emb = text_embeddings.to(dt)
        down, mid = self.controlnet(
            x,
            t,
            encoder_hidden_states=emb,
            controlnet_cond=control.to(dt),
            conditioning_scale=self.conditioning_scale,
            return_dict=False,
        )
        return self.unet(
            x,
            t,
            encoder_hidden_states=emb,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


class ConcatDenoiser(Denoiser):
    """A UNet whose input is [x_t, depth] along channels (SD2-depth: 4 + 1 channels; a pixel-space model with depth
    input alike). The depth control is resized to latent resolution (bicubic) and mapped [0, 1] -> [-1, 1], as
    diffusers' StableDiffusionDepth2ImgPipeline does with its (near = bright, per-image normalised) depth map.
    `text_embeddings` may be None for an unconditional model (then `encoder_hidden_states` is not passed)."""

    def __init__(self, unet, prediction_type: str = "epsilon"):
        self.unet = unet
        self.prediction_type = _check_prediction_type(prediction_type)
        self.latent_channels = int(unet.config.out_channels)
        self.control_channels = int(unet.config.in_channels) - self.latent_channels
        if self.control_channels < 1:
            raise ValueError("ConcatDenoiser needs a UNet with more input than output channels")

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.unet]

    def prepare_control(self, control: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        c = control.float()
        if tuple(c.shape[-2:]) != tuple(latent_hw):
            c = F.interpolate(c, size=tuple(latent_hw), mode="bicubic", align_corners=False)
        c = 2.0 * c.clamp(0.0, 1.0) - 1.0
        return c.expand(-1, self.control_channels, -1, -1).contiguous()

    def predict(self, x_t, t, text_embeddings, control):
        dt = self.unet.dtype
        x = torch.cat([x_t.to(dt), control.to(dt)], dim=1)
        kw = {} if text_embeddings is None else {"encoder_hidden_states": text_embeddings.to(dt)}
        return self.unet(x, t, return_dict=False, **kw)[0]


# ---------------------------------------------------------------------------------------------------------------
# Text conditioning and assembly from a loaded model


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings (N, L, D), padded to the tokenizer's max length (as Stable Diffusion's pipelines do)."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


@dataclass
class DiffusionParts:
    """Everything a sampler needs from a model, and nothing else."""

    denoiser: Denoiser
    codec: Codec
    scheduler_config: dict
    encode_text: Callable[[Sequence[str]], torch.Tensor]
    device: torch.device
    kind: str
    extras: dict = field(default_factory=dict)

    def text_embeddings(self, prompt: str, negative_prompt: str = "", guidance: bool = True) -> torch.Tensor:
        """(2, L, D) = [negative/unconditional, prompt] under classifier-free guidance, else (1, L, D)."""
        if guidance:
            return self.encode_text([negative_prompt or "", prompt])
        return self.encode_text([prompt])


def denoiser_from_model(model, conditioning_scale: float = 1.0) -> DiffusionParts:
    """Codec + denoiser + text encoding for a `LoadedModel` (or anything with `kind`, `pipe` and `device`), built
    by the factory the model registry names for its kind (`concord.models.registry.parts_factory`). Reads the
    pipe's components; changes none of them. Raises JobInputError for a kind that cannot run the texture job."""
    return parts_factory(model.kind)(model, conditioning_scale)


def _scheduler_prediction(pipe) -> tuple[dict, str]:
    """The scheduler config and the prediction type it names, refused clearly if the sampler cannot use it."""
    scheduler_config = dict(pipe.scheduler.config)
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise JobInputError(
            f"the model predicts {prediction_type!r}, which the texture sampler does not handle",
            "model",
            f"use a model whose scheduler predicts one of {', '.join(PREDICTION_TYPES)}",
        )
    return scheduler_config, prediction_type


def _vae_clip_parts(model, denoiser: Denoiser, scheduler_config: dict) -> DiffusionParts:
    """A Stable Diffusion pipe's VAE and CLIP text encoder around `denoiser`."""
    pipe = model.pipe
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder

    def encode_text(prompts: Sequence[str]) -> torch.Tensor:
        return encode_prompt(tokenizer, text_encoder, prompts)

    return DiffusionParts(
        denoiser=denoiser,
        codec=VaeCodec(pipe.vae),
        scheduler_config=scheduler_config,
        encode_text=encode_text,
        device=torch.device(model.device),
        kind=model.kind,
    )


def controlnet_parts(model, conditioning_scale: float = 1.0) -> DiffusionParts:
    """Parts of a Stable Diffusion + depth ControlNet pipe (diffusers' StableDiffusionControlNetPipeline)."""
    pipe = model.pipe
    scheduler_config, prediction_type = _scheduler_prediction(pipe)
    controlnet = pipe.controlnet
    if isinstance(controlnet, (list, tuple)) or type(controlnet).__name__ == "MultiControlNetModel":
        raise JobInputError("several ControlNets are not supported by the texture job", "model")
    denoiser = ControlNetDenoiser(pipe.unet, controlnet, conditioning_scale, prediction_type)
    return _vae_clip_parts(model, denoiser, scheduler_config)


def depth_concat_parts(model, conditioning_scale: float = 1.0) -> DiffusionParts:
    """Parts of a pipe whose UNet takes the depth as extra input channels (StableDiffusionDepth2ImgPipeline).
    `conditioning_scale` does not apply (there is no ControlNet to scale)."""
    pipe = model.pipe
    scheduler_config, prediction_type = _scheduler_prediction(pipe)
    return _vae_clip_parts(model, ConcatDenoiser(pipe.unet, prediction_type), scheduler_config)
