"""Initial-noise models (MATH.md section 1). Pure functions of a ``torch.Generator``; no bpy, no HTTP, no
global RNG.

* :mod:`concord.noise.frame_noise`: per-frame models -- iid, shared, mixed, progressive (unit-variance forms).
* :mod:`concord.noise.uv_noise`: UV-space noise for the views of a mesh, white within each view (a partition of
  a fine noise texture; integral noise).
"""

from .frame_noise import iid_noise, mixed_noise, progressive_noise, shared_noise
from .uv_noise import matched_noise_texture_size, uv_noise_texels, uv_noise_texture_size, uv_space_noise

__all__ = [
    "iid_noise",
    "matched_noise_texture_size",
    "mixed_noise",
    "progressive_noise",
    "shared_noise",
    "uv_noise_texels",
    "uv_noise_texture_size",
    "uv_space_noise",
]
