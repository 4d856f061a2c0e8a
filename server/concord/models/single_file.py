"""What a single checkpoint file is, told from its tensor names and shapes alone (no weights are read).

The registry asks this before it hands a `.safetensors` (or `.ckpt`) file to diffusers, so that a file of the
wrong kind (a LoRA, a VAE, a ControlNet, an embedding, a model of a family Concord cannot load from one file)
fails at once with a message that names the file, says what it is and what to pass instead, rather than with a
key or shape error from deep inside diffusers after minutes of loading.

How families are told apart (the original Stability/CompVis layout, as diffusers'
`loaders.single_file_utils` reads it):
  - SDXL: the UNet has `label_emb` (size/crop conditioning) and two text encoders under
    `conditioner.embedders.0/1`; the refiner has only OpenCLIP, at `conditioner.embedders.0.model`;
  - Stable Diffusion 2.x: OpenCLIP text encoder under `cond_stage_model.model`, linear `proj_in` in the UNet's
    transformers;
  - Stable Diffusion 1.x: CLIP under `cond_stage_model.transformer`, 1x1-convolution `proj_in`.
  The UNet's first convolution gives its input channels (4 text-to-image, 5 SD 2 depth, 8 InstructPix2Pix,
  9 inpainting) and width; any cross-attention key (`attn2.to_k`) gives the text width the model was trained
  with (768 SD 1.x, 1024 SD 2.x, 2048 SDXL, 1280 SDXL refiner), reported so a user can check.

Reads headers only (safetensors) or maps the file (torch.load with mmap and weights_only); never executes code
from a file, never downloads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from concord.models.registry import ModelUnavailable

UNET = "model.diffusion_model."
_UNET_IN = UNET + "input_blocks.0.0.weight"

LABELS = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "SDXL",
    "sdxl-refiner": "SDXL refiner",
}
# The text width each family was trained with (cross-attention width of the UNet).
CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
# Families Concord loads from one file, and the preset whose ControlNet and configuration files it uses.
SINGLE_FILE_PRESETS = {"sd1": "sd15-depth", "sdxl": "sdxl-depth"}
_VARIANTS = {4: "text-to-image", 5: "depth", 8: "InstructPix2Pix", 9: "inpainting"}
_WHAT_LOADS = (
    "a Stable Diffusion 1.5 or SDXL checkpoint (.safetensors), a diffusers folder (with model_index.json) or a preset "
    "name (`concord models` lists them)"
)
_NEXT_STEP = f"Pass {_WHAT_LOADS}."


class NotLoadable(ModelUnavailable):
    """The file is not something Concord can load as a model; the message says what it is and what to pass."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A full Stable Diffusion checkpoint's family and shape, as read from its tensor names and shapes."""

    path: Path
    family: str  # key of LABELS
    in_channels: int
    model_channels: int  # width of the UNet's first level
    context_dim: int  # cross-attention (text) width
    has_vae: bool
    has_text_encoder: bool
    n_tensors: int

    @property
    def label(self) -> str:
        return LABELS[self.family]

    @property
    def variant(self) -> str:
        return _VARIANTS.get(self.in_channels, f"{self.in_channels}-input-channel")

    def describe(self) -> str:
        """E.g. "an SDXL text-to-image checkpoint (UNet: 4 input channels, ...)", article included."""
        article = "an" if self.label.startswith("SDXL") else "a"
        return (
            f"{article} {self.label} {self.variant} checkpoint (UNet: {self.in_channels} input channels, width "
            f"{self.model_channels}, cross-attention width {self.context_dim})"
        )


