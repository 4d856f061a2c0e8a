"""Initial-noise models (MATH.md section 1): iid, shared, mixed, progressive, and UV-space noise for the
views of a mesh. Pure functions of a ``torch.Generator``; no bpy, no HTTP, no global RNG."""

from .uv_noise import (
    iid_noise,
    matched_noise_texture_size,
    mixed_noise,
    progressive_noise,
    shared_noise,
    uv_noise_texels,
    uv_space_noise,
)

__all__ = [
    "iid_noise",
    "matched_noise_texture_size",
    "mixed_noise",
    "progressive_noise",
    "shared_noise",
    "uv_noise_texels",
    "uv_space_noise",
]
