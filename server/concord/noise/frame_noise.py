"""Per-frame (per-view) initial-noise models: iid, shared, mixed and progressive, in their unit-variance forms.

What it is for
--------------
A diffusion sampler starts every frame (or view) i from Gaussian noise eps_i ~ N(0, I); *how the eps_i are
correlated* decides how alike the frames start. These are the classic models of MATH.md section 1 (used by the
stylize path); the multi-view texturing job uses ``concord.noise.uv_noise`` instead. Every function keeps each
frame marginally N(0, 1) per element -- the sampler requires it, and the slides' versions with (1 - r) weights
do not (MATH.md section 1 gives the corrected forms implemented here; the tests check the property).

All tensors are (N, C, h, w): N frames. Random numbers come only from the ``generator`` passed in (drawn in
float32 on its device, then cast), so a seed reproduces the noise whatever the dtype.

What it must never do: import bpy, touch the network or the file system, or use the global RNG.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["iid_noise", "mixed_noise", "progressive_noise", "shared_noise"]


def _shape4(shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"noise shape must be (N, C, h, w) with positive sizes, got {shape}")
    return shape  # type: ignore[return-value]


def _alpha(alpha: float) -> float:
    a = float(alpha)
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return a


def _randn(shape, generator: torch.Generator) -> torch.Tensor:
    # float32 on the generator's device: fp16 draws would change the values with the dtype.
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def iid_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """iid: eps_i ~ N(0, I), independent for every frame i (MATH.md section 1). corr(eps_i, eps_j) = 0."""
    return _randn(_shape4(shape), generator).to(dtype)


def shared_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """shared: eps_i = eps for every frame i, eps ~ N(0, I) (MATH.md section 1). corr(eps_i, eps_j) = 1."""
    n, c, h, w = _shape4(shape)
    return _randn((1, c, h, w), generator).expand(n, c, h, w).contiguous().to(dtype)


def mixed_noise(
    shape: Sequence[int], generator: torch.Generator, alpha: float = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """mixed (Ge et al., "Preserve Your Own Correlation", ICCV'23; MATH.md section 1)::

        eps_shared ~ N(0, a^2/(1+a^2) I),  eps_ind_i ~ N(0, 1/(1+a^2) I),  eps_i = eps_shared + eps_ind_i
        var(eps_i) = a^2/(1+a^2) + 1/(1+a^2) = 1,   corr(eps_i, eps_j) = a^2 / (1 + a^2)   (i != j)

    ``alpha`` = a >= 0 (0: iid; a -> inf: shared). Draw order: eps_shared, then all eps_ind at once.
    """
    a2 = _alpha(alpha) ** 2
    n, c, h, w = _shape4(shape)
    shared = _randn((1, c, h, w), generator) * math.sqrt(a2 / (1.0 + a2))
    ind = _randn((n, c, h, w), generator) * math.sqrt(1.0 / (1.0 + a2))
    return (shared + ind).to(dtype)


def progressive_noise(
    shape: Sequence[int], generator: torch.Generator, alpha: float = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """progressive (Ge et al., ICCV'23; MATH.md section 1), an AR(1) chain over frames::

        eps_0 ~ N(0, I)
        eps_i = a/sqrt(1+a^2) * eps_{i-1} + eps_ind_i,   eps_ind_i ~ N(0, 1/(1+a^2) I)
        var(eps_i) = a^2/(1+a^2) * 1 + 1/(1+a^2) = 1,     corr(eps_i, eps_{i-k}) = (a / sqrt(1+a^2))^k

    ``alpha`` = a >= 0. One generator call draws all N standard normals (eps_0 and the unit-variance innovations).
    """
    a2 = _alpha(alpha) ** 2
    n, c, h, w = _shape4(shape)
    r = math.sqrt(a2 / (1.0 + a2))
    s = math.sqrt(1.0 / (1.0 + a2))
    z = _randn((n, c, h, w), generator)
    out = torch.empty_like(z)
    out[0] = z[0]
    for i in range(1, n):
        out[i] = r * out[i - 1] + s * z[i]
    return out.to(dtype)
