"""Initial-noise models for joint generation: UV-space noise for the views of a mesh, and the classic
per-frame models (iid, shared, mixed, progressive) with the corrected, unit-variance formulas.

What it is for
--------------
A diffusion sampler starts every view (or frame) from Gaussian noise eps_i ~ N(0, I); *how the eps_i are
correlated* decides how alike the results start. MATH.md section 1 lists the models; every function here keeps
each view's noise marginally N(0, 1) per element (the sampler requires it; the tests check it).

UV-space noise (MATH.md section 1, last bullet; the integral-noise idea of Chang et al., "How I Warped Your
Noise", ICLR'24)::

    Z ~ N(0, I)  on an S x S x C noise texture
    eps_v(p) = sum_{t in T_v(p)} Z(t) / sqrt(|T_v(p)|)       for a foreground latent pixel p of view v
    eps_v(p) ~ N(0, I) iid                                   for a background latent pixel

T_v(p) is the set of DISTINCT noise texels that the UVs of the image pixels under p's footprint (the f x f
block of image pixels one latent pixel covers, f = H / h, e.g. 8 for Stable Diffusion) land in: texel column
``floor(frac(u) * S)``, row ``floor((1 - frac(v)) * S)`` (Blender UVs, wrapped modulo 1, row 0 = top, as in
``concord.geometry.bake``). A sum of n distinct iid N(0, 1) values divided by sqrt(n) is exactly N(0, 1), so
every latent pixel is exactly standard normal, and two latent pixels -- in the same or different views --
whose footprints cover the same texel set start from the same value: one surface point starts from the same
noise in every view. Footprints that overlap partially are partially correlated (|T cap T'| / sqrt(|T| |T'|)).

* Foreground latent pixel: a strict majority of its f x f image pixels are foreground (``mask``); only those
  foreground image pixels contribute texels (a background pixel has no UV).
* Background latent pixels (the rest) take iid N(0, 1) drawn from ``generator`` **before** the texture, as the
  full tensor ``randn((V, C, h, w))`` of which the background positions are kept: they are independent of the
  foreground and do not depend on the geometry at all.
* ``noise_texture_size=None``: S such that one texel is about one latent pixel's footprint on the surface:
  ``S = round(1 / L)`` with L the median over foreground latent pixels of ``sqrt(|det [du_x, du_y]|)``, the
  square root of the UV-area of the parallelogram spanned by the UV differences to the right and lower
  neighbouring latent pixels (centre image pixels of the blocks); pairs crossing a UV seam or a depth edge
  (a UV jump > 0.25) are left out (:func:`concord.geometry.sync.footprint_texture_size`). Clipped to [4, 4096].
  With S there, a footprint covers ~1-4 texels; a smaller S makes more pixels share exactly.

Classic models (per view/frame i, all (N, C, h, w), Ge et al., "Preserve Your Own Correlation", ICCV'23)::

    iid:          eps_i ~ N(0, I) independent
    shared:       eps_i = eps
    mixed:        eps_i = eps_shared + eps_ind_i, eps_shared ~ N(0, a^2/(1+a^2)), eps_ind_i ~ N(0, 1/(1+a^2))
                  -> corr(eps_i, eps_j) = a^2 / (1 + a^2)
    progressive:  eps_0 ~ N(0, I), eps_i = a/sqrt(1+a^2) eps_{i-1} + eps_ind_i, eps_ind_i ~ N(0, 1/(1+a^2))
                  -> corr(eps_i, eps_{i-k}) = (a / sqrt(1 + a^2))^k

Random numbers come only from the ``generator`` passed in (on its device), so a seed reproduces the noise.

What it must never do: import bpy, touch the network or the file system, or use the global RNG.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..geometry.sync import footprint_texture_size

__all__ = [
    "iid_noise",
    "matched_noise_texture_size",
    "mixed_noise",
    "progressive_noise",
    "shared_noise",
    "uv_noise_texels",
    "uv_space_noise",
]


def _shape4(shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"noise shape must be (N, C, h, w) with positive sizes, got {shape}")
    return shape  # type: ignore[return-value]


def _randn(shape, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    # Draw in float32 on the generator's device (fp16 draws would change the values with the dtype), then cast.
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Classic per-frame models (MATH.md section 1)
# ----------------------------------------------------------------------------------------------------------


def iid_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """eps_i ~ N(0, I), independent for every i. shape (N, C, h, w)."""
    return _randn(_shape4(shape), generator, dtype)


def shared_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """eps_i = eps for every i (one N(0, I) draw repeated). shape (N, C, h, w)."""
    n, c, h, w = _shape4(shape)
    return _randn((1, c, h, w), generator, dtype).expand(n, c, h, w).contiguous()


def mixed_noise(
    shape: Sequence[int], generator: torch.Generator, alpha: float = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Mixed noise (Ge et al. 2023): eps_i = eps_shared + eps_ind_i with variances a^2/(1+a^2) and 1/(1+a^2),
    so eps_i ~ N(0, I) and corr(eps_i, eps_j) = a^2 / (1 + a^2) for i != j. ``alpha`` = a >= 0."""
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    n, c, h, w = _shape4(shape)
    a2 = float(alpha) ** 2
    shared = _randn((1, c, h, w), generator, torch.float32) * math.sqrt(a2 / (1.0 + a2))
    ind = _randn((n, c, h, w), generator, torch.float32) * math.sqrt(1.0 / (1.0 + a2))
    return (shared + ind).to(dtype)


