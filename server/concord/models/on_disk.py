"""What is on disk for a model, checked without loading it: Hugging Face cache snapshots and diffusers folders.

The registry asks these before it loads, so that an incomplete download or a folder of the wrong kind fails with a
message naming the missing file or what the folder is, and what to do, instead of an error from inside diffusers.

The cache layout is huggingface_hub's (models--org--name/{blobs,snapshots/<commit>,refs/main}; files in a snapshot
are symlinks into blobs/), read through `huggingface_hub.try_to_load_from_cache`; never downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

# Parts of a pipeline Concord never loads (the registry passes None): their files may be absent from a folder or a
# snapshot. The safety checker and its feature extractor; SD 2 depth's depth estimator (jobs bring their own depth).
UNUSED_COMPONENTS = frozenset({"safety_checker", "feature_extractor", "depth_estimator", "image_encoder"})
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def hub_cached_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub repo's main snapshot in the local cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id (e.g. a path)
        return None
    return Path(hit) if isinstance(hit, str) else None


def hub_snapshot(repo_id: str) -> Path | None:
    """The folder of a hub repo's cached snapshot, if its pipeline or model config is there."""
    for fname in ("model_index.json", "config.json"):
        hit = hub_cached_file(repo_id, fname)
        if hit is not None:
            return hit.parent
    return None


def read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(Path(path).read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def missing_parts(root: Path) -> list[str]:
    """What a diffusers folder or hub snapshot lacks for Concord to load it, one phrase each: files whose cache
    symlink points at a missing blob, whole component folders, and weights missing beside a config.json. A
    pipeline's components are those its model_index.json lists (less `UNUSED_COMPONENTS`); a folder without
    model_index.json is one model (a ControlNet)."""
    root = Path(root)
    broken = [p.relative_to(root) for p in sorted(root.rglob("*")) if p.is_symlink() and not p.exists()]
    problems = [f"{b} (the cache's link points at a blob that is gone)" for b in broken]
    broken_dirs = {str(b.parent) if b.parent != Path(".") else "" for b in broken}
    components: dict[str, str] = {"": "diffusers"}
    if (root / "model_index.json").is_file():
        entries = read_json(root / "model_index.json")
        if entries is None:
            return problems  # reported when loading
        components = {
            k: v[0]
            for k, v in entries.items()
            if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None and k not in UNUSED_COMPONENTS
        }
    for comp, library in components.items():
        folder = root / comp if comp else root
        if not folder.is_dir():
            problems.append(f"{comp}/ (the whole folder)")
            continue
        if comp in broken_dirs or not (folder / "config.json").exists():
            continue  # already reported, or not a model (tokenizer, scheduler)
        if not any((folder / w).exists() for w in WEIGHT_FILES):
            wname = "model.safetensors" if library == "transformers" else "diffusion_pytorch_model.safetensors"
            problems.append(f"{comp + '/' if comp else ''}{wname} (the weights{' of ' + comp if comp else ''})")
    return problems


def incomplete_snapshot(repo_id: str) -> str | None:
    """Why the cached copy of `repo_id` cannot load (None when complete, or when it is not cached at all)."""
    snapshot = hub_snapshot(repo_id)
    if snapshot is None:
        return None
    problems = missing_parts(snapshot)
    if not problems:
        return None
    return (
        f"the Hugging Face cache holds an incomplete copy of {repo_id} ({snapshot}): missing "
        f"{'; '.join(problems)}. Download it again on a machine with internet (`hf download {repo_id}`): files "
        f"already there are kept and only the missing ones are fetched."
    )


def incomplete_folder(path: Path) -> str | None:
    """Why a diffusers folder (with model_index.json) cannot load, or None."""
    problems = missing_parts(path)
    if not problems:
        return None
    return (
        f"{path} is incomplete: missing {'; '.join(problems)}. Copy the folder again, or write it again with "
        f"diffusers' save_pretrained."
    )


def not_a_pipeline_folder(path: Path, presets: dict) -> str:
    """What a folder without model_index.json is, and what to pass instead (`presets`: the registry's PRESETS)."""
    if path.name.startswith("models--") and (path / "snapshots").is_dir():
        repo = path.name[len("models--"):].replace("--", "/")
        preset = next((p.name for p in presets.values() if repo in (p.base, p.controlnet)), None)
        use = (
            f"use --model {preset}: presets find the cache by themselves"
            if preset
            else f"pass its snapshot folder ({path / 'snapshots'}/<commit>) instead"
        )
        return f"{path} is the Hugging Face cache's folder of {repo} (no model_index.json at its top): {use}"
    if (path / "config.json").is_file():
        cfg = read_json(path / "config.json") or {}
        what = cfg.get("_class_name") or (cfg.get("architectures") or ["model"])[0]
        above = path.parent
        hint = f" ({above} has one)" if (above / "model_index.json").is_file() else ""
        extra = (
            " A ControlNet is not a base model: Concord pairs each base model with its family's depth ControlNet."
            if what == "ControlNetModel"
            else ""
        )
        return (
            f"{path} holds a single {what} (config.json), one part of a model, not a diffusers pipeline folder (which "
            f"has model_index.json). Pass the pipeline folder above it{hint}.{extra}"
        )
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".ckpt"))
    if files:
        return (
            f"{path} is not a diffusers pipeline folder (no model_index.json) but holds {files[0].name}: pass the file "
            f"itself (--model {files[0]})"
        )
    inner = sorted(p for p in path.iterdir() if (p / "model_index.json").is_file())
    if inner:
        return f"{path} has no model_index.json, but {inner[0].name}/ inside it does: pass --model {inner[0]}"
    return (
        f"{path} has no model_index.json: it is not a diffusers pipeline folder. Pass a folder written by diffusers' "
        f"save_pretrained (or a Hub snapshot), a .safetensors checkpoint, or a preset ({', '.join(presets)})"
    )
