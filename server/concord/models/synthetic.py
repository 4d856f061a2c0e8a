"""Random-weight Stable Diffusion checkpoints built from the real configurations, in the layouts users have.

Loading a user's own weights is every user's first step past the demo, and no weights can be downloaded where
Concord is built and tested. This module writes stand-ins that differ from the published checkpoints only in
their numbers, so the registry's loading paths run for real: `tests/server/test_checkpoints.py` (scaled-down
sizes, in the normal suite) and `bench/checkpoints.py` (real sizes).

Families (`FAMILIES`): `sd15` (Stable Diffusion 1.5 + ControlNet 1.1 depth), `sd2-depth` (Stable Diffusion 2
depth, depth as a fifth UNet input channel, with its DPT depth estimator), `sdxl` (SDXL 1.0 base + the
diffusers depth ControlNet). Each one's configuration files are written here as the Hub repositories publish
them (`real_configs`; from diffusers' and transformers' documented configurations, not downloaded: a field the
library fills with its default may be missing, and `_diffusers_version` is not the Hub's).

Sizes:
  - "real": those configurations unchanged. SD1.5 + its ControlNet is 1.43 G parameters (5.7 GB in fp32).
  - "small": every width divided by 8 (channels, hidden and intermediate sizes, cross-attention width), head
    counts, layer counts and block types unchanged, GroupNorm groups 32 -> 8. Same layout and the same tensor
    names as "real", 1/64 of the parameters: what loads one loads the other, except for anything that depends
    on tensor sizes (memory, speed, and the family detection by cross-attention width 768/1024/2048).

Layouts:
  - `write_hub_cache`: a Hugging Face cache tree as `hf download` leaves it (models--org--name/blobs/<hash>,
    snapshots/<commit>/... as relative symlinks into blobs, refs/main holding the commit);
  - `write_diffusers_folder`: the family's depth pipeline written by diffusers' `save_pretrained`;
  - `write_single_file`: one `.safetensors` in the original (CompVis/Stability) key layout (model.diffusion_model.*,
    first_stage_model.*, cond_stage_model.* / conditioner.embedders.*), converted from the diffusers weights by
    `to_original_layout`, the inverse of the mapping diffusers applies when it loads such a file
    (`diffusers.loaders.single_file_utils`); the tests check the round trip through diffusers' own converters;
  - `write_config_folder`: a diffusers folder holding only the configuration and tokenizer files (what
    `hf download REPO --include "*.json" "*.txt"` fetches), optionally with the ControlNet's weights.

The tokenizer is NOT CLIP's vocabulary: CLIP's byte alphabet, merges for a short list of prompt words, filler
entries up to CLIP's 49408 ids (so embedding tables have their real shape) and CLIP's two special tokens at their
real ids 49406/49407. Prompts tokenize into valid ids; they mean nothing to the random weights anyway.

Writes only under the paths it is given; never downloads; deterministic for a given seed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

FAMILIES = ("sd15", "sd2-depth", "sdxl")
SIZES = ("small", "real")

_CLIP_VOCAB_SIZE = 49408
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

# ------------------------------------------------------------------------------------------------------------
# The real configurations (as published in the Hub repositories named in concord.models.registry.PRESETS)
# ------------------------------------------------------------------------------------------------------------

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_XL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
_XL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]

_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_CLIP_L = {  # openai/clip-vit-large-patch14's text tower, as SD 1.5 and SDXL (text_encoder) ship it
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "vocab_size": _CLIP_VOCAB_SIZE,
}

_PNDM = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

_SD15 = {
    "model_index": {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": _SD_DOWN,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": _SD_UP,
    },
    "vae": _VAE,
    "text_encoder": _CLIP_L,
    "tokenizer": {"pad_token": _EOS},
    "scheduler": _PNDM,
    "feature_extractor": {
        "crop_size": 224,
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    },
    "controlnet": {  # lllyasviel/control_v11f1p_sd15_depth
        "_class_name": "ControlNetModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "class_embed_type": None,
        "conditioning_embedding_out_channels": [16, 32, 96, 256],
        "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": 768,
        "down_block_types": _SD_DOWN,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "projection_class_embeddings_input_dim": None,
        "resnet_time_scale_shift": "default",
        "upcast_attention": False,
        "use_linear_projection": False,
    },
}

_SD2_DEPTH = {
    "model_index": {
        "_class_name": "StableDiffusionDepth2ImgPipeline",
        "_diffusers_version": "0.8.0",
        "depth_estimator": ["transformers", "DPTForDepthEstimation"],
        "feature_extractor": ["transformers", "DPTFeatureExtractor"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 1024,
        "down_block_types": _SD_DOWN,
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 5,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": _SD_UP,
        "upcast_attention": False,
        "use_linear_projection": True,
    },
    "vae": _VAE,
    "text_encoder": {  # OpenCLIP ViT-H/14's text tower without its last layer (SD 2 uses the penultimate one)
        **_CLIP_L,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
    },
    "tokenizer": {"pad_token": "!"},
    "scheduler": {**_PNDM, "prediction_type": "epsilon"},
    "feature_extractor": {
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "DPTFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "keep_aspect_ratio": False,
        "resample": 2,
        "size": 384,
    },
    "depth_estimator": {  # Intel/dpt-hybrid-midas: ViT-B/16 on a BiT-ResNet stem
        "architectures": ["DPTForDepthEstimation"],
        "backbone_config": {
            "depths": [3, 4, 9],
            "embedding_dynamic_padding": True,
            "global_padding": "same",
            "hidden_sizes": [256, 512, 1024, 2048],
            "layer_type": "bottleneck",
            "model_type": "bit",
            "num_groups": 32,
            "embedding_size": 64,
            "out_features": ["stage1", "stage2", "stage3"],
        },
        "backbone_featmap_shape": [1, 1024, 24, 24],
        "backbone_out_indices": [2, 5, 8, 11],
        "fusion_hidden_size": 256,
        "hidden_act": "gelu",
        "hidden_size": 768,
        "image_size": 384,
        "intermediate_size": 3072,
        "is_hybrid": True,
        "layer_norm_eps": 1e-12,
        "model_type": "dpt",
        "neck_hidden_sizes": [256, 512, 768, 768],
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "patch_size": 16,
        "qkv_bias": True,
        "readout_type": "project",
        "reassemble_factors": [4, 2, 1, 0.5],
        "torch_dtype": "float32",
    },
}

_XL_UNET_COMMON = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "cross_attention_dim": 2048,
    "down_block_types": _XL_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,  # pooled text (1280) + 6 size/crop numbers x 256
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}

_SDXL = {
    "model_index": {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet": {
        "_class_name": "UNet2DConditionModel",
        **_XL_UNET_COMMON,
        "center_input_sample": False,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "out_channels": 4,
        "sample_size": 128,
        "up_block_types": _XL_UP,
    },
    "vae": {**_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025},
    "text_encoder": _CLIP_L,
    "text_encoder_2": {  # OpenCLIP ViT-bigG/14's text tower
        **_CLIP_L,
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "projection_dim": 1280,
    },
    "tokenizer": {"pad_token": _EOS},
    "tokenizer_2": {"pad_token": "!"},
    "scheduler": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
    "controlnet": {  # diffusers/controlnet-depth-sdxl-1.0
        "_class_name": "ControlNetModel",
        **_XL_UNET_COMMON,
        "conditioning_channels": 3,
        "conditioning_embedding_out_channels": [16, 32, 96, 256],
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    },
}

_REAL = {"sd15": _SD15, "sd2-depth": _SD2_DEPTH, "sdxl": _SDXL}

# The Hub repositories each family's files live in (the registry's presets name the same ones).
REPOS = {
    "sd15": {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5", "controlnet": "lllyasviel/control_v11f1p_sd15_depth"},
    "sd2-depth": {"base": "stabilityai/stable-diffusion-2-depth"},
    "sdxl": {"base": "stabilityai/stable-diffusion-xl-base-1.0", "controlnet": "diffusers/controlnet-depth-sdxl-1.0"},
}

# The depth pipeline Concord runs for each family (the class of the diffusers folder a user saves).
PIPELINES = {
    "sd15": "StableDiffusionControlNetPipeline",
    "sd2-depth": "StableDiffusionDepth2ImgPipeline",
    "sdxl": "StableDiffusionXLControlNetPipeline",
}

_TOKENIZERS = ("tokenizer", "tokenizer_2")
_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet", "depth_estimator")


def real_configs(family: str) -> dict[str, dict]:
    """The family's configuration files, keyed by component (plus `model_index`), as published on the Hub."""
    if family not in _REAL:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    return copy.deepcopy(_REAL[family])


