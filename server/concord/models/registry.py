"""Model registry: what `--model NAME|PATH` means, and loading it onto a device in one piece.

Three ways to name a model:
  - a preset name (`micro` (the default), `tiny`, `sd15-depth`, `sd2-depth`, `sdxl-depth`): see `PRESETS`, hub ids
    in docs/models.md;
  - a local folder in diffusers format (`model_index.json`), e.g. one written by `save_pretrained`;
  - a single-file checkpoint (`.safetensors`, the format most community models ship in): Stable Diffusion 1.x or
    SDXL, told apart by its tensors (`single_file`), loaded with its family's preset's depth ControlNet and
    configuration files (or those of a `config` folder).

What is on disk is checked before anything loads (`on_disk`, `single_file`): an incomplete download, a folder or
file of the wrong kind, a checkpoint of another family fail with a message naming the file and what to do.

The server runs with the Hugging Face Hub offline: every source must already be on disk (the Hub cache or a
folder). A model that cannot load raises `ModelUnavailable` naming the model and how to get it, and nothing is
half-loaded: the server refuses to start rather than run without its model.

Every model declares its recommended settings (`RecommendedSettings`: view size, steps, guidance, texture size, the
size it was trained at, the largest view size it is meant for): presets their own, folders and single files their
kind's (`KIND_RECOMMENDED`). Jobs that leave a setting out get the loaded model's (`concord.models.recommended`).

Half precision on CUDA, fp32 on the CPU. Loading happens only when `load_model` is called (the app's lifespan or
the CLI), never at import.

The registry is the one place that knows the concrete models (ARCHITECTURE rule 12): how each kind loads
(`load_model`; micro through `_load_folder` alone) and which factory builds the multi-view sampler's parts for it
(`PARTS_FACTORIES`, used by `concord.pipelines.denoiser.denoiser_from_model`). It names those factories as
"module:function" and imports them on first use, so importing the registry imports neither torch nor a model
package, and `concord.pipelines` can consult it without an import circle.
"""

from __future__ import annotations

import json
import logging
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from concord.errors import JobInputError
from concord.models.recommended import RecommendedSettings

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
    recommended: RecommendedSettings | None = None  # view size, steps, guidance, ... (None: the kind's, `KIND_RECOMMENDED`)


# What each kind of model is run at when nothing more specific is known (folders, single files). Stable Diffusion
# 1.5 and 2 were trained at 512 px and duplicate their subject well above it; 30 DDIM steps and guidance 7.5 are
# their usual settings. SDXL: 1024 px, guidance 5 (diffusers' SDXL default). micro: docs/micro-model.md (trained at
# 64 px; guidance 2 measured best, colour accuracy falls to 0.40 at 6; 20 steps; 128 px views keep six views'
# joint attention cheap and give the texture twice the texels of 64 px views; correspondence-weighted attention at
# 8, the strongest it was trained with, which cuts cross-view disagreement most).
KIND_RECOMMENDED: dict[str, RecommendedSettings] = {
    "controlnet": RecommendedSettings(
        view_size=512, steps=30, guidance=7.5, texture_size=1024, native_size=512, max_view_size=768
    ),
    "depth2img": RecommendedSettings(
        view_size=512, steps=30, guidance=7.5, texture_size=1024, native_size=512, max_view_size=768
    ),
    "sdxl-controlnet": RecommendedSettings(
        view_size=1024, steps=30, guidance=5.0, texture_size=2048, native_size=1024, max_view_size=1024
    ),
    "micro": RecommendedSettings(
        view_size=128, steps=20, guidance=2.0, texture_size=512, native_size=64, max_view_size=256,
        attention_correspondence=8.0,
    ),
}

# `tiny` has random weights: its pictures are noise whatever the settings, so it recommends the cheapest settings
# that still run every code path (guidance on, several steps), which keeps tests that use its defaults fast. Its
# native size is its UNet's (32 latent px x the VAE's 8); no size is off its (non-existent) training distribution.
TINY_RECOMMENDED = RecommendedSettings(
    view_size=64, steps=4, guidance=3.0, texture_size=256, native_size=256, max_view_size=1024
)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny",
            "Stable Diffusion's classes at toy size with random weights: no download, seconds on a CPU, "
            "pictures are noise. For tests and a first run.",
            "controlnet",
            builtin=True,
            recommended=TINY_RECOMMENDED,
        ),
        Preset(
            "micro",
            "Concord's own 3M-parameter pixel-space text+depth model, trained on procedural shapes and "
            "shipped with the package: colours follow the prompt; simple patterns; 64-128 px views. "
            "See docs/micro-model.md.",
            "micro",
            shipped=True,
            recommended=KIND_RECOMMENDED["micro"],
        ),
        Preset(
            "sd15-depth",
            "Stable Diffusion 1.5 with the ControlNet 1.1 depth model (512x512 views).",
            "controlnet",
            base="stable-diffusion-v1-5/stable-diffusion-v1-5",
            controlnet="lllyasviel/control_v11f1p_sd15_depth",
            recommended=KIND_RECOMMENDED["controlnet"],
        ),
        Preset(
            "sd2-depth",
            "Stable Diffusion 2 depth: depth enters as an extra UNet input channel (512x512 views).",
            "depth2img",
            base="stabilityai/stable-diffusion-2-depth",
            recommended=KIND_RECOMMENDED["depth2img"],
        ),
        Preset(
            "sdxl-depth",
            "SDXL 1.0 with the diffusers depth ControlNet (1024x1024 views; needs ~10 GB of GPU memory).",
            "sdxl-controlnet",
            base="stabilityai/stable-diffusion-xl-base-1.0",
            controlnet="diffusers/controlnet-depth-sdxl-1.0",
            recommended=KIND_RECOMMENDED["sdxl-controlnet"],
        ),
    ]
}

