"""The `micro` model: a ~3M-parameter pixel-space text+depth diffusion model, its pipeline and its sampler parts.

What it is for: the embedded default model Concord ships (a few MB, fp16 safetensors), small enough to train in
half an hour on two CPU cores (`concord.micro.train`) and to sample in a fraction of a second per image on a CPU, so
the demo and the consistency tests run on a model that has learned something (colours, patterns, a clean
background) instead of `tiny`'s random weights.

Architecture (every part a diffusers / transformers class):

- **codec**: pixel space. Images in [0, 1] -> x = pixel_unshuffle(2 img - 1, 2): 64x64x3 -> 32x32x12, exactly
  `concord.pipelines.denoiser.PixelUnshuffleCodec(2)` (no scaling factor: [-1, 1] pixels have std ~0.5).
- **conditioning**: the depth map, mapped per image exactly as the server's ControlNet path maps it
  (`concord.pipelines.depth_image.depth_to_control`: object disparity -> [0.1, 1], background 0), then to [-1, 1]
  and pixel-unshuffled by 2: 4 channels concatenated to the 12 noisy channels (`micro_conditioning`). Depth only:
  no normals or object coordinates, because the jobs (`depth_image`, the multi-view `texture` sampler) hand a
  model nothing but depth, and a texture that depended on object coordinates would be consistent across views by
  construction, hiding what the consistency code does. Orientation-free patterns are learnable from depth; the
  orientation of stripes on a sphere is not (the model samples one).
- **denoiser**: `UNet2DConditionModel`, in 16 = 12 + 4 channels, out 12, blocks (48, 96, 96) with
  cross-attention (and self-attention) at the 8x8 level and in the middle block, ~3.1M parameters
  (`MicroConfig`).
- **pixel head** (preset "micro-head", the shipped model): `MicroPixelHead`, ~2.6k parameters at pixel resolution,
  corrects the UNet's x0 estimate on the latent tokens that straddle the silhouette, which the 2x2-pixel tokens
  cannot resolve (`refine_prediction`, called through `micro_predict`). Older models have none.
- **text**: a 2-layer `CLIPTextModel` (width 64, 16 positions, ~0.1M parameters) trained from scratch with the
  UNet, on a word-level tokenizer built in code (`build_tokenizer`: the generator's words + specials; unknown
  words map to `<unk>`), a `tokenizers` WordLevel model wrapped in transformers' fast tokenizer, saved and loaded
  with `save_pretrained` / `from_pretrained`.
- **noise schedule and target**: cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17; diffusers'
  "squaredcos_cap_v2"), v-prediction (Salimans & Ho 2022, "Progressive Distillation", section 4):
  v = sqrt(abar) eps - sqrt(1 - abar) x0. Sampling with DDIM (Song et al. 2021), "trailing" timestep spacing so
  the first step starts at t = T - 1, pure noise (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
  Steps are Flawed", section 3.3), and x0 clipped to [-1, 1] (a pixel-space model's x0 is an image).

`MicroPipeline(DiffusionPipeline)` mirrors the depth ControlNet pipeline's call closely enough for the
`depth_image` job (prompt, negative_prompt, image=control image, depth=planar z, steps, guidance, generator,
output_type, callback_on_step_end with `_interrupt`). `micro_parts(pipe)` gives the multi-view sampler its
`DiffusionParts` (a `MicroDenoiser`, the codec, the scheduler config, the text encoder); `micro_model_parts` is
the same for a loaded model, the factory the model registry names for kind "micro"
(`concord.models.registry.PARTS_FACTORIES`). This module implements the sampler's interfaces
(`concord.pipelines.denoiser`); nothing there imports this module back (ARCHITECTURE rule 12).

What this module must never do: download anything, touch the filesystem outside `save_pretrained` /
`from_pretrained`, or change a model it did not build (no offload, no scheduler swap, no dtype moves).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from concord.micro.data import VOCABULARY
from concord.pipelines.denoiser import ConcatDenoiser, DiffusionParts, PixelUnshuffleCodec
from concord.pipelines.sampler import abar_at, guided_output

__all__ = [
    "MicroConfig",
    "PRESET_CONFIGS",
    "FACTOR",
    "CONDITIONING_CHANNELS",
    "PREDICTION_TYPE",
    "DEFAULT_WEIGHTS",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "build_components",
    "build_pipeline",
    "build_scheduler",
    "micro_codec",
    "micro_conditioning",
    "control_to_conditioning",
    "tokenize",
    "count_parameters",
    "MicroPixelHead",
    "refine_prediction",
    "silhouette_tokens",
    "micro_predict",
    "MicroPipeline",
    "MicroDenoiser",
    "micro_parts",
    "micro_model_parts",
    "load_micro",
]

#: Pixel-unshuffle factor of the codec: 64x64x3 images <-> 32x32x12 latents.
FACTOR = 2
#: Conditioning channels after unshuffling (1 depth channel * FACTOR**2).
CONDITIONING_CHANNELS = FACTOR**2
PREDICTION_TYPE = "v_prediction"
#: Where the shipped trained weights live (a `save_pretrained` folder).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "micro"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<unk>")


@dataclass(frozen=True)
class MicroConfig:
    """Sizes of the micro model. `PRESET_CONFIGS["micro-head"]` is the shipped one; `"test"` is for unit tests."""

    block_out_channels: tuple[int, ...] = (48, 96, 96)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 16
    norm_num_groups: int = 8
    cross_attention_dim: int = 64  # = text width
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 128
    max_length: int = 16  # tokens, with start and end
    sample_size: int = 32  # latent side of a 64x64 image (informative only: the UNet is convolutional)
    head_channels: int = 0  # > 0: a pixel head (`MicroPixelHead`) of this width refines the UNet's prediction

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MicroConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESET_CONFIGS: dict[str, MicroConfig] = {
    # Attention (self + cross) at the 16x16 and 8x8 levels and in the middle block: stages 2 and 3 of the shipped model.
    "micro": MicroConfig(),
    # The first shipped model: attention at 8x8 and in the middle only. Stage 1 of the shipped model's training
    # (docs/micro-model.md): `--init-from` grows it into "micro" without changing what it computes.
    "micro-v1": MicroConfig(down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")),
    # Micro attempt 14 (docs/micro-model.md): the 32x32 level -- the finest, where a token's 2x2 pixels must be told
    # apart at the silhouette -- widened from 48 to 64 channels; "-v1" is its first stage, as above.
    "micro-w64": MicroConfig(block_out_channels=(64, 96, 96)),
    "micro-w64-v1": MicroConfig(
        block_out_channels=(64, 96, 96), down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    ),
    # The shipped model: "micro" plus the pixel head (`MicroPixelHead`), the fourth training stage
    # (docs/micro-model.md, attempt 15): `--init-from` a "micro" model gives a head that changes nothing until trained.
    "micro-head": MicroConfig(head_channels=32),
    "test": MicroConfig(
        block_out_channels=(16, 32, 32),
        attention_head_dim=8,
        cross_attention_dim=32,
        text_intermediate=37,
        text_heads=2,
    ),
}
#: "test" with a pixel head (unit tests of the head's training stage).
PRESET_CONFIGS["test-head"] = MicroConfig(**{**asdict(PRESET_CONFIGS["test"]), "head_channels": 8})


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, scheduler, networks


def build_tokenizer(max_length: int = 16, words: Sequence[str] = VOCABULARY):
    """A word-level tokenizer made in code: `<|startoftext|>` words `<|endoftext|>`, padded with `<|endoftext|>`
    (CLIP's convention). Lower-cases and treats anything but letters as a space; unknown words -> `<unk>`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + sorted(set(words)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z]+"), " ")]
    )
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (N, model_max_length), exactly as `concord.pipelines.denoiser.encode_prompt` makes them."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def build_scheduler():
    """DDIM with the cosine schedule and v-prediction (see the module docstring for the citations)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=PREDICTION_TYPE,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )


def build_components(config: MicroConfig | str = "micro", seed: int = 0) -> dict:
    """unet, text_encoder, tokenizer, scheduler, head (None unless the config has one): fresh (random) weights from
    `seed`; the global RNG is untouched."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = PRESET_CONFIGS[config] if isinstance(config, str) else config
    tokenizer = build_tokenizer(cfg.max_length)
    up_types = tuple(t.replace("Down", "Up") for t in reversed(cfg.down_block_types))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=cfg.sample_size,
            in_channels=3 * FACTOR**2 + CONDITIONING_CHANNELS,
            out_channels=3 * FACTOR**2,
            block_out_channels=cfg.block_out_channels,
            down_block_types=cfg.down_block_types,
            up_block_types=up_types,
            layers_per_block=cfg.layers_per_block,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups,
            cross_attention_dim=cfg.cross_attention_dim,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.cross_attention_dim,
                intermediate_size=cfg.text_intermediate,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.max_length,
                projection_dim=cfg.cross_attention_dim,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        head = MicroPixelHead(hidden=cfg.head_channels) if cfg.head_channels > 0 else None
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": build_scheduler(),
            "head": head}