def family_of_context_dim(dim: int) -> str:
    """A family's name for a cross-attention width, or a plain description when it is not a known one."""
    fam = CONTEXT_DIMS.get(dim)
    return LABELS[fam] if fam else f"a model with cross-attention width {dim}"


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a checkpoint file, without reading its weights."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # safetensors' own error type, OSError
            raise NotLoadable(
                f"{path} is not a readable .safetensors file ({exc}). It may be truncated (an interrupted "
                f"download) or a file of another format renamed: download it again."
            ) from exc
    import torch

    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (pre-zip) format cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NotLoadable(
            f"{path} cannot be read as a PyTorch checkpoint without running code stored in it ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Concord does not run such code: use the .safetensors version of this model, or "
            f"convert the file on a machine where you trust it."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise NotLoadable(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors. {_NEXT_STEP}")
    return {k: tuple(v.shape) for k, v in obj.items() if hasattr(v, "shape")}


_LORA = re.compile(r"(^lora_(unet|te\d?)_)|(\.lora_(down|up|A|B)\.)|(\.lora\.(down|up)\.)|(^lycoris_)|(\.hada_w\d_)")
_EMBEDDING_KEYS = {"emb_params", "string_to_param", "string_to_token", "clip_l", "clip_g"}


def _first_keys(keys, n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n])


def inspect(path: Path) -> CheckpointInfo:
    """Read a checkpoint file's family; raise NotLoadable (naming the file and what to do) if it is not a full
    Stable Diffusion model in the original single-file layout."""
    return inspect_shapes(Path(path), read_shapes(path))


def inspect_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> CheckpointInfo:
    """`inspect` for tensor names and shapes already read (`path` only names the file in messages)."""
    n = len(shapes)
    keys = set(shapes)
    if not keys:
        raise NotLoadable(f"{path} holds no tensors. {_NEXT_STEP}")
    if any(_LORA.search(k) for k in keys):
        raise NotLoadable(
            f"{path} is a LoRA ({n} tensors of low-rank updates such as {_first_keys(k for k in keys if _LORA.search(k))}), "
            f"not a model: a LoRA only modifies the base model it was trained for, and Concord does not apply LoRAs. "
            f"Pass the base model itself: {_WHAT_LOADS}."
        )
    if keys & _EMBEDDING_KEYS and n <= 4:
        raise NotLoadable(
            f"{path} is a textual-inversion embedding (a learned word), not a model. {_NEXT_STEP}"
        )
    if _UNET_IN not in shapes:
        if any(k.startswith("control_model.") for k in keys) or {"controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight"} & keys:
            raise NotLoadable(
                f"{path} is a ControlNet, not a base model. Concord pairs each base model with its family's depth "
                f"ControlNet itself (sd15-depth: lllyasviel/control_v11f1p_sd15_depth, sdxl-depth: "
                f"diffusers/controlnet-depth-sdxl-1.0). Pass the base model's checkpoint."
            )
        if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
            folder = path.parent.parent
            raise NotLoadable(
                f"{path} is a UNet in diffusers' layout: one part of a diffusers folder, not a whole model. Pass the "
                f"folder that holds model_index.json (probably {folder}) instead."
            )
        if any(k.startswith(("encoder.down.", "first_stage_model.", "encoder.down_blocks.")) for k in keys):
            raise NotLoadable(
                f"{path} holds only a VAE (the image encoder/decoder), not a whole model. Pass the full checkpoint "
                f"(with its UNet, model.diffusion_model.*). {_NEXT_STEP}"
            )
        if any("text_model." in k or k.startswith("transformer.resblocks.") for k in keys):
            raise NotLoadable(f"{path} holds only a text encoder, not a whole model. {_NEXT_STEP}")
        raise NotLoadable(
            f"{path} is not a Stable Diffusion checkpoint: none of its {n} tensors is named like one (the UNet's "
            f"{UNET}*); its first names are {_first_keys(keys)}. {_NEXT_STEP}"
        )
    out_ch, in_ch = shapes[_UNET_IN][:2]
    context = next(
        (shapes[k][1] for k in sorted(keys) if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), 0
    )
    proj_in = next((shapes[k] for k in sorted(keys) if k.startswith(UNET) and k.endswith(".proj_in.weight")), ())
    if UNET + "label_emb.0.0.weight" in keys:
        has_second = any(k.startswith("conditioner.embedders.1.") for k in keys)
        refiner = not has_second and any(k.startswith("conditioner.embedders.0.model.") for k in keys)
        family = "sdxl-refiner" if refiner else "sdxl"
    elif any(k.startswith("cond_stage_model.model.") for k in keys) or len(proj_in) == 2:
        family = "sd2"
    else:
        family = "sd1"
    text_prefixes = {
        "sd1": ("cond_stage_model.transformer.",),
        "sd2": ("cond_stage_model.model.",),
        "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
        "sdxl-refiner": ("conditioner.embedders.0.model.",),
    }[family]
    has_te = all(any(k.startswith(p) for k in keys) for p in text_prefixes)
    has_vae = any(k.startswith(("first_stage_model.", "vae.")) for k in keys)
    return CheckpointInfo(path, family, int(in_ch), int(out_ch), int(context), has_vae, has_te, n)


def preset_for(info: CheckpointInfo) -> str:
    """The preset whose ControlNet and configuration files a single file of this family loads with; raise
    NotLoadable (saying what the file is and what to use instead) for what Concord cannot load from one file."""
    p = info.path
    if info.family == "sd2":
        if info.in_channels == 5:
            raise NotLoadable(
                f"{p} is {info.describe()}. Concord runs Stable Diffusion 2 depth from the sd2-depth preset "
                f"(--model sd2-depth) or a diffusers folder of class StableDiffusionDepth2ImgPipeline, not from one "
                f"file: diffusers cannot assemble that pipeline from a single file."
            )
        raise NotLoadable(
            f"{p} is {info.describe()}. It has no depth input and there is no depth ControlNet for Stable "
            f"Diffusion 2 among Concord's models: use --model sd2-depth, or a Stable Diffusion 1.5 or SDXL "
            f"checkpoint (loaded with the sd15-depth or sdxl-depth preset's ControlNet)."
        )
    if info.family == "sdxl-refiner":
        raise NotLoadable(
            f"{p} is {info.describe()}: a refiner only polishes images an SDXL base model made. Pass an SDXL "
            f"base checkpoint (or --model sdxl-depth)."
        )
    if info.in_channels != 4:
        raise NotLoadable(
            f"{p} is {info.describe()}: Concord needs a text-to-image model (4 input channels) to pair with a "
            f"depth ControlNet. Use the text-to-image version of this model."
        )
    if not info.has_vae or not info.has_text_encoder:
        missing = " and ".join(
            part for part, ok in (("VAE (first_stage_model.*)", info.has_vae), ("text encoder", info.has_text_encoder)) if not ok
        )
        raise NotLoadable(
            f"{p} is {info.describe()} without its {missing}: a UNet-only file. Concord loads complete checkpoints "
            f"(UNet, VAE and text encoder in one file, as most published ones are), or a diffusers folder."
        )
    return SINGLE_FILE_PRESETS[info.family]


@dataclass(frozen=True)
class SingleFilePlan:
    """Everything a single file loads with besides itself."""

    info: CheckpointInfo
    preset: object  # the registry's Preset whose ControlNet and configuration files the file loads with
    config: str  # folder or hub id holding the configuration and tokenizer files
    controlnet: str  # folder or hub id of the depth ControlNet


def plan(path: Path, config: str | None) -> SingleFilePlan:
    """What a single-file checkpoint loads with, checked without loading weights; raises ModelUnavailable naming the
    file, what is missing or mismatched, and what to pass.

    Configuration and tokenizer files: `config` (a diffusers folder, or a hub id in the cache) or else the family's
    preset's base repo in the Hugging Face cache. Depth ControlNet: `config`/controlnet if that folder has one, else
    the preset's in the cache. Both must describe the file's model: same UNet input channels, width and
    cross-attention width.
    """
    from concord.models import on_disk
    from concord.models.registry import PRESETS

    path = Path(path)
    info = inspect(path)
    preset = PRESETS[preset_for(info)]
    what = f"{path.name} is {info.describe()}"
    only_configs = f'`hf download {preset.base} --include "*.json" "*.txt"` fetches just those, about 1 MB'
    if config is not None:
        cfg_dir = Path(config)
        if cfg_dir.is_dir():
            if not (cfg_dir / "model_index.json").is_file():
                raise ModelUnavailable(
                    f"--config {cfg_dir} is not a diffusers folder (no model_index.json). {what}: pass --config with "
                    f"a diffusers folder of the same family; its configuration files are enough ({only_configs} on "
                    f"a machine with internet)."
                )
            config_src, unet_cfg = str(cfg_dir), cfg_dir / "unet" / "config.json"
        elif on_disk.hub_snapshot(config) is not None:
            config_src, unet_cfg = config, on_disk.hub_cached_file(config, "unet/config.json")
        else:
            raise ModelUnavailable(
                f"--config {config} is neither a folder nor a model in the local Hugging Face cache. Pass a diffusers "
                f"folder of the same family as {path.name} ({info.label})."
            )
    else:
        if on_disk.hub_snapshot(preset.base) is None:
            raise ModelUnavailable(
                f"{what}. Loading it needs its family's configuration files (model_index.json, the tokenizer, the "
                f"scheduler, each part's config.json); they are not in the local Hugging Face cache "
                f"({preset.base}) and the Hub is offline. Pass --config DIR with a diffusers folder of the same "
                f"family (weights not needed: {only_configs}), or download {preset.base} once on a machine with "
                f"internet (`hf download {preset.base}`)."
            )
        config_src, unet_cfg = preset.base, on_disk.hub_cached_file(preset.base, "unet/config.json")
    unet = on_disk.read_json(unet_cfg)
    if unet is None:
        raise ModelUnavailable(
            f"{config_src} has no readable unet/config.json: it is not the configuration of a Stable Diffusion "
            f"pipeline. {what}: pass --config with a diffusers folder of that family."
        )
    got = (unet.get("in_channels"), (unet.get("block_out_channels") or [None])[0], unet.get("cross_attention_dim"))
    if got != (info.in_channels, info.model_channels, info.context_dim):
        fix = (
            f"Pass --config with a diffusers folder of the file's own family ({info.label})"
            if config is not None
            else f"The cached {preset.base} is not this model's configuration: pass --config DIR with one that is"
        )
        raise ModelUnavailable(
            f"{what}, but the configuration in {config_src} describes {family_of_context_dim(got[2])} (UNet: {got[0]} "
            f"input channels, width {got[1]}, cross-attention width {got[2]}). {fix}."
        )
    local_cn = Path(config) / "controlnet" if config is not None and Path(config).is_dir() else None
    if local_cn is not None and (local_cn / "config.json").is_file():
        cn_src, cn_cfg = str(local_cn), local_cn / "config.json"
        problems = on_disk.missing_parts(local_cn)
        if problems:
            raise ModelUnavailable(f"The ControlNet folder {local_cn} is incomplete: missing {'; '.join(problems)}.")
    elif on_disk.hub_snapshot(preset.controlnet) is not None:
        cn_src, cn_cfg = preset.controlnet, on_disk.hub_cached_file(preset.controlnet, "config.json")
        incomplete = on_disk.incomplete_snapshot(preset.controlnet)
        if incomplete:
            raise ModelUnavailable(f"{what}, to be run with {preset.name}'s depth ControlNet, but {incomplete}")
    else:
        raise ModelUnavailable(
            f"{what}; Concord runs it with the {preset.name} preset's depth ControlNet, {preset.controlnet}, which is "
            f"not in the local Hugging Face cache. Download it once on a machine with internet "
            f"(`hf download {preset.controlnet}`), or put a depth ControlNet for {info.label} in a controlnet/ folder "
            f"inside the --config folder."
        )
    cn_dim = (on_disk.read_json(cn_cfg) or {}).get("cross_attention_dim")
    if cn_dim != info.context_dim:
        raise ModelUnavailable(
            f"{what}, but the depth ControlNet in {cn_src} was made for {family_of_context_dim(cn_dim)} "
            f"(cross-attention width {cn_dim}): a ControlNet works only with its own family. Use a depth ControlNet "
            f"for {info.label} ({preset.controlnet})."
        )
    return SingleFilePlan(info, preset, config_src, cn_src)