DEFAULT_MODEL = "micro"  # shipped, trained; `tiny` stays for the fastest tests


def _sdxl_parts(model, conditioning_scale: float = 1.0):
    raise JobInputError(
        "the texture job does not support SDXL models yet",
        "model",
        "start the server with an SD1.5/SD2 depth model (sd15-depth, sd2-depth) or tiny",
    )


# Model kind -> the factory `(model, conditioning_scale) -> DiffusionParts` that gives the multi-view sampler its
# codec, denoiser, scheduler config and text encoder (`concord.pipelines.denoiser`). Named "module:function" and
# imported on first use (`parts_factory`): the diffusers architectures' factories live in the sampler's layer,
# a Concord model's in its own package. SDXL's text conditioning (two encoders, pooled embeddings, size/crop ids)
# is not wired yet: its factory refuses clearly.
PARTS_FACTORIES: dict[str, str | Callable] = {
    "controlnet": "concord.pipelines.denoiser:controlnet_parts",
    "depth2img": "concord.pipelines.denoiser:depth_concat_parts",
    "sdxl-controlnet": _sdxl_parts,
    "micro": "concord.micro.model:micro_model_parts",
}


def parts_factory(kind: str) -> Callable:
    """The factory that builds a model of `kind`'s `DiffusionParts` (see `PARTS_FACTORIES`); JobInputError (field
    "model") for a kind the texture job cannot run."""
    factory = PARTS_FACTORIES.get(kind)
    if factory is None:
        runnable = ", ".join(k for k, f in PARTS_FACTORIES.items() if f is not _sdxl_parts)
        raise JobInputError(
            f"model kind {kind!r} cannot run the texture job", "model", f"use a model of kind {runnable}"
        )
    return pkgutil.resolve_name(factory) if isinstance(factory, str) else factory


@dataclass
class LoadedModel:
    """A pipeline on its device, with what clients are told about it."""

    name: str
    kind: str
    pipe: Any
    device: str
    dtype: str
    sources: list[str] = field(default_factory=list)
    recommended: RecommendedSettings | None = None  # None: the kind's (see `recommended_for`)

    @property
    def settings(self) -> RecommendedSettings:
        """The settings jobs use where a request sets none."""
        return self.recommended or KIND_RECOMMENDED.get(self.kind, KIND_RECOMMENDED["controlnet"])


def model_settings(model, kind: str | None = None) -> RecommendedSettings:
    """The recommended settings of a loaded model (`LoadedModel.settings`), or of its kind for anything else that
    names a model (benchmarks and tests that hand a pipeline their own parts)."""
    settings = getattr(model, "settings", None)
    if isinstance(settings, RecommendedSettings):
        return settings
    kind = kind or getattr(model, "kind", None)
    return KIND_RECOMMENDED.get(kind, KIND_RECOMMENDED["controlnet"])


def preset_recommended(preset: Preset) -> RecommendedSettings:
    return preset.recommended or KIND_RECOMMENDED[preset.kind]


def recommended_for(name: str, kind: str | None = None) -> RecommendedSettings:
    """A model's recommended settings without loading it: a preset's own, else by kind (a folder's kind is read from
    its model_index.json; a single file's from its tensors: SDXL or SD 1.5). Unknown names get Stable Diffusion 1.5's."""
    if name in PRESETS:
        return preset_recommended(PRESETS[name])
    if kind is None:
        path = Path(name)
        kind = "controlnet"
        if path.is_dir():
            try:
                class_name = json.loads((path / "model_index.json").read_text())["_class_name"]
                kind = _FOLDER_KINDS.get(class_name, kind)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        elif path.is_file():
            from concord.models import single_file

            try:
                if single_file.inspect(path).family == "sdxl":
                    kind = "sdxl-controlnet"
            except ModelUnavailable:
                pass
    return KIND_RECOMMENDED.get(kind, KIND_RECOMMENDED["controlnet"])


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


