"""UV-space initial noise for the V views of a mesh: one surface point starts from correlated noise in every
view that sees it, while the noise of each view stays white (iid N(0, 1) per latent pixel).

What it is for
--------------
MATH.md section 1, last bullet. A diffusion sampler needs every latent pixel of every view to start from N(0, 1)
noise, independent of its neighbours in the same view (correlated initial noise changes what the model draws:
blur, blotches). Multi-view texturing also wants the views to start alike where they see the same surface.
Drawing the noise on the surface (a noise texture) and reading it through each view's UV map gives the second;
the partition below keeps the first.

The partition (integral noise: Chang et al., "How I Warped Your Noise", ICLR'24; the unit-variance sum follows
the renormalisation idea of Kass & Pesare, "Coherent noise for non-photorealistic rendering", ToG'11)::

    Z(t) ~ N(0, I_C) iid                   for the texels t of an S x S noise texture (S several texels per
                                           latent-pixel footprint)
    owner_v(t) = the latent pixel of view v that texel t's centre falls in (at most one; none if v misses t)
    T_v(p)     = { t : owner_v(t) = p }    -- disjoint for the pixels p of one view
    eps_v(p)   = sum_{t in T_v(p)} Z(t) / sqrt(|T_v(p)|)        if p is foreground and T_v(p) is not empty
    eps_v(p)   ~ N(0, I_C) iid                                   otherwise (background, or a grazing pixel whose
                                                                 footprint got no texel)

A sum of n iid N(0, 1) values divided by sqrt(n) is exactly N(0, 1); disjoint sets make two pixels of one view
exactly independent (white within a view). Two pixels p, q of DIFFERENT views share the texels of the surface
both cover, so ``corr(eps_v(p), eps_w(q)) = |T_v(p) cap T_w(q)| / sqrt(|T_v(p)| |T_w(q)|)``: high where their
footprints overlap on the surface. (Footprints of two views are never aligned, so the correlation of one surface
point across views is below 1: for two equal, randomly offset square footprints the overlap at a footprint's
centre averages (3/4)^2 ~ 0.56; tests/server/test_uv_noise.py measures it.)

"Which latent pixel a texel's centre falls in", from the views' UV maps at image resolution (H, W) (the ViewSet
contract, ``concord.geometry.viewset``; latents (h, w), one latent pixel = an fy x fx block, fy = H / h):
every foreground image pixel x of view v samples the texel its UV u_v(x) lands in, column
``floor(frac(u) * S)``, row ``floor((1 - frac(v)) * S)`` (Blender UVs wrapped modulo 1, row 0 = top, as in
``concord.geometry.bake``). Among the image pixels of view v that land in texel t, the one whose UV is nearest
t's centre (in texel units; ties: the first in row-major order) is where t's centre falls, and its latent
block is owner_v(t). A texel no image pixel of v lands in has no owner in v. The UV map is the rendered,
depth-tested surface, so occluded texels have no owner. With texels about 2 image pixels wide (the automatic
size below: f = 8 -> 4 x 4 texels per footprint), almost every texel under a footprint is sampled.

* Foreground latent pixel: a strict majority of its image pixels are foreground
  (:func:`concord.geometry.sync.latent_foreground`, the rule LatentSync uses). A texel whose nearest image
  pixel lies in a background latent pixel is dropped.
* Background draws come from ``generator`` **first**, as the full tensor ``randn((V, C, h, w))`` of which the
  positions that take no UV noise are kept: they do not depend on the geometry.
* Then the texture: ``randn((C, U))`` for the U texels owned in at least one view, in increasing texel id
  (only those values are ever read; drawing the full S x S texture would cost S^2 for nothing).
* ``noise_texture_size=None``: :func:`uv_noise_texture_size` = k x :func:`matched_noise_texture_size` (a texel
  about one footprint), k = clip(f // 2, 1, 4) with f = min(fy, fx): k^2 = 16 texels per footprint at f = 8,
  and a texel never narrower than ~2 image pixels (finer texels would go unsampled). Clipped to 4096.

Random numbers come only from the ``generator`` passed in (on its device), so a seed reproduces the noise.
What it must never do: import bpy, touch the network or the file system, or use the global RNG.
"""

