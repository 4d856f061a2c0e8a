"""ViewSet array packing and the `texture` job's parameters, as plain dicts the client sends.

The arrays follow the ViewSet contract written once in server/concord/geometry/viewset.py (cited, not
restated in full): V views stacked on axis 0; ``depth`` float32 (V, H, W) planar camera z, background exactly
0; ``mask`` bool; ``uv`` float32 (V, H, W, 2) in Blender's convention, 0 on background; ``normal`` float32
(V, H, W, 3) world-space unit, 0 on background; ``intrinsics`` float32 (V, 3, 3) OpenCV K;
``world_to_camera`` float32 (V, 4, 4) OpenCV axes; image rows top-first.

:func:`pack_viewset` stacks per-view maps and enforces the background rules at this edge (Blender writes
1e10 depth on background); :func:`check_viewset` is a numpy-only restatement of the checks the server runs,
so a broken capture is reported in Blender before any upload.

Layer rule: plain Python + numpy. No bpy, no torch, no server package.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

TEXTURE_SIZES = (256, 512, 1024, 2048, 4096)
SHARED_ATTENTION_MODES = ("off", "all", "reference")


# The server's bound on consistency.attention_correspondence (TextureParams; a test checks they agree)
MAX_ATTENTION_CORRESPONDENCE = 16.0


class PackingError(ValueError):
    """Captured maps that break the ViewSet contract; the message names the view and the field."""


def pack_viewset(views: Sequence[Mapping[str, np.ndarray]], cameras: Iterable) -> dict[str, np.ndarray]:
    """Stack per-view dicts {depth, mask, uv, normal} and cameras (objects with .K, .world_to_camera)."""
    cams = list(cameras)
    if not views:
        raise PackingError("no views were captured")
    if len(cams) != len(views):
        raise PackingError(f"{len(views)} views but {len(cams)} cameras")
    shape = np.shape(views[0]["depth"])
    for k, v in enumerate(views):
        if np.shape(v["depth"]) != shape:
            raise PackingError(f"view {k} is {np.shape(v['depth'])}, view 0 is {shape}: views must share a size")
    mask = np.stack([np.asarray(v["mask"], dtype=bool) for v in views])
    depth = np.stack([np.asarray(v["depth"], dtype=np.float32) for v in views])
    mask &= np.isfinite(depth) & (depth > 0)
    depth = np.where(mask, depth, 0.0).astype(np.float32)
    uv = np.where(mask[..., None], np.stack([np.asarray(v["uv"], np.float32)[..., :2] for v in views]), 0.0)
    normal = np.stack([np.asarray(v["normal"], np.float32)[..., :3] for v in views])
    n = np.linalg.norm(normal, axis=-1, keepdims=True)
    normal = np.where(mask[..., None] & (n > 1e-6), normal / np.maximum(n, 1e-6), 0.0)
    # a foreground pixel whose normal is missing would break the contract: treat it as background
    mask &= np.linalg.norm(normal, axis=-1) > 0.5
    depth = np.where(mask, depth, 0.0).astype(np.float32)
    uv = np.where(mask[..., None], uv, 0.0).astype(np.float32)
    normal = np.where(mask[..., None], normal, 0.0).astype(np.float32)
    arrays = {
        "depth": depth,
        "mask": mask,
        "uv": uv,
        "normal": normal,
        "intrinsics": np.stack([np.asarray(c.K, np.float32) for c in cams]),
        "world_to_camera": np.stack([np.asarray(c.world_to_camera, np.float32) for c in cams]),
    }
    check_viewset(arrays)
    return arrays


def check_viewset(arrays: Mapping[str, np.ndarray]) -> None:
    """Raise PackingError where the arrays break the contract (shapes, dtypes, background, unit normals)."""
    depth = arrays["depth"]
    if depth.ndim != 3:
        raise PackingError(f"depth must be (V, H, W), got {depth.shape}")
    V, H, W = depth.shape
    want = {
        "depth": ((V, H, W), np.float32),
        "mask": ((V, H, W), np.bool_),
        "uv": ((V, H, W, 2), np.float32),
        "normal": ((V, H, W, 3), np.float32),
        "intrinsics": ((V, 3, 3), np.float32),
        "world_to_camera": ((V, 4, 4), np.float32),
    }
    for name, (shape, dtype) in want.items():
        a = arrays[name]
        if a.shape != shape or a.dtype != dtype:
            raise PackingError(f"{name}: expected {np.dtype(dtype).name} {shape}, got {a.dtype} {a.shape}")
        if a.dtype != np.bool_ and not np.isfinite(a).all():
            raise PackingError(f"{name}: non-finite values")
    mask = arrays["mask"]
    for k in range(V):
        if not mask[k].any():
            raise PackingError(
                f"view {k} does not see the object (empty mask): check the rig or the scene cameras' aim"
            )
    if (depth[mask] <= 0).any() or (depth[~mask] != 0).any():
        raise PackingError("depth must be > 0 on the object and exactly 0 elsewhere")
    norms = np.linalg.norm(arrays["normal"][mask], axis=-1)
    if norms.size and np.abs(norms - 1).max() > 1e-2:
        raise PackingError("normals must be unit length on the object")


def prompt_params(prompt: str, negative_prompt: str, seed: int, what: str, error: type = PackingError) -> dict:
    """The params every job kind starts with (prompt, negative prompt, seed) as JSON-ready values; an empty prompt
    raises ``error`` saying that it says what ``what`` should look like."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise error(f"write a prompt: it says what {what} should look like")
    return {"prompt": prompt, "negative_prompt": negative_prompt or "", "seed": int(seed)}


def check_choice(label: str, value: str, choices: tuple, error: type = PackingError) -> None:
    """Raise ``error`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise error(f"{label} must be one of {choices}, got {value!r}")


def texture_params(
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 30,
    guidance: float = 7.5,
    conditioning_scale: float = 1.0,
    texture_size: int = 1024,
    grid: bool = False,
    shared_attention: str = "all",
    attention_correspondence: float | None = None,
    uv_sync: bool = True,
    uv_noise: bool = True,
    loss_guidance: bool = False,
    cos_power: float | None = None,
    padding: int | None = None,
) -> dict:
    """The `texture` job's params (server/concord/api/schemas.py TextureParams), as JSON-ready values.

    ``attention_correspondence`` None leaves the strength out, so the server uses its model's."""
    params = prompt_params(prompt, negative_prompt, seed, "the texture")
    check_choice("shared attention", shared_attention, SHARED_ATTENTION_MODES)
    params.update({
        "steps": int(steps),
        "guidance": float(guidance),
        "conditioning_scale": float(conditioning_scale),
        "texture_size": int(texture_size),
        "consistency": {
            "grid": bool(grid),
            "shared_attention": shared_attention,
            "uv_sync": bool(uv_sync),
            "uv_noise": bool(uv_noise),
            "loss_guidance": bool(loss_guidance),
        },
    })
    if attention_correspondence is not None:
        beta = float(attention_correspondence)
        if not 0.0 <= beta <= MAX_ATTENTION_CORRESPONDENCE:
            raise PackingError(
                f"correspondence strength must be within 0..{MAX_ATTENTION_CORRESPONDENCE:g}, got {beta:g}"
            )
        params["consistency"]["attention_correspondence"] = beta
    bake = {}
    if cos_power is not None:
        bake["cos_power"] = float(cos_power)
    if padding is not None:
        bake["padding"] = int(padding)
    if bake:
        params["bake"] = bake
    return params