def offline_status(name: str, config: str | None = None) -> tuple[bool, str | None]:
    """(available_offline, reason) for a preset, folder or file, without loading anything (a single file's tensor
    names and shapes are read to tell its family; `config` is a single file's configuration folder)."""
    if config is not None and not (Path(name).is_file() and name not in PRESETS):
        return False, (
            f"--config {config} applies to single-file checkpoints (.safetensors) only; {name!r} is not one. A preset "
            f"or a diffusers folder carries its own configuration: drop --config."
        )
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
        from concord.models import on_disk

        for repo in needed:
            incomplete = on_disk.incomplete_snapshot(repo)
            if incomplete:
                return False, incomplete
        return True, None
    path = Path(name)
    if path.is_dir():
        from concord.models import on_disk

        if (path / "model_index.json").is_file():
            incomplete = on_disk.incomplete_folder(path)
            return (False, incomplete) if incomplete else (True, None)
        return False, on_disk.not_a_pipeline_folder(path, PRESETS)
    if path.is_file():
        if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            from concord.models import single_file

            try:
                single_file.plan(path, config)
            except ModelUnavailable as exc:
                return False, str(exc)
            return True, None
        return False, (
            f"{path} is not a checkpoint file: Concord loads .safetensors (or .ckpt) files, diffusers folders and "
            f"presets ({', '.join(PRESETS)})"
        )
    return False, f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder or file"


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", config: str | None = None) -> LoadedModel:
    """Load a preset, folder or single file onto `device`. Raises ModelUnavailable with a user-facing message.

    `config`: for a single file, a diffusers folder (or cached hub id) of the same family whose configuration and
    tokenizer files it loads with (else its family's preset's, from the Hugging Face cache); a `controlnet/`
    folder inside it, if any, is the depth ControlNet used (else the preset's).
    """
    quiet_libraries()
    import torch

    device = resolve_device(device)
    if config is not None and (name in PRESETS or not Path(name).is_file()):
        raise ModelUnavailable(f"Model {name!r} cannot load: {offline_status(name, config)[1]}")
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
            pipe, _ = _load_folder(_shipped_weights(name), dtype)
            sources = [str(_shipped_weights(name))]
        else:
            ok, reason = offline_status(name)
            if not ok:
                raise ModelUnavailable(f"Model {name!r} ({preset.description}) cannot load offline: {reason}")
            pipe = _load_preset(preset, dtype)
            sources = [r for r in (preset.base, preset.controlnet) if r]
        kind = preset.kind
    else:
        ok, reason = offline_status(name, config)
        if not ok:
            raise ModelUnavailable(f"Model {name!r} cannot load: {reason}")
        path = Path(name)
        pipe, kind = _load_folder(path, dtype) if path.is_dir() else _load_single_file(path, dtype, config)
        sources = [str(path.resolve())]
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return LoadedModel(
        name=name, kind=kind, pipe=pipe, device=device, dtype=str(dtype).replace("torch.", ""), sources=sources,
        recommended=recommended_for(name, kind),
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
            return StableDiffusionDepth2ImgPipeline.from_pretrained(preset.base, **_UNUSED_PARTS[preset.kind], **kw)
        controlnet = ControlNetModel.from_pretrained(preset.controlnet, **kw)
        cls = StableDiffusionXLControlNetPipeline if preset.kind == "sdxl-controlnet" else StableDiffusionControlNetPipeline
        return cls.from_pretrained(preset.base, controlnet=controlnet, **_UNUSED_PARTS[preset.kind], **kw)
    except Exception as exc:  # a corrupt or partial cache: say so instead of a traceback
        raise _wrap_load_error(preset.name, exc) from exc


# What each kind's pipeline is given as None: parts jobs never use (Concord's jobs bring their own depth map, and
# run without a safety checker), so their weights need not be on disk nor in memory.
_UNUSED_PARTS: dict[str, dict] = {
    "controlnet": dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
    "depth2img": dict(depth_estimator=None, feature_extractor=None),
    "sdxl-controlnet": {},
    "micro": {},
}

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
            pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **_UNUSED_PARTS[kind])
    except Exception as exc:
        raise _wrap_load_error(str(path), exc) from exc
    return pipe, kind


def _load_single_file(path: Path, dtype, config: str | None = None):
    """A checkpoint in one file (Stable Diffusion 1.x or SDXL, in the original layout most community models ship
    in), paired with its family's depth ControlNet; configuration files from `config` or the preset's hub repo."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from concord.models import single_file

    plan = single_file.plan(path, config)
    kind = plan.preset.kind
    cls = StableDiffusionXLControlNetPipeline if kind == "sdxl-controlnet" else StableDiffusionControlNetPipeline
    try:
        controlnet = ControlNetModel.from_pretrained(plan.controlnet, torch_dtype=dtype, local_files_only=True)
        pipe = cls.from_single_file(
            str(path),
            controlnet=controlnet,
            config=plan.config,
            torch_dtype=dtype,
            local_files_only=True,
            **_UNUSED_PARTS[kind],
        )
    except Exception as exc:
        raise _wrap_load_error(str(path), exc) from exc
    return pipe, kind


def quiet_libraries() -> None:
    """Keep transformers/diffusers chatter (e.g. about torchvision) out of users' consoles.

    Call before diffusers' pipelines are first imported: transformers reads TRANSFORMERS_VERBOSITY then.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
