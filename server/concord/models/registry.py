"""Model registry: what `--model NAME|PATH` means, and loading it onto a device in one piece.

Three ways to name a model:
  - a preset name (`micro` (the default), `tiny`, `sd15-depth`, `sd2-depth`, `sdxl-depth`): see `PRESETS`, hub ids
    in docs/models.md;
  - a local folder in diffusers format (`model_index.json`), e.g. one written by `save_pretrained`;
  - a single-file checkpoint (`.safetensors`, the format most community models ship in), loaded as Stable
    Diffusion 1.5 with the preset's depth ControlNet.

The server runs with the Hugging Face Hub offline: every source must already be on disk (the Hub cache or a
folder). A model that cannot load raises `ModelUnavailable` naming the model and how to get it, and nothing is
half-loaded: the server refuses to start rather than run without its model.

Half precision on CUDA, fp32 on the CPU. Loading happens only when `load_model` is called (the app's lifespan or
the CLI), never at import.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded here; the message says which and how to get it."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    kind: str  # "controlnet" | "depth2img" | "sdxl-controlnet" | "micro"
    base: str | None = None  # hub id of the pipeline
    controlnet: str | None = None  # hub id of the depth ControlNet
    builtin: bool = False  # built in code, needs no files
    shipped: bool = False  # weights ship inside the package (concord/models/weights/<name>)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny",
            "Stable Diffusion's classes at toy size with random weights: no download, seconds on a CPU, "
            "pictures are noise. For tests and a first run.",
            "controlnet",
            builtin=True,
        ),
        Preset(
            "micro",
            "Concord's own 3M-parameter pixel-space text+depth model, trained on procedural shapes and "
            "shipped with the package: colours follow the prompt; simple patterns; 64-128 px views. "
            "See docs/micro-model.md.",
            "micro",
            shipped=True,
        ),
        Preset(
            "sd15-depth",
            "Stable Diffusion 1.5 with the ControlNet 1.1 depth model (512x512 views).",
            "controlnet",
            base="stable-diffusion-v1-5/stable-diffusion-v1-5",
            controlnet="lllyasviel/control_v11f1p_sd15_depth",
        ),
        Preset(
            "sd2-depth",
            "Stable Diffusion 2 depth: depth enters as an extra UNet input channel (512x512 views).",
            "depth2img",
            base="stabilityai/stable-diffusion-2-depth",
        ),
        Preset(
            "sdxl-depth",
            "SDXL 1.0 with the diffusers depth ControlNet (1024x1024 views; needs ~10 GB of GPU memory).",
            "sdxl-controlnet",
            base="stabilityai/stable-diffusion-xl-base-1.0",
            controlnet="diffusers/controlnet-depth-sdxl-1.0",
        ),
    ]
}

DEFAULT_MODEL = "micro"  # shipped, trained; `tiny` stays for the fastest tests


@dataclass
class LoadedModel:
    """A pipeline on its device, with what clients are told about it."""

    name: str
    kind: str
    pipe: Any
    device: str
    dtype: str
    sources: list[str] = field(default_factory=list)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(
            "--device cuda was asked for but PyTorch sees no CUDA GPU. Use --device cpu (slow) or install a "
            "CUDA build of torch."
        )
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelUnavailable(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


def _dtype_for(device: str):
    import torch

    return torch.float16 if device.startswith("cuda") else torch.float32


def _shipped_weights(name: str) -> Path:
    return Path(__file__).resolve().parent / "weights" / name


def _hub_cached(repo_id: str) -> bool:
    """Whether a hub repo's pipeline or model config is in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for fname in ("model_index.json", "config.json"):
        hit = try_to_load_from_cache(repo_id, fname)
        if isinstance(hit, str):
            return True
    return False


def _download_hint(repo_ids: list[str]) -> str:
    cmds = " and ".join(f"`hf download {r}`" for r in repo_ids)
    from huggingface_hub import constants

    return (
        f"Download it once on a machine with internet ({cmds}); the files go to the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}, set HF_HOME to move it). Or pass --model with a local diffusers folder or a "
        f".safetensors file, or use --model tiny to try Concord without weights."
    )


def offline_status(name: str) -> tuple[bool, str | None]:
    """(available_offline, reason) for a preset, folder or file, without loading anything."""
    if name in PRESETS:
        preset = PRESETS[name]
        if preset.builtin:
            return True, None
        if preset.shipped:
            folder = _shipped_weights(preset.name)
            if (folder / "model_index.json").is_file():
                return True, None
            return False, (
                f"its weights are missing from {folder}: this installation is incomplete. Reinstall Concord, "
                f"or train them with `concord train-micro --out DIR` and copy DIR/model there"
            )
        needed = [r for r in (preset.base, preset.controlnet) if r]
        missing = [r for r in needed if not _hub_cached(r)]
        if missing:
            return False, f"not in the local Hugging Face cache: {', '.join(missing)}. " + _download_hint(missing)
        return True, None
    path = Path(name)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return True, None
        return False, f"{path} has no model_index.json: it is not a diffusers pipeline folder"
    if path.is_file():
        if path.suffix in (".safetensors", ".ckpt"):
            return True, None
        return False, f"{path} is not a .safetensors checkpoint"
    return False, f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder or file"


