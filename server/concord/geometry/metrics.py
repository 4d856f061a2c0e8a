"""Measures of a texture and of multi-view consistency that Concord reports and its tests bound (MATH.md 6).

- :func:`coverage_fraction` -- share of texels seen by at least one view (of the whole texture, or of the
  texels the mesh's UV islands occupy, :func:`uv_island_mask`).
- :func:`cross_view_disagreement` -- bake each view alone into UV; over texels seen by 2+ views, the mean
  absolute difference between views (sRGB, 0..1). Exactly::

      D = 1/|T2| * sum_{t in T2}  1/|P_t| * sum_{(i,j) in P_t}  1/C * sum_c |T_i(t)_c - T_j(t)_c|

  T_i is view i baked alone (same weights and splat as the full bake, :func:`concord.geometry.bake.accumulate`),
  P_t the unordered pairs i < j of views that both see texel t (view i sees t when its own splat gives t a
  positive weight), T2 the texels with |P_t| >= 1. Every texel
  counts once however many views see it. Also returned: the (V, V) matrix of the same mean per pair of views
  over the texels the pair shares. Lower is more consistent; views that agree up to resampling give ~0.
- :func:`psnr` / texture PSNR on covered texels: ``10 log10(1 / MSE)`` over the masked texels and channels,
  sRGB 0..1 (the texture round trip of MATH.md 6 isolates geometry and baking from the model).

What it must never do: import bpy or torch; change the arrays it measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from concord.geometry.bake import TexelIndex, accumulate, build_texel_index, images_to_float

__all__ = [
    "Disagreement",
    "coverage_fraction",
    "cross_view_disagreement",
    "per_view_textures",
    "psnr",
    "uv_island_mask",
]


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, *, peak: float = 1.0) -> float:
    """PSNR in dB of ``a`` against ``b`` ((S,S,C) or any matching shape) over ``mask`` (S,S) texels.

    ``inf`` when they are equal on the mask; ``nan`` when the mask is empty.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    diff = (a - b) ** 2
    if mask is not None:
        diff = diff[np.asarray(mask, dtype=bool)]
    if diff.size == 0:
        return float("nan")
    mse = float(diff.mean())
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak * peak / mse))


def coverage_fraction(coverage: np.ndarray, islands: np.ndarray | None = None) -> float:
    """Share of texels covered: of all texels, or of the UV-island texels when ``islands`` is given."""
    coverage = np.asarray(coverage, dtype=bool)
    if islands is None:
        return float(coverage.mean())
    islands = np.asarray(islands, dtype=bool)
    n = int(islands.sum())
    return float((coverage & islands).sum() / n) if n else 0.0


def uv_island_mask(uv: np.ndarray, faces: np.ndarray, texture_size: int) -> np.ndarray:
    """bool (S,S): texels whose centre lies in some UV triangle (Blender UVs, wrapped modulo 1, row 0 = top).

    ``uv`` (N, 2) per vertex, ``faces`` (F, 3) vertex indices. Rasterised with PIL's polygon fill; a triangle
    that crosses the unit square's edge is drawn at each of its wrapped positions.
    """
    from PIL import Image, ImageDraw

    s = int(texture_size)
    tri = np.asarray(uv, dtype=np.float64)[np.asarray(faces)]  # (F, 3, 2)
    tri = tri - np.floor(tri.min(axis=1, keepdims=True))  # lowest corner in [0, 1)
    # Pixel coordinates with PIL's convention (pixel (0,0) covers [0,1)^2): x = u S, y = (1 - v) S.
    px = np.empty_like(tri)
    px[..., 0] = tri[..., 0] * s
    px[..., 1] = (1.0 - tri[..., 1]) * s
    img = Image.new("1", (s, s), 0)
    draw = ImageDraw.Draw(img)
    spill_u = tri[..., 0].max(axis=1) > 1.0
    spill_v = tri[..., 1].max(axis=1) > 1.0
    for f in range(px.shape[0]):
        shifts = [(0.0, 0.0)]
        if spill_u[f]:
            shifts.append((-s, 0.0))
        if spill_v[f]:
            shifts.append((0.0, s))  # v - 1 moves down the texture: +S rows
        if spill_u[f] and spill_v[f]:
            shifts.append((-s, s))
        for dx, dy in shifts:
            # PIL fills pixels whose centre is inside; coordinates are pixel corners, so subtract 0.5.
            draw.polygon([(x + dx - 0.5, y + dy - 0.5) for x, y in px[f]], fill=1)
    return np.asarray(img, dtype=bool)