from __future__ import annotations

import numpy as np
import torch

from ..geometry.bake import texel_position
from ..geometry.sync import MAX_TEXTURE_SIZE, footprint_texture_size, latent_foreground

__all__ = [
    "matched_noise_texture_size",
    "uv_noise_texels",
    "uv_noise_texture_size",
    "uv_space_noise",
]

#: Texels per footprint side at the automatic size (capped by f // 2 so a texel spans >= ~2 image pixels).
TEXELS_PER_FOOTPRINT = 4


def _check(uv: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uv = np.asarray(uv)
    mask = np.asarray(mask, dtype=bool)
    if uv.ndim != 4 or uv.shape[-1] != 2 or mask.shape != uv.shape[:3]:
        raise ValueError(
            f"uv must be (V, H, W, 2) and mask (V, H, W) of the same views, got {uv.shape} and {mask.shape} "
            "(pass the ViewSet's uv and mask at view resolution)"
        )
    return uv, mask


def matched_noise_texture_size(uv: np.ndarray, mask: np.ndarray, latent_hw: tuple[int, int]) -> int:
    """S whose texel is about one latent pixel's footprint on the surface:
    :func:`concord.geometry.sync.footprint_texture_size` of the blocks' centre-pixel UVs and majority mask."""
    uv, mask = _check(uv, mask)
    h, w = int(latent_hw[0]), int(latent_hw[1])
    majority = latent_foreground(mask, (h, w))
    fy, fx = mask.shape[1] // h, mask.shape[2] // w
    centre = uv[:, fy // 2 :: fy, fx // 2 :: fx][:, :h, :w]
    cm = mask[:, fy // 2 :: fy, fx // 2 :: fx][:, :h, :w]
    return footprint_texture_size(np.where(cm[..., None], centre, np.nan), majority)


def uv_noise_texture_size(uv: np.ndarray, mask: np.ndarray, latent_hw: tuple[int, int]) -> int:
    """The automatic noise-texture size of :func:`uv_space_noise`: k x :func:`matched_noise_texture_size`,
    k = clip(min(fy, fx) // 2, 1, TEXELS_PER_FOOTPRINT), at most MAX_TEXTURE_SIZE (module docstring)."""
    uv, mask = _check(uv, mask)
    f = min(mask.shape[1] // int(latent_hw[0]), mask.shape[2] // int(latent_hw[1]))
    k = int(np.clip(f // 2, 1, TEXELS_PER_FOOTPRINT))
    return int(min(k * matched_noise_texture_size(uv, mask, latent_hw), MAX_TEXTURE_SIZE))


def uv_noise_texels(
    uv: np.ndarray, mask: np.ndarray, latent_hw: tuple[int, int], noise_texture_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The partition T_v(p) of :func:`uv_space_noise` (module docstring), geometry only.

    Returns ``(foreground, texel, owner)``: ``foreground`` bool (V, h, w), the latent pixels that take UV noise
    (majority foreground AND at least one texel); ``texel`` int64 (M,) noise-texel ids (row * S + col) and
    ``owner`` int64 (M,) the flat index into (V, h, w) of the latent pixel each belongs to, sorted by owner, then
    texel. Within one view a texel appears at most once. ``noise_texture_size=None``: :func:`uv_noise_texture_size`.
    """
    uv, mask = _check(uv, mask)
    v, hh, ww = mask.shape
    h, w = int(latent_hw[0]), int(latent_hw[1])
    fg_latent = latent_foreground(mask, (h, w))  # validates the block factors
    fy, fx = hh // h, ww // w
    s = uv_noise_texture_size(uv, mask, (h, w)) if noise_texture_size is None else int(noise_texture_size)
    if not 1 <= s <= MAX_TEXTURE_SIZE:
        raise ValueError(f"noise_texture_size must be in 1..{MAX_TEXTURE_SIZE}, got {noise_texture_size}")

    uvf = uv.reshape(-1, 2)
    sel = mask.reshape(-1) & np.isfinite(uvf).all(-1)
    pix = np.flatnonzero(sel)  # flat index into (V, H, W), increasing
    x, y = texel_position(uvf[pix], s)  # texels from the top-left corner (Blender's v flipped)
    col = np.minimum(np.floor(x), s - 1)
    row = np.minimum(np.floor(y), s - 1)
    d2 = (x - col - 0.5) ** 2 + (y - row - 0.5) ** 2  # squared distance to the texel centre, texel units, <= 0.5
    view = pix // (hh * ww)
    key = view * (s * s) + row.astype(np.int64) * s + col.astype(np.int64)  # (view, texel)
    # Per (view, texel): the image pixel nearest the texel centre. Sort by key, then distance (lexsort is stable:
    # ties keep row-major pixel order), and keep each key's first entry.
    order = np.lexsort((d2, key))
    ks = key[order]
    first = np.ones(ks.size, dtype=bool)
    first[1:] = ks[1:] != ks[:-1]
    win = order[first]
    p = pix[win]
    r_img, c_img = (p % (hh * ww)) // ww, p % ww
    owner = view[win] * (h * w) + (r_img // fy) * w + c_img // fx
    texel = key[win] % (s * s)
    keep = fg_latent.reshape(-1)[owner]
    owner, texel = owner[keep], texel[keep]
    o = np.lexsort((texel, owner))
    owner, texel = owner[o].astype(np.int64), texel[o].astype(np.int64)
    foreground = np.zeros(v * h * w, dtype=bool)
    foreground[owner] = True
    return foreground.reshape(v, h, w), texel, owner


def uv_space_noise(
    uv: np.ndarray,
    mask: np.ndarray,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator,
    noise_texture_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """UV-space initial noise for V views (module docstring): (V, C, h, w) on the generator's device.

    ``uv`` (V, H, W, 2) and ``mask`` (V, H, W) at the view (image) resolution of the ViewSet contract;
    ``latent_shape`` = (C, h, w) with H = fy h, W = fx w. Formula (Chang et al. ICLR'24, integral noise)::

        eps_v(p) = sum_{t in T_v(p)} Z(t) / sqrt(|T_v(p)|),   Z ~ N(0, I) on the noise texels,

    T_v(p) disjoint within a view: every latent pixel is exactly N(0, 1) and independent of the other pixels of
    its view; pixels of different views correlate by |T cap T'| / sqrt(|T| |T'|). Background pixels (and
    foreground pixels with no texel) are iid. Draw order: ``randn(V, C, h, w)`` (background), then ``randn(C, U)``
    (the U owned texels, by increasing id).
    """
    c, h, w = (int(x) for x in latent_shape)
    uv, mask = _check(uv, mask)
    v = mask.shape[0]
    foreground, texel, owner = uv_noise_texels(uv, mask, (h, w), noise_texture_size)

    device = generator.device
    background = torch.randn((v, c, h, w), generator=generator, device=device, dtype=torch.float32)
    used, slot = np.unique(texel, return_inverse=True)
    z = torch.randn((c, used.size), generator=generator, device=device, dtype=torch.float32)

    n = v * h * w
    owner_t = torch.from_numpy(owner).to(device)
    sums = torch.zeros(c, n, device=device, dtype=torch.float32)
    sums.index_add_(1, owner_t, z[:, torch.from_numpy(slot.reshape(-1)).to(device)])
    count = torch.bincount(owner_t, minlength=n).to(torch.float32)
    eps = sums / count.clamp_min(1.0).sqrt()
    fg = torch.from_numpy(foreground.reshape(-1)).to(device)
    out = background.permute(1, 0, 2, 3).reshape(c, n).clone()
    out[:, fg] = eps[:, fg]
    return out.reshape(c, v, h, w).permute(1, 0, 2, 3).contiguous().to(dtype)