def load_model(name: str = DEFAULT_MODEL, device: str = "auto") -> LoadedModel:
    """Load a preset, folder or single file onto `device`. Raises ModelUnavailable with a user-facing message."""
    quiet_libraries()
    import torch

    device = resolve_device(device)
    dtype = _dtype_for(device)
    if name in PRESETS:
        preset = PRESETS[name]
        if preset.builtin:
            from concord.models import tiny

            pipe = tiny.build_pipeline()
            if dtype != torch.float32:
                pipe.to(dtype=dtype)
            sources: list[str] = []
        elif preset.shipped:
            ok, reason = offline_status(name)
            if not ok:
                raise ModelUnavailable(f"Model {name!r} cannot load: {reason}")
            from concord.micro.model import load_micro

            pipe = load_micro(_shipped_weights(name))
            if dtype != torch.float32:
                pipe.to(dtype=dtype)
            sources = [str(_shipped_weights(name))]
        else:
            ok, reason = offline_status(name)
            if not ok:
                raise ModelUnavailable(f"Model {name!r} ({preset.description}) cannot load offline: {reason}")
            pipe = _load_preset(preset, dtype)
            sources = [r for r in (preset.base, preset.controlnet) if r]
        kind = preset.kind
    else:
        ok, reason = offline_status(name)
        if not ok:
            raise ModelUnavailable(f"Model {name!r} cannot load: {reason}")
        path = Path(name)
        pipe, kind = _load_folder(path, dtype) if path.is_dir() else _load_single_file(path, dtype)
        sources = [str(path.resolve())]
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return LoadedModel(
        name=name, kind=kind, pipe=pipe, device=device, dtype=str(dtype).replace("torch.", ""), sources=sources
    )


def _wrap_load_error(what: str, exc: Exception) -> ModelUnavailable:
    return ModelUnavailable(f"Model {what!r} is on disk but failed to load: {type(exc).__name__}: {exc}")


def _load_preset(preset: Preset, dtype):
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    kw = dict(torch_dtype=dtype, local_files_only=True)
    try:
        if preset.kind == "depth2img":
            return StableDiffusionDepth2ImgPipeline.from_pretrained(preset.base, **kw)
        controlnet = ControlNetModel.from_pretrained(preset.controlnet, **kw)
        cls = StableDiffusionXLControlNetPipeline if preset.kind == "sdxl-controlnet" else StableDiffusionControlNetPipeline
        extra = {} if preset.kind == "sdxl-controlnet" else dict(safety_checker=None, requires_safety_checker=False)
        return cls.from_pretrained(preset.base, controlnet=controlnet, **extra, **kw)
    except Exception as exc:  # a corrupt or partial cache: say so instead of a traceback
        raise _wrap_load_error(preset.name, exc) from exc


_FOLDER_KINDS = {
    "MicroPipeline": "micro",
    "StableDiffusionControlNetPipeline": "controlnet",
    "StableDiffusionDepth2ImgPipeline": "depth2img",
    "StableDiffusionXLControlNetPipeline": "sdxl-controlnet",
}


def _load_folder(path: Path, dtype):
    from diffusers import DiffusionPipeline

    try:
        class_name = json.loads((path / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelUnavailable(f"{path}/model_index.json is unreadable: {exc}") from exc
    kind = _FOLDER_KINDS.get(class_name)
    if kind is None:
        raise ModelUnavailable(
            f"{path} holds a {class_name}, which has no depth conditioning. Concord needs one of: "
            f"{', '.join(_FOLDER_KINDS)}."
        )
    try:
        if kind == "micro":
            from concord.micro.model import load_micro

            pipe = load_micro(path, dtype=dtype)
        else:
            pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise _wrap_load_error(str(path), exc) from exc
    return pipe, kind


def _load_single_file(path: Path, dtype):
    """A community SD1.5 checkpoint in one file, paired with the sd15-depth preset's ControlNet."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    preset = PRESETS["sd15-depth"]
    missing = [r for r in (preset.base, preset.controlnet) if not _hub_cached(r)]
    if missing:
        raise ModelUnavailable(
            f"Single-file checkpoint {path.name} needs the depth ControlNet and Stable Diffusion 1.5's configs "
            f"(tokenizer, scheduler), which are not in the local Hugging Face cache: {', '.join(missing)}. "
            + _download_hint(missing)
        )
    try:
        controlnet = ControlNetModel.from_pretrained(preset.controlnet, torch_dtype=dtype, local_files_only=True)
        pipe = StableDiffusionControlNetPipeline.from_single_file(
            str(path),
            controlnet=controlnet,
            config=preset.base,
            torch_dtype=dtype,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except Exception as exc:
        raise _wrap_load_error(str(path), exc) from exc
    return pipe, "controlnet"


def quiet_libraries() -> None:
    """Keep transformers/diffusers chatter (e.g. about torchvision) out of users' consoles.

    Call before diffusers' pipelines are first imported: transformers reads TRANSFORMERS_VERBOSITY then.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