def build_pipeline(config: MicroConfig | str = "micro", seed: int = 0) -> "MicroPipeline":
    """An untrained MicroPipeline (fp32, CPU)."""
    pipe = MicroPipeline(**build_components(config, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# The pixel head

from diffusers import ConfigMixin, ModelMixin  # noqa: E402  (module-level class bases)
from diffusers.configuration_utils import register_to_config  # noqa: E402


class MicroPixelHead(ModelMixin, ConfigMixin):
    """A small convolutional network at PIXEL resolution that corrects the UNet's x0 prediction (`refine_prediction`).

    Why: the UNet works on 2x2-pixel tokens (the codec's pixel-unshuffle), and at an object's silhouette one token
    holds object and background pixels. Measured on the stage-3 model (96 held-out samples): 90 % of the background
    pixels it paints wrong are the first background ring, and a ring pixel that shares its token with an object pixel
    is wrong 59 % of the time, against 3 % for one whose token is all background -- the UNet blends a token's pixels,
    and no training change of attempts 4 and 9-14 (docs/micro-model.md) taught it not to. The head sees, per pixel,
    the UNet's x0 estimate, that pixel's own depth-control value and the noise level, so telling apart the pixels of
    one token is a per-pixel function for it. It learns what to do there (nothing here says what the background
    is); its last layer starts at zero, so an untrained head changes nothing (ControlNet's zero convolutions, Zhang
    et al. 2023). Input (B, 3 + 1 + 1, H, W): x0 estimate in [-1, 1], control in [-1, 1], sqrt(1 - abar) broadcast;
    output (B, 3, H, W): the x0 correction r."""

    @register_to_config
    def __init__(self, hidden: int = 32, colour_channels: int = 3):
        super().__init__()
        c = colour_channels
        self.conv_in = torch.nn.Conv2d(c + 2, hidden, 3, padding=1)
        self.conv_mid = torch.nn.Conv2d(hidden, hidden, 1)
        self.conv_out = torch.nn.Conv2d(hidden, c, 1)
        torch.nn.init.zeros_(self.conv_out.weight)
        torch.nn.init.zeros_(self.conv_out.bias)

    def forward(self, x0: torch.Tensor, control: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1).to(x0.dtype).expand(x0.shape[0], 1, *x0.shape[-2:])
        h = F.silu(self.conv_in(torch.cat([x0, control.to(x0.dtype), s], 1)))
        h = F.silu(self.conv_mid(h))
        return self.conv_out(h)


def refine_prediction(head, v: torch.Tensor, x_t: torch.Tensor, cond: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The model's v prediction after the pixel head: v' with x0(v') = x0(v) + g r.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar) (v-prediction, Salimans & Ho 2022, section 4):
        x0 = alpha x_t - sigma v                              (the UNet's x0 estimate)
        r  = unshuffle(head(shuffle(x0), shuffle(cond), sigma))  (at pixel resolution; `MicroPixelHead`)
        g  = 1 on the latent tokens that hold object and background pixels, else 0   (`silhouette_tokens`)
        v' = v - g r / sigma                                  (so that alpha x_t - sigma v' = x0 + g r)
    The head acts only where the UNet cannot resolve its tokens, at the silhouette: let loose on every pixel, it
    also learned to sharpen the object's inside, and the patterns suffered (pattern accuracy 0.635 -> 0.585 on 200
    samples while background fidelity rose to 0.998; docs/micro-model.md, attempt 15).
    `v`, `x_t` (B, 12, h, w), `cond` (B, 4, h, w) the UNet's conditioning channels, `abar` the cumulative alpha at
    each sample's timestep ((B,) or a scalar). `head` None returns `v` unchanged. The head's correction enters the
    scheduler as an ordinary v, so clipping, guidance and every hook see one model."""
    if head is None:
        return v
    a = torch.as_tensor(abar, dtype=torch.float32, device=v.device).reshape(-1, 1, 1, 1)
    alpha, sigma = a.sqrt(), (1.0 - a).sqrt()
    vf, xf = v.float(), x_t.float()
    x0 = alpha * xf - sigma * vf
    dt = head.dtype
    r = head(F.pixel_shuffle(x0, FACTOR).to(dt), F.pixel_shuffle(cond.float(), FACTOR).to(dt),
             sigma.expand(v.shape[0], 1, 1, 1).to(dt))
    g = silhouette_tokens(cond).to(vf.dtype)
    return (vf - g * F.pixel_unshuffle(r.float(), FACTOR) / sigma).to(v.dtype)


def silhouette_tokens(cond: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) bool: the latent tokens whose 2x2 pixels hold both background and object, read off the UNet's
    conditioning channels `cond` (B, 4, h, w) (`control_to_conditioning`: background exactly -1, object >= -0.8)."""
    bg = cond <= -0.9
    return bg.any(1, keepdim=True) & (~bg).any(1, keepdim=True)


def micro_predict(unet, head, alphas_cumprod: torch.Tensor, model_in: torch.Tensor, t, emb,
                  unet_grad: bool = True) -> torch.Tensor:
    """v for the UNet input `model_in` = [x_t (12 channels), conditioning] at timestep(s) `t` (a scalar or one per
    sample): the UNet's prediction, through `refine_prediction` when `head` is not None. Used by the pipeline, the
    multi-view sampler's `MicroDenoiser` and the trainer alike, so all three run one model. `unet_grad=False` runs
    the UNet without gradients (the trainer's head-only stage: its output is a constant input to the head)."""
    kw = {} if emb is None else {"encoder_hidden_states": emb.to(unet.dtype)}
    with torch.set_grad_enabled(unet_grad and torch.is_grad_enabled()):
        v = unet(model_in.to(unet.dtype), t, return_dict=False, **kw)[0]
    if head is None:
        return v
    n = unet.config.out_channels
    # abar at each timestep; a fractional one (Euler's interpolated timesteps) interpolated as the sampler does
    sched = SimpleNamespace(alphas_cumprod=alphas_cumprod)
    abar = torch.tensor([abar_at(sched, x) for x in torch.as_tensor(t).reshape(-1).tolist()], device=v.device)
    return refine_prediction(head, v, model_in[:, :n], model_in[:, n:], abar)


# ---------------------------------------------------------------------------------------------------------------
# Codec and conditioning (pure functions; used identically by training, the pipeline and the multi-view sampler)


def micro_codec() -> PixelUnshuffleCodec:
    """encode: images [0, 1] (B, 3, H, W) -> pixel_unshuffle(2 img - 1, 2) (B, 12, H/2, W/2); decode: the inverse."""
    return PixelUnshuffleCodec(FACTOR, 3)


def control_to_conditioning(control: torch.Tensor) -> torch.Tensor:
    """A [0, 1] depth-control map (B, 1, H, W) (`depth_to_control`'s output: near bright, background 0) ->
    the model's conditioning (B, 4, H/2, W/2): pixel_unshuffle(2 c - 1, 2). Background becomes -1."""
    c = control.float()
    if c.dim() == 3:
        c = c[:, None]
    if c.shape[1] != 1:
        raise ValueError(f"control must have one channel, got shape {tuple(c.shape)}")
    if c.shape[-2] % FACTOR or c.shape[-1] % FACTOR:
        raise ValueError(f"control size {tuple(c.shape[-2:])} is not a multiple of {FACTOR}")
    return F.pixel_unshuffle(2.0 * c.clamp(0.0, 1.0) - 1.0, FACTOR)


def micro_conditioning(depth) -> torch.Tensor:
    """Planar depth (B, H, W) or (H, W) (numpy or torch; > 0 object, 0 background) -> conditioning
    (B, 4, H/2, W/2) float32 on the CPU, normalised exactly as in training: per image
    `concord.pipelines.depth_image.depth_to_control` (disparity -> [0.1, 1], background 0), then
    `control_to_conditioning`. Concatenate it after the 12 noisy channels."""
    from concord.pipelines.depth_image import depth_to_control

    d = depth.detach().cpu().numpy() if isinstance(depth, torch.Tensor) else np.asarray(depth)
    if d.ndim == 2:
        d = d[None]
    if d.ndim != 3:
        raise ValueError(f"depth must be (B, H, W) or (H, W), got shape {d.shape}")
    control = np.stack([depth_to_control(x.astype(np.float32)) for x in d])
    return control_to_conditioning(torch.from_numpy(control)[:, None])


def _control_from_image(image) -> np.ndarray:
    """A control image (PIL, or array (H, W) / (H, W, C), uint8 or float [0, 1]) -> (H, W) float32 [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[..., :3].mean(-1) if a.shape[-1] in (1, 3, 4) else a[0]
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline

from diffusers import DiffusionPipeline  # noqa: E402  (module-level class base)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput  # noqa: E402


class MicroPipeline(DiffusionPipeline):
    """Text + depth -> image with the micro model. Components: unet, text_encoder, tokenizer, scheduler and, where
    the model has one, head (a `MicroPixelHead`, applied to every UNet prediction by `refine_prediction`).

    `save_pretrained` writes fp16 safetensors (the in-memory model is not touched); `from_pretrained` loads them
    as fp32 unless `torch_dtype` says otherwise."""

    model_cpu_offload_seq = "text_encoder->unet->head"
    _callback_tensor_inputs = ["latents"]
    _optional_components = ["head"]

    def __init__(self, unet, text_encoder, tokenizer, scheduler, head=None):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, head=head)

    def predict_v(self, model_in: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
        """The model's v prediction for the UNet input [x_t, conditioning] at timestep(s) `t`: the UNet's, refined by
        the head where there is one (`refine_prediction`). The one place the pipeline calls the networks."""
        return micro_predict(self.unet, self.head, self.scheduler.alphas_cumprod, model_in, t, emb)

    # -- parts ---------------------------------------------------------------------------------------------
    @property
    def codec(self) -> PixelUnshuffleCodec:
        return micro_codec()

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    # -- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, safe_serialization: bool = True, fp16: bool = True, **kwargs):
        """diffusers' layout; weights as fp16 safetensors by default (a copy is cast, this pipeline is unchanged)."""
        if not fp16:
            return super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        half = MicroPipeline(
            unet=copy.deepcopy(self.unet).to(dtype=torch.float16),
            text_encoder=copy.deepcopy(self.text_encoder).to(dtype=torch.float16),
            tokenizer=self.tokenizer,
            scheduler=self.scheduler,
            head=None if self.head is None else copy.deepcopy(self.head).to(dtype=torch.float16),
        )
        return DiffusionPipeline.save_pretrained(half, save_directory, safe_serialization=safe_serialization, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if "torch_dtype" not in kwargs:
            kwargs.setdefault("dtype", torch.float32)
        kwargs.setdefault("local_files_only", True)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- text ----------------------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = tokenize(self.tokenizer, prompts).to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    # -- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        image=None,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        depth=None,
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """Generate images (N, H, W, 3) in [0, 1] (output_type "np"; "pt" gives (N, 3, H, W); "pil" a list).

        Conditioning: `depth` (planar z, (H, W) or (N, H, W), 0 = background; preferred: float precision) or
        `image`, a depth-control picture as the ControlNet pipelines take it (PIL or array, near bright,
        background black; one or a list). N = the number of prompts or depth maps (one of them is broadcast).
        `height`/`width` must match the conditioning when given; sizes must be multiples of 8.
        Classifier-free guidance (Ho & Salimans 2022) when guidance_scale > 1:
        out = out_uncond + g (out_cond - out_uncond). `callback_on_step_end(pipe, i, t, kwargs)` runs after every
        step; setting `pipe._interrupt = True` there stops before the next step's model call."""
        device = self._execution_device
        self._interrupt = False
        if depth is not None:
            cond = micro_conditioning(depth)
        elif image is not None:
            imgs = image if isinstance(image, (list, tuple)) else [image]
            control = np.stack([_control_from_image(im) for im in imgs])
            cond = control_to_conditioning(torch.from_numpy(control)[:, None])
        else:
            raise ValueError("MicroPipeline needs `depth` (planar z) or `image` (a depth-control picture)")
        H, W = cond.shape[-2] * FACTOR, cond.shape[-1] * FACTOR
        if (height is not None and height != H) or (width is not None and width != W):
            raise ValueError(f"height/width {height}x{width} do not match the conditioning's {H}x{W}")
        if H % 8 or W % 8:
            raise ValueError(f"image size {W}x{H} must be a multiple of 8")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = max(len(prompts), cond.shape[0])
        if len(prompts) not in (1, n) or cond.shape[0] not in (1, n):
            raise ValueError(f"{len(prompts)} prompts and {cond.shape[0]} conditioning maps do not pair up")
        prompts = prompts * (n // len(prompts))
        cond = cond.expand(n, -1, -1, -1) if cond.shape[0] == 1 else cond
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * n if isinstance(neg, str) else list(neg)
            if len(negs) != n:
                raise ValueError("negative_prompt must be one string or one per image")
            emb = self.encode_text(negs + prompts)
            cond_in = torch.cat([cond, cond]).to(device=device, dtype=self.unet.dtype)
        else:
            emb = self.encode_text(prompts)
            cond_in = cond.to(device=device, dtype=self.unet.dtype)
        emb = emb.to(self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (n, self.unet.config.out_channels, H // FACTOR, W // FACTOR)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                break
            x = torch.cat([latents, latents]) if do_cfg else latents
            x = self.scheduler.scale_model_input(x, t)
            model_in = torch.cat([x.to(self.unet.dtype), cond_in], dim=1)
            out = self.predict_v(model_in, t, emb).float()
            if do_cfg:
                out = guided_output(out, guidance_scale)
            latents = self.scheduler.step(out, t, latents, generator=generator, return_dict=False)[0]
            if callback_on_step_end is not None:
                local = {"latents": latents}
                names = callback_on_step_end_tensor_inputs or ["latents"]
                res = callback_on_step_end(self, i, t, {k: local[k] for k in names if k in local})
                if res is not None and "latents" in res:
                    latents = res["latents"]
        images = self.codec.decode(latents)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            result = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            if output_type == "pil":
                from PIL import Image

                result = [Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)) for a in arr]
            elif output_type == "np":
                result = arr
            else:
                raise ValueError(f"output_type must be 'np', 'pt' or 'pil', got {output_type!r}")
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


# ---------------------------------------------------------------------------------------------------------------
# The multi-view sampler's view of the model (ARCHITECTURE rule 7)


class MicroDenoiser(ConcatDenoiser):
    """`ConcatDenoiser` with the micro model's conditioning: the sampler's [0, 1] depth-control maps at image
    resolution (B, 1, H, W) become pixel-unshuffled [-1, 1] maps (B, 4, H/2, W/2) (`control_to_conditioning`)
    instead of being resized to latent size. Control maps of another size are resized (nearest) to twice the
    latent size first."""

    def __init__(self, unet, prediction_type: str = PREDICTION_TYPE, head=None, alphas_cumprod=None):
        super().__init__(unet, prediction_type)
        if head is not None and alphas_cumprod is None:
            raise ValueError("a MicroDenoiser with a head needs the scheduler's alphas_cumprod")
        self.head = head
        self.alphas_cumprod = alphas_cumprod

    # `modules` stays [unet]: they are the networks whose attention the consistency methods patch; the head has none

    def predict(self, x_t, t, text_embeddings, control):
        dt = self.unet.dtype
        x = torch.cat([x_t.to(dt), control.to(dt)], dim=1)
        return micro_predict(self.unet, self.head, self.alphas_cumprod, x, t, text_embeddings)

    def prepare_control(self, control: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        c = control.float()
        if c.dim() == 3:
            c = c[:, None]
        target = (latent_hw[0] * FACTOR, latent_hw[1] * FACTOR)
        if tuple(c.shape[-2:]) != target:
            c = F.interpolate(c, size=target, mode="nearest")
        return control_to_conditioning(c)


def micro_parts(pipe: MicroPipeline) -> DiffusionParts:
    """`DiffusionParts` for `concord.pipelines.texture.run(..., parts=micro_parts(pipe))`. Reads the pipe; changes
    nothing."""

    def encode_text(prompts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return pipe.encode_text(prompts)

    return DiffusionParts(
        denoiser=MicroDenoiser(pipe.unet, pipe.scheduler.config.prediction_type, head=pipe.head,
                               alphas_cumprod=pipe.scheduler.alphas_cumprod),
        codec=pipe.codec,
        scheduler_config=dict(pipe.scheduler.config),
        encode_text=encode_text,
        device=torch.device(pipe.device),
        kind="micro",
    )


def micro_model_parts(model, conditioning_scale: float = 1.0) -> DiffusionParts:
    """The registry's parts factory for kind "micro": `micro_parts(model.pipe)`. `conditioning_scale` does not
    apply (the depth is concatenated, there is no ControlNet to scale)."""
    return micro_parts(model.pipe)


def load_micro(path: str | Path | None = None, device: str | torch.device = "cpu", dtype=torch.float32) -> MicroPipeline:
    """The trained model from `path` (default: the shipped `DEFAULT_WEIGHTS`), fp32 on `device` by default.
    Raises FileNotFoundError naming the folder when it has no `model_index.json`."""
    p = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no micro model at {p} (expected a save_pretrained folder); train one with "
            f"`concord train-micro --out DIR` and copy DIR/model there"
        )
    pipe = MicroPipeline.from_pretrained(str(p), dtype=dtype)
    return pipe.to(device)


def _sizes_summary(config: MicroConfig | str = "micro-head") -> dict:
    """Parameter counts of a freshly built model (for the model card and tests)."""
    comps = build_components(config)
    u, t = count_parameters(comps["unet"]), count_parameters(comps["text_encoder"])
    h = count_parameters(comps["head"]) if comps["head"] is not None else 0
    return {"unet": u, "text_encoder": t, "head": h, "total": u + t + h, "fp16_mb": round(2 * (u + t + h) / 2**20, 2)}

