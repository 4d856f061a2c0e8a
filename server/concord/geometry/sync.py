"""UV-space synchronisation of the views' latents at every diffusion step (torch).

What it is for
--------------
MATH.md section 2 (MultiDiffusion, Bar-Tal et al. ICML'23, the closed-form step of its fusion objective;
SyncMVD, Liu et al. 2023): at step t every view v predicts a clean latent x0_v. Average the predictions that
land on the same spot of the surface and give every view the average back::

    T(u) = sum_v sum_{p: u_v(p) = u} w_v(p) x0_v(p)  /  sum_v sum_{p: u_v(p) = u} w_v(p)
    w_v(p) = visible_v(p) * cos(theta_v(p)) ** g                                 (g = ``cos_power``)
    x0_v(p) <- T(u_v(p))          for every visible foreground latent pixel; background pixels unchanged

This is MultiDiffusion's least-squares step (the minimiser of sum_v sum_p w_v(p) |T(u_v(p)) - x0_v(p)|^2). The
sampler then takes its scheduler step from the synced x0 (DDIM: x_{t-1} = sqrt(abar_{t-1}) x0 +
sqrt(1 - abar_{t-1}) eps_dir).

:class:`LatentSync` is built ONCE per job from the ViewSet: the latent-pixel -> texel index (the
:class:`concord.geometry.bake.TexelIndex` of a latent-resolution ViewSet, ported to torch tensors on the
device, texels renumbered compactly and pixels sorted by texel) does not change across steps; each
:meth:`LatentSync.sync` is then one gather, one ``index_add_`` and one scatter.

Latent-resolution maps (:func:`downsample_viewset`)
---------------------------------------------------
One latent pixel covers an f x f block of image pixels (f = H / h: 8 for Stable Diffusion's VAE).

* mask: a strict majority of the block's image pixels are foreground (the same rule as
  ``concord.noise.uv_noise``, so UV noise and sync agree on which latent pixels are foreground);
* representative pixel: the foreground image pixel of the block nearest the block's centre; depth and normal
  are its values (the normal stays a real unit surface normal, the depth a real surface depth);
* UV: the mean UV of the block's foreground pixels when they agree -- the block's UV spread (max - min of u
  and of v over its foreground pixels) is at most 3x the median spread over all foreground blocks -- and
  otherwise (a footprint that straddles a UV seam, where UVs jump between islands, or a depth edge where two
  surface parts meet) the representative pixel's own UV. A seam is thus never averaged into a UV that lies
  between islands, in neither island;
* intrinsics: ``K' = diag(1/f_x, 1/f_y, 1) K`` (pixel (0,0) spans [0,1) at both resolutions, so latent pixel
  centre (c + 0.5) maps to the block's centre f (c + 0.5)); world_to_camera unchanged.

Weights are :func:`concord.geometry.bake.pixel_weights` of that ViewSet with ``edge_falloff_px=0`` (exactly
MATH.md's visible * cos^g; the small floor ``max(cos, 1e-3)`` keeps grazing pixels synced).

Splat: ``"nearest"`` (default): every latent pixel belongs to exactly one texel, so :meth:`sync` is a
projection (idempotent) and leaves zero disagreement between views on shared texels. ``"bilinear"`` splats
to the four nearest texel centres and samples back bilinearly (``gather(scatter_mean(x))`` of bake.py):
smoother, but not idempotent.

Texture size: ``texture_size=None`` -> :func:`footprint_texture_size` (a texel about one latent footprint).

Layer note: this is the one module of ``concord.geometry`` that imports torch (the brief puts the torch port of
the index here); ``concord.geometry`` itself never imports it, so the rest of the package stays torch-free.
What it must never do: import bpy, touch the network or the file system, or rebuild the index per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bake import TexelIndex, build_texel_index, pixel_weights
from .viewset import ViewSet

__all__ = [
    "LatentSync",
    "downsample_viewset",
    "footprint_texture_size",
    "latent_blocks",
    "latent_foreground",
    "token_grid",
    "pixel_surface_points",
    "token_surface_points",
    "SEAM_UV_JUMP",
    "MIN_TEXTURE_SIZE",
    "MAX_TEXTURE_SIZE",
]

#: A UV step between neighbouring latent pixels larger than this (in u or v) is a seam or a depth edge.
SEAM_UV_JUMP = 0.25
MIN_TEXTURE_SIZE = 4
MAX_TEXTURE_SIZE = 4096
#: A block's UVs are averaged when their spread is at most this many times the median block spread.
_AGREE_FACTOR = 3.0


def footprint_texture_size(uv: np.ndarray, mask: np.ndarray) -> int:
    """Texture size S whose texel is about one latent pixel's footprint on the surface.

    ``uv`` (V, h, w, 2): one UV per latent pixel (NaN allowed = unknown); ``mask`` (V, h, w) foreground.
    L = median over foreground latent pixels (whose right and lower neighbours are foreground too) of
    ``sqrt(|det [du_x, du_y]|)`` -- the square root of the UV area of the parallelogram spanned by the UV steps
    to the right and lower neighbour, i.e. the footprint's side in UV units; steps with |du| > SEAM_UV_JUMP (a
    seam or a depth edge) are left out. S = round(1 / L) clipped to [MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE].
    With no usable pair (tiny masks), S = max(h, w).
    """
    uv = np.asarray(uv, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    base = uv[:, :-1, :-1]
    dx = uv[:, :-1, 1:] - base
    dy = uv[:, 1:, :-1] - base
    ok = mask[:, :-1, :-1] & mask[:, :-1, 1:] & mask[:, 1:, :-1]
    ok &= np.isfinite(dx).all(-1) & np.isfinite(dy).all(-1)
    with np.errstate(invalid="ignore"):
        ok &= (np.abs(dx).max(-1) <= SEAM_UV_JUMP) & (np.abs(dy).max(-1) <= SEAM_UV_JUMP)
    area = np.abs(dx[..., 0] * dy[..., 1] - dx[..., 1] * dy[..., 0])[ok]
    area = area[area > 0]
    if area.size == 0:
        return int(np.clip(max(mask.shape[1], mask.shape[2]), MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE))
    side = float(np.median(np.sqrt(area)))
    return int(np.clip(round(1.0 / side), MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE))


def _block_factors(image_hw: tuple[int, int], latent_hw: tuple[int, int]) -> tuple[int, int]:
    hh, ww = int(image_hw[0]), int(image_hw[1])
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h < 1 or w < 1 or hh % h or ww % w:
        raise ValueError(
            f"views of {hh}x{ww} are not whole multiples of latents of {h}x{w} "
            "(each latent pixel must cover an f x f block of image pixels; pass a latent size that divides the view)"
        )
    return hh // h, ww // w


def latent_blocks(a: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """(V, H, W, ...) -> (V, h, w, fy * fx, ...): the image pixels under each latent pixel (row-major in the
    block). One latent pixel covers an fy x fx block, fy = H / h, fx = W / w (ValueError if they do not divide)."""
    a = np.asarray(a)
    v, hh, ww = a.shape[:3]
    fy, fx = _block_factors((hh, ww), latent_hw)
    h, w = hh // fy, ww // fx
    rest = a.shape[3:]
    b = a.reshape(v, h, fy, w, fx, *rest)
    return np.moveaxis(b, 2, 3).reshape(v, h, w, fy * fx, *rest)


def latent_foreground(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """Foreground latent pixels (V, h, w): a strict majority of the block's image pixels are foreground. The one
    rule shared by :func:`downsample_viewset` (LatentSync) and ``concord.noise.uv_noise``."""
    mblk = latent_blocks(np.asarray(mask, dtype=bool), latent_hw)
    return mblk.sum(axis=-1) * 2 > mblk.shape[-1]


def downsample_viewset(viewset: ViewSet, latent_hw: tuple[int, int]) -> ViewSet:
    """The ViewSet at latent resolution (h, w): see the module docstring for each field's rule."""
    mask = np.asarray(viewset.mask, dtype=bool)
    v, hh, ww = mask.shape
    fy, fx = _block_factors((hh, ww), latent_hw)
    h, w = hh // fy, ww // fx

    def blocks(a: np.ndarray) -> np.ndarray:  # (V, H, W, ...) -> (V, h, w, f2, ...)
        return latent_blocks(a, (h, w))

    mblk = blocks(mask)
    fg = latent_foreground(mask, (h, w))
    rep = _representative_slot(mask, (h, w))  # (V, h, w) slot index

    def pick(a: np.ndarray) -> np.ndarray:
        b = blocks(a)
        idx = rep.reshape(v, h, w, 1, *([1] * (b.ndim - 4)))
        return np.take_along_axis(b, idx, axis=3)[:, :, :, 0]

    depth = np.where(fg, pick(np.asarray(viewset.depth, np.float32)), 0.0).astype(np.float32)
    normal = np.where(fg[..., None], pick(np.asarray(viewset.normal, np.float32)), 0.0).astype(np.float32)

    uvb = blocks(np.asarray(viewset.uv, np.float64))  # (V, h, w, f2, 2)
    m = mblk[..., None]
    lo = np.where(m, uvb, np.inf).min(axis=3)
    hi = np.where(m, uvb, -np.inf).max(axis=3)
    with np.errstate(invalid="ignore"):
        spread = np.where(fg, (hi - lo).max(axis=-1), np.nan)
    rep_uv = pick(np.asarray(viewset.uv, np.float64))
    mean_uv = np.where(m, uvb, 0.0).sum(axis=3) / np.maximum(mblk.sum(axis=-1), 1)[..., None]
    if fg.any():
        med = float(np.nanmedian(spread))
        agree = fg & (spread <= _AGREE_FACTOR * med + 1e-12)
    else:
        agree = fg
    uv = np.where(agree[..., None], mean_uv, rep_uv)
    uv = np.where(fg[..., None], uv, 0.0).astype(np.float32)

    scale = np.diag([1.0 / fx, 1.0 / fy, 1.0])
    K = (scale @ np.asarray(viewset.intrinsics, np.float64)).astype(np.float32)
    return ViewSet(
        depth=depth,
        mask=fg,
        uv=uv,
        normal=normal,
        intrinsics=K,
        world_to_camera=np.asarray(viewset.world_to_camera, np.float32).copy(),
    )