def _shrink(name: str, cfg: dict) -> dict:
    """The "small" size: widths / 8, GroupNorm groups 32 -> 8, every count and name unchanged."""
    c = copy.deepcopy(cfg)
    if name in ("unet", "controlnet"):
        c["block_out_channels"] = [w // 8 for w in c["block_out_channels"]]
        c["cross_attention_dim"] //= 8
        c["norm_num_groups"] = 8
        if c.get("addition_embed_type") == "text_time":
            c["addition_time_embed_dim"] //= 8
            pooled = _SDXL["text_encoder_2"]["projection_dim"] // 8
            c["projection_class_embeddings_input_dim"] = pooled + 6 * c["addition_time_embed_dim"]
    elif name == "vae":
        c["block_out_channels"] = [w // 8 for w in c["block_out_channels"]]
        c["norm_num_groups"] = 8
    elif name.startswith("text_encoder"):
        for k in ("hidden_size", "intermediate_size", "projection_dim"):
            c[k] //= 8
    elif name == "depth_estimator":
        for k in ("hidden_size", "intermediate_size", "fusion_hidden_size"):
            c[k] //= 8
        c["neck_hidden_sizes"] = [w // 8 for w in c["neck_hidden_sizes"]]
        bb = c["backbone_config"]
        bb["hidden_sizes"] = [w // 8 for w in bb["hidden_sizes"]]
        bb["embedding_size"] //= 8
        bb["num_groups"] = 8
        c["backbone_featmap_shape"] = [1, bb["hidden_sizes"][2], 24, 24]
    return c


def configs(family: str, size: str = "small") -> dict[str, dict]:
    """The configuration files for `family` at `size` ("small" or "real"), keyed by component."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: one of {', '.join(SIZES)}")
    cfgs = real_configs(family)
    return cfgs if size == "real" else {k: _shrink(k, v) for k, v in cfgs.items()}


# ------------------------------------------------------------------------------------------------------------
# The tokenizer files (not CLIP's vocabulary: see the module docstring)
# ------------------------------------------------------------------------------------------------------------

_WORDS = (
    "a photo of the and with in on old new red green blue yellow white black brown grey orange wooden wood stone "
    "metal rusty painted brick wall floor roof tile tiles box barrel crate chair table lamp house car tree rock "
    "texture pattern detailed high quality surface fabric leather gold silver marble concrete sand grass moss"
).split()


@functools.lru_cache(maxsize=4)
def tokenizer_files(pad_token: str = _EOS) -> dict[str, bytes]:
    """vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json of a CLIPTokenizer folder
    (cached: the same bytes every call; do not modify the returned dict)."""
    from concord.models.tiny import _byte_alphabet

    alphabet = _byte_alphabet()
    vocab_list = alphabet + [s + "</w>" for s in alphabet]
    merges: list[tuple[str, str]] = []
    seen = set(vocab_list)
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: every intermediate is a vocabulary entry
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in seen:
                merges.append(pair)
                vocab_list.append(merged)
                seen.add(merged)
            symbols = [merged] + symbols[2:]
    n_filler = _CLIP_VOCAB_SIZE - 2 - len(vocab_list)
    vocab_list += [f"<|concord_unused_{i}|>" for i in range(n_filler)]
    vocab_list += [_BOS, _EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    special = {"bos_token": _BOS, "eos_token": _EOS, "pad_token": pad_token, "unk_token": _EOS}
    tok_cfg = {
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode(),
        "special_tokens_map.json": json.dumps(special, indent=2).encode(),
        "tokenizer_config.json": json.dumps(tok_cfg, indent=2).encode(),
    }


def load_tokenizer(files: dict[str, bytes]):
    """A CLIPTokenizer read from `tokenizer_files`' bytes, the way a pipeline folder's tokenizer/ is read."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="concord-tok-") as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        return CLIPTokenizer.from_pretrained(d)


# ------------------------------------------------------------------------------------------------------------
# Building the models
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """One family's components at one size, in memory: models (random weights), configs and tokenizer files."""

    family: str
    size: str
    configs: dict[str, dict]
    models: dict[str, torch.nn.Module]
    tokenizers: dict[str, dict[str, bytes]] = field(default_factory=dict)

    @property
    def repos(self) -> dict[str, str]:
        return REPOS[self.family]

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return self.models[name].state_dict()


def _config_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def _build_model(name: str, cfg: dict):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    if name == "unet":
        return UNet2DConditionModel.from_config(cfg)
    if name == "controlnet":
        return ControlNetModel.from_config(cfg)
    if name == "vae":
        return AutoencoderKL.from_config(cfg)
    if name.startswith("text_encoder"):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModelWithProjection if cfg["architectures"] == ["CLIPTextModelWithProjection"] else CLIPTextModel
        return cls(CLIPTextConfig(**_config_kwargs(cfg)))
    if name == "depth_estimator":
        from transformers import DPTConfig, DPTForDepthEstimation

        return DPTForDepthEstimation(DPTConfig(**_config_kwargs(cfg)))
    raise ValueError(name)


def build(
    family: str, size: str = "small", seed: int = 0, dtype: torch.dtype = torch.float32, device: str | None = None
) -> Checkpoint:
    """Every weight-bearing component of `family` at `size`, randomly initialised from `seed`, in `dtype`.

    Weights are the libraries' own initialisation (what an untrained model has); the global RNG is restored.
    `device="meta"` builds shapes only (no memory, no values): enough to check names and shapes at the real size.
    """
    import contextlib

    cfgs = configs(family, size)
    models: dict[str, torch.nn.Module] = {}
    state = torch.random.get_rng_state()
    try:
        for i, name in enumerate(n for n in _MODELS if n in cfgs):
            torch.manual_seed(seed * 1000 + i)
            with torch.device(device) if device else contextlib.nullcontext():
                model = _build_model(name, cfgs[name]).eval()
            models[name] = model if dtype == torch.float32 else model.to(dtype)
    finally:
        torch.random.set_rng_state(state)
    tokenizers = {name: tokenizer_files(cfgs[name]["pad_token"]) for name in _TOKENIZERS if name in cfgs}
    return Checkpoint(family, size, cfgs, models, tokenizers)


# ------------------------------------------------------------------------------------------------------------
# Files of a component folder, as the Hub repositories hold them
# ------------------------------------------------------------------------------------------------------------


def json_bytes(obj: dict) -> bytes:
    """A configuration file's bytes, as the Hub's are (sorted, indented)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


def _weights_name(name: str) -> str:
    return "model.safetensors" if name.startswith("text_encoder") or name == "depth_estimator" else "diffusion_pytorch_model.safetensors"


def hub_state_dict(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors as the Hub file names them: transformers 5 flattened CLIPTextModel's `text_model.` prefix away,
    the published files (written by transformers 4) still carry it."""
    sd = model.state_dict()
    if name.startswith("text_encoder") and not hasattr(model, "text_model"):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return sd


def _component_files(ckpt: Checkpoint, names, weights: bool) -> dict[str, object]:
    """{relative path: bytes | ("tensors", state dict)} for the named components, one folder each."""
    files: dict[str, object] = {}
    for name in names:
        cfg = ckpt.configs[name]
        prefix = f"{name}/"
        if name in _TOKENIZERS:
            for fname, data in ckpt.tokenizers[name].items():
                files[prefix + fname] = data
        elif name == "scheduler":
            files[prefix + "scheduler_config.json"] = json_bytes(cfg)
        elif name == "feature_extractor":
            files[prefix + "preprocessor_config.json"] = json_bytes(cfg)
        elif name in ckpt.models:
            files[prefix + "config.json"] = json_bytes(cfg)
            if weights:
                files[prefix + _weights_name(name)] = ("tensors", hub_state_dict(name, ckpt.models[name]))
    return files


def base_repo_files(ckpt: Checkpoint, weights: bool = True, skip: tuple[str, ...] = ()) -> dict[str, object]:
    """The base pipeline repository: model_index.json and each component's folder (ControlNet excluded).

    The SD 1.5 repo's safety_checker is listed in model_index.json but not written (Concord never loads it;
    like `hf download ... --exclude "safety_checker/*"`). `skip` leaves out more folders the same way.
    """
    names = [n for n in ckpt.configs if n not in ("model_index", "controlnet") and n not in skip]
    files = {"model_index.json": json_bytes(ckpt.configs["model_index"])}
    files.update(_component_files(ckpt, names, weights))
    return files


def controlnet_repo_files(ckpt: Checkpoint) -> dict[str, object]:
    """The ControlNet repository: config.json and the weights at its root."""
    return {
        "config.json": json_bytes(ckpt.configs["controlnet"]),
        "diffusion_pytorch_model.safetensors": ("tensors", ckpt.state_dict("controlnet")),
    }


def _write_file(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, tuple) and content[0] == "tensors":
        _save_tensors(content[1], path)
    else:
        path.write_bytes(content)


def write_files(root: Path, files: dict[str, object]) -> Path:
    root = Path(root)
    for rel, content in files.items():
        _write_file(root / rel, content)
    return root


# ------------------------------------------------------------------------------------------------------------
# Layout (a): the Hugging Face cache
# ------------------------------------------------------------------------------------------------------------

# Files the Hub stores with Git LFS (the default .gitattributes): their ETag, and so their blob name, is the
# content's sha256; other files' is the git blob sha1.
_LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".model", ".pkl")


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_hub_repo(cache_dir: Path, repo_id: str, files: dict[str, object], commit: str | None = None) -> Path:
    """Write `files` as the snapshot of `repo_id`'s main branch in the Hugging Face cache at `cache_dir`.

    The layout is huggingface_hub's (https://huggingface.co/docs/huggingface_hub/guides/manage-cache):
    models--org--name/blobs/<etag> holds each file's bytes, snapshots/<commit>/<path> is a relative symlink to
    its blob, refs/main holds the commit hash. Returns the snapshot folder.
    """
    from huggingface_hub.file_download import repo_folder_name

    repo_dir = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    staged: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=repo_dir, prefix=".staging-") as tmp:
        for i, (rel, content) in enumerate(sorted(files.items())):
            tmp_path = Path(tmp) / str(i)
            _write_file(tmp_path, content)
            etag = _sha256(tmp_path) if rel.endswith(_LFS_SUFFIXES) else _git_blob_sha1(tmp_path)
            blob = blobs / etag
            if blob.exists():
                tmp_path.unlink()
            else:
                os.replace(tmp_path, blob)
            staged[rel] = etag
    if commit is None:
        commit = hashlib.sha1(json.dumps(sorted(staged.items())).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for rel, etag in staged.items():
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blobs / etag, link.parent), link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def write_hub_cache(ckpt: Checkpoint, cache_dir: Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """The family's base repository (and its ControlNet's) in the cache at `cache_dir`: {repo_id: snapshot}."""
    out = {ckpt.repos["base"]: write_hub_repo(cache_dir, ckpt.repos["base"], base_repo_files(ckpt, skip=skip))}
    if "controlnet" in ckpt.repos:
        out[ckpt.repos["controlnet"]] = write_hub_repo(cache_dir, ckpt.repos["controlnet"], controlnet_repo_files(ckpt))
    return out


# ------------------------------------------------------------------------------------------------------------
# Layout (b): a diffusers folder, as save_pretrained writes it
# ------------------------------------------------------------------------------------------------------------


def build_pipeline(ckpt: Checkpoint):
    """The family's depth pipeline object, assembled from the components (diffusers' classes)."""
    import diffusers

    sched_cfg = ckpt.configs["scheduler"]
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    kw = {name: ckpt.models[name] for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet") if name in ckpt.models}
    kw.update({name: load_tokenizer(files) for name, files in ckpt.tokenizers.items()})
    cls = getattr(diffusers, PIPELINES[ckpt.family])
    if ckpt.family == "sd15":
        return cls(**kw, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if ckpt.family == "sd2-depth":
        # The depth estimator is saved too: a folder saved from the full pipeline has it.
        from transformers import DPTImageProcessor

        fe = DPTImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return cls(**kw, scheduler=scheduler, depth_estimator=ckpt.models["depth_estimator"], feature_extractor=fe)
    return cls(**kw, scheduler=scheduler)


def write_diffusers_folder(ckpt: Checkpoint, out: Path) -> Path:
    build_pipeline(ckpt).save_pretrained(str(out))
    return Path(out)


def write_config_folder(ckpt: Checkpoint, out: Path, with_controlnet: bool = False) -> Path:
    """The base repository's configuration and tokenizer files only (no weights), as
    `hf download REPO --include "*.json" "*.txt"` fetches them; with `with_controlnet`, a controlnet/ subfolder
    holding the ControlNet's config and weights (as in a saved StableDiffusionControlNetPipeline folder)."""
    files = base_repo_files(ckpt, weights=False)
    if with_controlnet:
        files.update({f"controlnet/{k}": v for k, v in controlnet_repo_files(ckpt).items()})
        index = dict(ckpt.configs["model_index"], controlnet=["diffusers", "ControlNetModel"])
        files["model_index.json"] = json_bytes(index)
    return write_files(Path(out), files)


# ------------------------------------------------------------------------------------------------------------
# Layout (c): one file in the original key layout
# ------------------------------------------------------------------------------------------------------------

# diffusers' ResNet block names -> the original ResBlock's (inverse of update_unet_resnet_ldm_to_diffusers).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_to_original(sd: dict[str, torch.Tensor], config: dict, prefix: str = "model.diffusion_model.") -> dict:
    """A diffusers UNet2DConditionModel state dict -> the original openaimodel.UNetModel names.

    The inverse of diffusers' `convert_ldm_unet_checkpoint`: the original numbers its blocks flat
    (input_blocks.N, middle_block.N, output_blocks.N); level b's layer l is input_blocks[1 + b*(L+1) + l] and its
    downsampler input_blocks[1 + b*(L+1) + L] (L = layers_per_block); on the way up, level b's layer l is
    output_blocks[b*(L+1) + l], its upsampler sits after the block's resnet (.1) or attention (.2).
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    per = config["layers_per_block"] + 1
    top = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    up_has_attn = {i: "CrossAttn" in t for i, t in enumerate(config["up_block_types"])}

    def resnet(rest: list[str]) -> str:
        return ".".join([_UNET_RESNET.get(rest[0], rest[0])] + rest[1:])

    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if key in top:
            new = top[key]
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X
                new = f"input_blocks.{1 + b * per + per - 1}.0.op.{'.'.join(p[5:])}"
            else:
                n = 1 + b * per + int(p[3])
                new = f"input_blocks.{n}.0.{resnet(p[4:])}" if kind == "resnets" else f"input_blocks.{n}.1.{'.'.join(p[4:])}"
        elif p[0] == "mid_block":
            n = int(p[2])
            new = f"middle_block.{0 if n == 0 else 2}.{resnet(p[3:])}" if p[1] == "resnets" else f"middle_block.1.{'.'.join(p[3:])}"
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":  # up_blocks.b.upsamplers.0.conv.X
                new = f"output_blocks.{b * per + per - 1}.{2 if up_has_attn[b] else 1}.conv.{'.'.join(p[5:])}"
            else:
                n = b * per + int(p[3])
                new = f"output_blocks.{n}.0.{resnet(p[4:])}" if kind == "resnets" else f"output_blocks.{n}.1.{'.'.join(p[4:])}"
        else:
            raise KeyError(f"no original name for UNet tensor {key}")
        out[prefix + new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(sd: dict[str, torch.Tensor], prefix: str = "first_stage_model.") -> dict:
    """A diffusers AutoencoderKL state dict -> the original ldm AutoencoderKL names (inverse of diffusers'
    `convert_ldm_vae_checkpoint`): decoder levels count the other way (up.{n-1-i}), the attention's projections
    are 1x1 convolutions there."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if key in top:
            new = top[key]
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2]) if p[1] == "down_blocks" else n_up - 1 - int(p[2])
            level = f"{p[0]}.{'down' if p[1] == 'down_blocks' else 'up'}.{i}"
            if p[3] == "resnets":
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{level}.block.{p[4]}.{rest}"
            else:  # downsamplers.0.conv.X / upsamplers.0.conv.X
                new = f"{level}.{'downsample' if p[3] == 'downsamplers' else 'upsample'}.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{rest}"
        elif p[1] == "mid_block" and p[2] == "attentions":
            inner = ".".join(p[4:-1])
            new = f"{p[0]}.mid.attn_1.{_VAE_ATTN[inner]}.{p[-1]}"
            if p[-1] == "weight" and inner != "group_norm":
                value = value[:, :, None, None]
        else:
            raise KeyError(f"no original name for VAE tensor {key}")
        out[prefix + new] = value
    return out


def clip_to_original(model: torch.nn.Module, prefix: str) -> dict:
    """A transformers CLIPTextModel -> its original name under `prefix` (transformers' own names, with the
    `text_model.` level the files carry; diffusers' `convert_ldm_clip_checkpoint` strips the prefix)."""
    sd = hub_state_dict("text_encoder", model)
    out = {prefix + k: v for k, v in sd.items()}
    # Checkpoints written by the original code carry the embedding's position ids too (an int64 buffer).
    n = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    return out


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_original(model: torch.nn.Module, prefix: str, extra_layers: int = 0, seed: int = 0) -> dict:
    """A transformers CLIPTextModel(WithProjection) -> OpenCLIP's names under `prefix` (inverse of diffusers'
    `convert_open_clip_checkpoint`): q, k, v projections stacked into attn.in_proj_*, text_projection stored
    transposed. `extra_layers` appends random resblocks past the model's last (SD 2's file has OpenCLIP-H's 24th
    layer, which SD 2 does not use)."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    n_layers = model.config.num_hidden_layers
    for i in range(n_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{kind}"] for q in "qkv"], 0)
            for a, b in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
    if extra_layers:
        gen = torch.Generator().manual_seed(seed)
        template = {k[len(f"{prefix}transformer.resblocks.0."):]: v for k, v in out.items() if k.startswith(f"{prefix}transformer.resblocks.0.")}
        for j in range(n_layers, n_layers + extra_layers):
            for name, v in template.items():
                out[f"{prefix}transformer.resblocks.{j}.{name}"] = (torch.randn(v.shape, generator=gen) * 0.02).to(v.dtype)
        if prefix + "text_projection" not in out:
            h = model.config.hidden_size
            out[prefix + "text_projection"] = (torch.randn((h, h), generator=gen) * 0.02).to(sd["final_layer_norm.weight"].dtype)
    return out


def _ldm_schedule_buffers(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The diffusion schedule the original LatentDiffusion class stores in its checkpoints (scaled-linear betas,
    Rombach et al. 2022); diffusers ignores them but real files carry them."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    bufs = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.clamp(post_var, min=1e-20)),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {k: v.to(dtype) for k, v in bufs.items()}


def to_original_layout(ckpt: Checkpoint, extras: bool = True) -> dict[str, torch.Tensor]:
    """The whole model (UNet, VAE, text encoders) under the original single-file names.

    `extras` adds what real files carry beyond the weights diffusers reads (the schedule buffers, CLIP's
    position ids, SD 2's unused 24th OpenCLIP layer and projection), so the loader meets them as it would.
    The ControlNet and SD 2's depth estimator are not part of such files (the real SD 2 depth file carries a
    MiDaS model under depth_model.*, which diffusers does not read; it is left out here).
    """
    dtype = next(ckpt.models["unet"].parameters()).dtype
    out = unet_to_original(ckpt.state_dict("unet"), ckpt.configs["unet"])
    out.update(vae_to_original(ckpt.state_dict("vae")))
    if ckpt.family == "sd15":
        out.update(clip_to_original(ckpt.models["text_encoder"], "cond_stage_model.transformer."))
    elif ckpt.family == "sd2-depth":
        out.update(open_clip_to_original(ckpt.models["text_encoder"], "cond_stage_model.model.", extra_layers=1 if extras else 0))
    else:
        out.update(clip_to_original(ckpt.models["text_encoder"], "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_original(ckpt.models["text_encoder_2"], "conditioner.embedders.1.model."))
    if not extras:
        out = {k: v for k, v in out.items() if not k.endswith("position_ids")}
    elif ckpt.family != "sdxl":
        out.update(_ldm_schedule_buffers(dtype))
    return out


def write_single_file(ckpt: Checkpoint, path: Path, extras: bool = True) -> Path:
    """The model as one `.safetensors` file in the original layout (see `to_original_layout`)."""
    _save_tensors(to_original_layout(ckpt, extras), Path(path))
    return Path(path)