def per_view_textures(
    index: TexelIndex, images: np.ndarray, min_views: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each view baked alone, on the texels seen by at least ``min_views`` views.

    ``images`` (V,H,W,3|4) uint8 or float sRGB. Returns (texels (M,) flat indices, values float32 (V, M, C), seen bool (V, M)).
    """
    imgs = images_to_float(images)
    v = index.n_views
    s2 = index.texture_size**2
    seen_count = np.zeros(s2, dtype=np.int32)
    sums, weights = [], []
    for i in range(v):
        sm, w = accumulate(index, imgs, view=i)
        sums.append(sm)
        weights.append(w)
        seen_count += w > 0
    texels = np.flatnonzero(seen_count >= min_views)
    values = np.empty((v, texels.size, sums[0].shape[1]), dtype=np.float32)
    seen = np.empty((v, texels.size), dtype=bool)
    for i in range(v):
        w = weights[i][texels]
        seen[i] = w > 0
        values[i] = sums[i][texels] / np.where(w > 0, w, 1.0)[:, None]
    return texels, values, seen


@dataclass
class Disagreement:
    """``mean``: D of the module docstring; ``pairwise`` (V,V) mean per pair (nan where a pair shares no
    texel); ``pair_texels`` (V,V) texel counts per pair; ``texels``: |T2|."""

    mean: float
    pairwise: np.ndarray
    pair_texels: np.ndarray
    texels: int

    def as_dict(self) -> dict:
        return {
            "mean_abs_difference": None if np.isnan(self.mean) else self.mean,
            "texels_seen_by_2plus_views": self.texels,
            "pairwise": [[None if np.isnan(x) else float(x) for x in row] for row in self.pairwise],
        }


def cross_view_disagreement(
    views,
    images: np.ndarray | None = None,
    texture_size: int | None = None,
    **index_kwargs,
) -> Disagreement:
    """Cross-view disagreement of images seen through a ViewSet (or a prebuilt :class:`TexelIndex`).

    ``views``: a TexelIndex, or a ViewSet (then ``texture_size`` is needed and ``index_kwargs`` go to
    :func:`build_texel_index`). ``images`` (V,H,W,3) uint8 or float sRGB; default ``views.image``.
    """
    if isinstance(views, TexelIndex):
        index = views
    else:
        if texture_size is None:
            raise ValueError("texture_size is needed to build the index from a ViewSet")
        index = build_texel_index(views, texture_size, **index_kwargs)
        if images is None:
            images = views.image
    if images is None:
        raise ValueError("no images given")
    texels, values, seen = per_view_textures(index, images_to_float(images))
    v = index.n_views
    pairwise = np.full((v, v), np.nan)
    pair_texels = np.zeros((v, v), dtype=np.int64)
    per_texel_sum = np.zeros(texels.size, dtype=np.float64)
    per_texel_pairs = np.zeros(texels.size, dtype=np.int64)
    for i in range(v):
        for j in range(i + 1, v):
            both = seen[i] & seen[j]
            n = int(both.sum())
            pair_texels[i, j] = pair_texels[j, i] = n
            if n == 0:
                continue
            d = np.abs(values[i, both] - values[j, both]).mean(axis=1)
            pairwise[i, j] = pairwise[j, i] = float(d.mean())
            per_texel_sum[both] += d
            per_texel_pairs[both] += 1
    ok = per_texel_pairs > 0
    mean = float((per_texel_sum[ok] / per_texel_pairs[ok]).mean()) if ok.any() else float("nan")
    return Disagreement(mean=mean, pairwise=pairwise, pair_texels=pair_texels, texels=int(ok.sum()))