def token_grid(
    points: np.ndarray, mask: np.ndarray, token_hw: tuple[int, int], block: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel surface points (V, H, W, 3) and foreground (V, H, W) -> the points of a coarser (th, tw) token grid:
    a token is foreground by the strict-majority rule of :func:`latent_foreground`, and shows the point of its
    representative pixel (the foreground pixel nearest the block centre, as in :func:`downsample_viewset`), so a
    token at a depth edge takes one real surface point, never an average of two surfaces. Background: 0.

    ``block`` (by, bx): the pixels a token covers, for grids that do not divide the image (a UNet level after an
    odd side rounded up, ``concord.attention.extended.attention_levels``): the image is padded with background to
    (th by, tw bx) first, so the last row or column of tokens covers the image's remainder. None: H / th."""
    mask = np.asarray(mask, dtype=bool)
    points = np.asarray(points, np.float32)
    if block is not None:
        th, tw = int(token_hw[0]), int(token_hw[1])
        ph, pw = th * int(block[0]), tw * int(block[1])
        v, hh, ww = mask.shape
        if not (hh <= ph < hh + block[0] and ww <= pw < ww + block[1]):
            raise ValueError(f"a {th}x{tw} grid of {block[0]}x{block[1]} blocks does not cover {hh}x{ww} views")
        mask = np.pad(mask, ((0, 0), (0, ph - hh), (0, pw - ww)))
        points = np.pad(points, ((0, 0), (0, ph - hh), (0, pw - ww), (0, 0)))
    fg = latent_foreground(mask, token_hw)
    rep = _representative_slot(mask, token_hw)
    b = latent_blocks(points, token_hw)  # (V, th, tw, f2, 3)
    picked = np.take_along_axis(b, rep[..., None, None], axis=3)[:, :, :, 0]
    return np.where(fg[..., None], picked, 0.0).astype(np.float32), fg


def pixel_surface_points(viewset: ViewSet) -> tuple[np.ndarray, np.ndarray]:
    """The world point every pixel of every view shows, by the ViewSet contract's
    ``X = C + z R^T K^-1 (c + 0.5, r + 0.5, 1)``, and where it shows the object. Returns (points (V, H, W, 3)
    float32, foreground (V, H, W) bool): what :func:`token_grid` coarsens to each attention level."""
    from .render import pixel_rays

    v, hh, ww = viewset.depth.shape
    pts = np.zeros((v, hh, ww, 3), np.float32)
    for k in range(v):
        origin, dirs = pixel_rays(viewset.intrinsics[k], viewset.world_to_camera[k], ww, hh)
        pts[k] = (origin[None, :] + viewset.depth[k].reshape(-1, 1).astype(np.float64) * dirs).reshape(hh, ww, 3)
    return pts, np.asarray(viewset.mask, bool) & (viewset.depth > 0)


def token_surface_points(
    viewset: ViewSet, token_hw: tuple[int, int], block: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The world point each token of a (th, tw) grid over the views shows (:func:`token_grid` of
    :func:`pixel_surface_points`): what correspondence-weighted shared attention
    (``concord.attention.extended.CorrespondenceBias``) uses to find the tokens of two views that see the same
    spot. ``block``: as in :func:`token_grid`. Several levels of one ViewSet: compute the pixel points once and
    call :func:`token_grid` per level. Returns (points (V, th, tw, 3) float32, foreground (V, th, tw) bool)."""
    return token_grid(*pixel_surface_points(viewset), token_hw, block)


def _representative_slot(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """(V, h, w): the slot (row-major in the block) of each block's foreground pixel nearest the block centre (ties:
    row-major order; a block with no foreground pixel: the centre-most slot)."""
    mblk = latent_blocks(np.asarray(mask, dtype=bool), latent_hw)
    fy, fx = _block_factors(mask.shape[1:3], latent_hw)
    oy, ox = np.meshgrid(np.arange(fy) + 0.5 - fy / 2.0, np.arange(fx) + 0.5 - fx / 2.0, indexing="ij")
    order = np.argsort((oy**2 + ox**2).ravel(), kind="stable")
    return order[np.argmax(mblk[..., order], axis=-1)]


@dataclass(eq=False)
class LatentSync:
    """Precomputed UV sync of V views' latents (V, C, h, w) through an S x S texel grid (module docstring).

    Build with :meth:`from_viewset` (or :meth:`from_index`), once per job; call :meth:`sync` every step.
    Tensors live on ``device``; values are accumulated in float32 whatever the latents' dtype.
    """

    index: TexelIndex  # the numpy index (latent resolution) this was built from
    latent_viewset: ViewSet | None
    texture_size: int
    num_views: int
    latent_hw: tuple[int, int]
    device: torch.device
    dtype: torch.dtype
    # torch ports, P entries sorted by texel (k = 1 nearest, 4 bilinear):
    pixel: torch.Tensor  # (P,) long: flat index into (V*h*w)
    slot: torch.Tensor  # (P, k) long: compact texel id in 0..U-1
    weight: torch.Tensor  # (P, k) float32: w_v(p) * b (splat weight)
    bilinear: torch.Tensor  # (P, k) float32: sampling weight b
    inv_weight_sum: torch.Tensor  # (U,) float32: 1 / sum of weights landing on the texel
    texels: torch.Tensor  # (U,) long: texel id (row * S + col) of each compact slot
    view_of_pixel: torch.Tensor  # (P,) long

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_viewset(
        cls,
        viewset: ViewSet,
        latent_hw: tuple[int, int],
        texture_size: int | None = None,
        cos_power: float = 4.0,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        *,
        splat: str = "nearest",
    ) -> "LatentSync":
        """Downsample the ViewSet's maps to ``latent_hw`` (:func:`downsample_viewset`), weight them
        (visible * cos^g) and index them into an S x S grid (S = ``texture_size`` or
        :func:`footprint_texture_size`)."""
        lvs = downsample_viewset(viewset, latent_hw)
        if texture_size is None:
            texture_size = footprint_texture_size(lvs.uv, lvs.mask)
        weights = pixel_weights(lvs, cos_power=cos_power, edge_falloff_px=0.0)
        index = build_texel_index(lvs, int(texture_size), weights=weights, splat=splat)  # type: ignore[arg-type]
        return cls.from_index(index, latent_viewset=lvs, device=device, dtype=dtype)

    @classmethod
    def from_index(
        cls, index: TexelIndex, latent_viewset: ViewSet | None = None, device="cpu", dtype=torch.float32
    ) -> "LatentSync":
        """Port a latent-resolution :class:`TexelIndex` to torch (renumber texels, sort by texel)."""
        device = torch.device(device)
        k = index.texel.shape[1]
        texel = index.texel.astype(np.int64)
        used, slot = np.unique(texel.ravel(), return_inverse=True)
        slot = slot.reshape(-1, k)
        order = np.argsort(slot[:, 0], kind="stable")  # sorted by (first) texel: sequential scatter writes
        bil = index.bilinear[order].astype(np.float32)
        wgt = (index.pixel_weight[order, None] * bil).astype(np.float32)
        wsum = np.zeros(used.size, np.float64)
        np.add.at(wsum, slot[order].ravel(), wgt.ravel())
        inv = np.zeros_like(wsum)
        np.divide(1.0, wsum, out=inv, where=wsum > 0)
        v, h, w = index.image_shape
        pixel = index.pixel[order].astype(np.int64)

        def t(a, dt):
            return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dt)

        return cls(
            index=index,
            latent_viewset=latent_viewset,
            texture_size=index.texture_size,
            num_views=v,
            latent_hw=(h, w),
            device=device,
            dtype=dtype,
            pixel=t(pixel, torch.long),
            slot=t(slot[order], torch.long),
            weight=t(wgt, torch.float32),
            bilinear=t(bil, torch.float32),
            inv_weight_sum=t(inv, torch.float32),
            texels=t(used, torch.long),
            view_of_pixel=t(pixel // (h * w), torch.long),
        )

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def num_pixels(self) -> int:
        """P: foreground latent pixels that take part (over all views)."""
        return int(self.pixel.shape[0])

    @property
    def num_texels(self) -> int:
        """U: texels that at least one latent pixel lands on."""
        return int(self.texels.shape[0])

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """(V, C, h, w) -> (V*h*w, C) float32 (a copy, channels last)."""
        v, h, w = self.num_views, *self.latent_hw
        if x.ndim != 4 or x.shape[0] != v or tuple(x.shape[2:]) != (h, w):
            raise ValueError(f"latents must be ({v}, C, {h}, {w}), got {tuple(x.shape)}")
        return x.permute(0, 2, 3, 1).reshape(v * h * w, x.shape[1]).to(torch.float32)

    def _splat(self, vals: torch.Tensor) -> torch.Tensor:
        """(P, C) pixel values -> (U, C) weighted mean per texel: T(u) = sum w b x / sum w b."""
        c = vals.shape[1]
        k = self.slot.shape[1]
        tex = torch.zeros(self.num_texels, c, device=vals.device, dtype=torch.float32)
        if k == 1:
            tex.index_add_(0, self.slot[:, 0], vals * self.weight)
        else:
            tex.index_add_(0, self.slot.reshape(-1), (vals[:, None, :] * self.weight[..., None]).reshape(-1, c))
        return tex * self.inv_weight_sum[:, None]

    def _sample(self, tex: torch.Tensor) -> torch.Tensor:
        """(U, C) texels -> (P, C) values at the pixels' UVs (nearest, or bilinear with the splat's weights)."""
        if self.slot.shape[1] == 1:
            return tex[self.slot[:, 0]]
        return (tex[self.slot] * self.bilinear[..., None]).sum(dim=1)

    # ------------------------------------------------------------------------------------------ the step
    def sync(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (V, C, h, w) -> synced copy: every indexed foreground latent pixel takes T(u_v(p)) (module
        docstring); other pixels are returned unchanged. Same dtype and device as ``x0``."""
        flat = self._flat(x0)
        if flat.untyped_storage().data_ptr() == x0.untyped_storage().data_ptr():
            flat = flat.clone()  # a channels-last float32 x0 gives a view: never write into the caller's tensor
        out = flat.index_copy_(0, self.pixel, self._sample(self._splat(flat[self.pixel])))
        v, h, w = self.num_views, *self.latent_hw
        return out.reshape(v, h, w, -1).permute(0, 3, 1, 2).to(x0.dtype).contiguous()

    __call__ = sync

    def texture(self, x0: torch.Tensor) -> torch.Tensor:
        """The averaged texture T, (C, S, S) float32 (row 0 = top, bake.py's layout); 0 on texels no latent
        pixel reaches."""
        flat = self._flat(x0)
        tex = self._splat(flat[self.pixel])
        s = self.texture_size
        full = torch.zeros(s * s, tex.shape[1], device=tex.device, dtype=torch.float32)
        full[self.texels] = tex
        return full.T.reshape(-1, s, s)

    def disagreement(self, x: torch.Tensor) -> float:
        """Mean |T_a(u) - T_b(u)| over view pairs (a, b) and texels u both views reach, and channels, where
        T_a is view a's own weighted mean on the texel (MATH.md section 6's cross-view disagreement, at latent
        level). NaN when no texel is reached by two views."""
        flat = self._flat(x)
        vals = flat[self.pixel]
        c, u, v = vals.shape[1], self.num_texels, self.num_views
        k = self.slot.shape[1]
        key = (self.view_of_pixel[:, None] * u + self.slot).reshape(-1)  # (view, texel) pairs
        wts = self.weight.reshape(-1)
        sums = torch.zeros(v * u, c, device=vals.device, dtype=torch.float32)
        sums.index_add_(0, key, (vals[:, None, :] * self.weight[..., None]).reshape(-1, c) if k > 1
                        else vals * self.weight)
        wsum = torch.zeros(v * u, device=vals.device, dtype=torch.float32).index_add_(0, key, wts)
        seen = (wsum > 0).reshape(v, u)
        per_view = (sums / wsum.clamp_min(1e-30)[:, None]).reshape(v, u, c)
        total = torch.zeros((), dtype=torch.float64, device=vals.device)
        count = 0
        for a in range(v):
            for b in range(a + 1, v):
                both = seen[a] & seen[b]
                n = int(both.sum())
                if n:
                    total += (per_view[a, both] - per_view[b, both]).abs().sum(dtype=torch.float64)
                    count += n * c
        return float(total / count) if count else float("nan")

    def coverage(self) -> torch.Tensor:
        """bool (S, S): texels some foreground latent pixel lands on (with positive weight)."""
        s = self.texture_size
        cov = torch.zeros(s * s, dtype=torch.bool, device=self.device)
        cov[self.texels[self.inv_weight_sum > 0]] = True
        return cov.reshape(s, s)