def progressive_noise(
    shape: Sequence[int], generator: torch.Generator, alpha: float = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Progressive noise (Ge et al. 2023): eps_0 ~ N(0, I), eps_i = a/sqrt(1+a^2) eps_{i-1} + eps_ind_i with
    eps_ind_i ~ N(0, 1/(1+a^2) I): each eps_i ~ N(0, I), corr(eps_i, eps_{i-k}) = (a/sqrt(1+a^2))^k."""
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    n, c, h, w = _shape4(shape)
    a2 = float(alpha) ** 2
    r = math.sqrt(a2 / (1.0 + a2))
    # Draw everything at once (one generator call, reproducible), then run the recursion.
    z = _randn((n, c, h, w), generator, torch.float32)
    out = torch.empty_like(z)
    out[0] = z[0]
    s = math.sqrt(1.0 / (1.0 + a2))
    for i in range(1, n):
        out[i] = r * out[i - 1] + s * z[i]
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# UV-space noise
# ----------------------------------------------------------------------------------------------------------


def _block_factor(image: int, latent: int, axis: str) -> int:
    if latent < 1 or image % latent:
        raise ValueError(
            f"view {axis} {image} is not a whole multiple of the latent {axis} {latent} "
            "(each latent pixel must cover an f x f block of image pixels)"
        )
    return image // latent


def _blocks(a: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """(V, H, W, ...) -> (V, h, w, fy*fx, ...): the image pixels under each latent pixel."""
    v, hh, ww = a.shape[:3]
    rest = a.shape[3:]
    h, w = hh // fy, ww // fx
    b = a.reshape(v, h, fy, w, fx, *rest)
    b = np.moveaxis(b, 2, 3)  # (V, h, w, fy, fx, ...)
    return b.reshape(v, h, w, fy * fx, *rest)


def uv_noise_texels(
    uv: np.ndarray, mask: np.ndarray, latent_hw: tuple[int, int], noise_texture_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The texel sets T_v(p) of :func:`uv_space_noise` (module docstring), geometry only.

    Returns ``(foreground, texel, owner)``: ``foreground`` bool (V, h, w) latent pixels that take UV noise;
    ``texel`` int64 (M,) distinct noise-texel indices (row * S + col) and ``owner`` int64 (M,) the flat
    index into (V, h, w) of the latent pixel each belongs to (sorted by owner, then texel).
    """
    uv = np.asarray(uv)
    mask = np.asarray(mask, dtype=bool)
    if uv.ndim != 4 or uv.shape[-1] != 2 or mask.shape != uv.shape[:3]:
        raise ValueError(f"uv must be (V, H, W, 2) and mask (V, H, W), got {uv.shape} and {mask.shape}")
    v, hh, ww = mask.shape
    h, w = int(latent_hw[0]), int(latent_hw[1])
    fy, fx = _block_factor(hh, h, "height"), _block_factor(ww, w, "width")
    s = int(noise_texture_size)
    if s < 1:
        raise ValueError(f"noise_texture_size must be positive, got {noise_texture_size}")

    mblk = _blocks(mask, fy, fx)  # (V, h, w, f2)
    f2 = fy * fx
    foreground = mblk.sum(axis=-1) * 2 > f2  # strict majority
    uvb = _blocks(uv.astype(np.float64, copy=False), fy, fx)  # (V, h, w, f2, 2)
    fu = np.mod(uvb[..., 0], 1.0)
    fv = np.mod(uvb[..., 1], 1.0)
    col = np.minimum(np.floor(fu * s).astype(np.int64), s - 1)
    row = np.minimum(np.floor((1.0 - fv) * s).astype(np.int64), s - 1)
    tex = row * s + col
    big = np.int64(s) * s  # sentinel above every texel: background image pixels
    tex = np.where(mblk & foreground[..., None], tex, big).reshape(v * h * w, f2)
    tex.sort(axis=1)
    distinct = tex < big
    distinct[:, 1:] &= tex[:, 1:] != tex[:, :-1]
    owner, slot = np.nonzero(distinct)  # row-major: sorted by owner, then texel
    return foreground, tex[owner, slot], owner.astype(np.int64)


def uv_space_noise(
    uv: np.ndarray,
    mask: np.ndarray,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator,
    noise_texture_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """UV-space initial noise for V views (module docstring): (V, C, h, w) on the generator's device.

    ``uv`` (V, H, W, 2) and ``mask`` (V, H, W) at the view (image) resolution of the ViewSet contract
    (``concord.geometry.viewset``); ``latent_shape`` = (C, h, w) with H = f h, W = f w. Each latent pixel is
    exactly N(0, 1); latent pixels whose footprints hit the same texel set -- in any views -- are equal.
    Draw order (for reproducibility): background ``randn(V, C, h, w)``, then the texture ``randn(C, S, S)``.
    """
    c, h, w = (int(x) for x in latent_shape)
    mask = np.asarray(mask, dtype=bool)
    uv = np.asarray(uv)
    v = mask.shape[0]
    if noise_texture_size is None:
        noise_texture_size = matched_noise_texture_size(uv, mask, (h, w))
    s = int(noise_texture_size)
    foreground, texel, owner = uv_noise_texels(uv, mask, (h, w), s)

    device = generator.device
    background = _randn((v, c, h, w), generator, torch.float32)
    z = _randn((c, s * s), generator, torch.float32)

    # eps(p) = sum_{t in T(p)} Z(t) / sqrt(|T(p)|): index_add over the (owner, texel) pairs.
    n = v * h * w
    owner_t = torch.from_numpy(owner).to(device)
    texel_t = torch.from_numpy(texel).to(device)
    sums = torch.zeros(c, n, device=device, dtype=torch.float32)
    sums.index_add_(1, owner_t, z[:, texel_t])
    count = torch.bincount(owner_t, minlength=n).to(torch.float32)
    fg = torch.from_numpy(foreground.reshape(-1)).to(device)
    eps = sums / count.clamp_min(1.0).sqrt()
    out = background.permute(1, 0, 2, 3).reshape(c, n).clone()
    out[:, fg] = eps[:, fg]
    return out.reshape(c, v, h, w).permute(1, 0, 2, 3).contiguous().to(dtype)


def matched_noise_texture_size(uv: np.ndarray, mask: np.ndarray, latent_hw: tuple[int, int]) -> int:
    """The automatic noise-texture size S of :func:`uv_space_noise` (a texel about one latent footprint):
    :func:`concord.geometry.sync.footprint_texture_size` of the blocks' centre-pixel UVs and majority mask."""
    mask = np.asarray(mask, dtype=bool)
    h, w = int(latent_hw[0]), int(latent_hw[1])
    fy = _block_factor(mask.shape[1], h, "height")
    fx = _block_factor(mask.shape[2], w, "width")
    majority = _blocks(mask, fy, fx).sum(axis=-1) * 2 > fy * fx
    return footprint_texture_size(_centre_pixels(np.asarray(uv), mask, (h, w)), majority)


def _centre_pixels(uv: np.ndarray, mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """UV of the image pixel at (f//2, f//2) of each latent block: (V, h, w, 2), 0 where that pixel is
    background (the estimator leaves pairs with a background centre out through the foreground test)."""
    h, w = latent_hw
    fy, fx = mask.shape[1] // h, mask.shape[2] // w
    centre = uv[:, fy // 2 :: fy, fx // 2 :: fx][:, :h, :w]
    cm = mask[:, fy // 2 :: fy, fx // 2 :: fx][:, :h, :w]
    return np.where(cm[..., None], centre, np.nan)
