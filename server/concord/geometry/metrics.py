"""Measures of a texture and of multi-view consistency that Concord reports and its tests bound (MATH.md 6).

- :func:`surface_coverage` -- **coverage**: the share of UV-island texels whose surface point at least one view
  sees (what the cameras saw, independent of how densely their pixels sample the texture). Exactly::

      coverage = |{t in I : exists v with visible_v(X(t))}| / |I|

  I is the set of island texels: texels whose centre lies inside some UV triangle (:func:`uv_texels`, the
  centre-sampling rule of rasterisers); X(t) is the surface point of that centre, the barycentric combination
  of the triangle's corner positions with the centre's barycentric weights in UV. A texel that several
  triangles share (overlapping or mirrored UVs) is seen when any of its surface points is. visible_v(X)
  tests X against what view v shows at the 4 pixel centres around X's projection (the shadow-map idea of
  Williams, "Casting curved shadows on curved surfaces", SIGGRAPH'78, with the surface's plane instead of a
  depth bias): with n the triangle's unit normal turned towards the camera, visible_v(X) holds when one of
  those pixels p is foreground, shows the world point P_p (from its depth) with normal n_p, and

      n . n_p >= c_min                       (``min_cos``, default 0.5: the pixel shows a surface turned like X's)
      |n . (P_p - X)| <= tau d_p             (``depth_tolerance`` tau, default 0.01; d_p the pixel's depth)

  i.e. the pixel sees X's own plane within 1 % of the viewing distance, at most one pixel from X. Exact for
  planar surfaces at any viewing angle (a grazing face sampled by a single row of pixels included); tau
  absorbs curvature and float error. A point behind the surface the view shows (occluded; a face hidden from
  every camera) fails it; the normal condition also rejects what a depth comparison alone cannot: a hidden
  face meeting the visible one at an edge (the bottom of a box next to its visible side, within tau of it
  near the edge; measured on the barrel: a thin ring under the rim, 0.861 without the condition vs 0.830).
  A surface turned within ~6 degrees of edge-on to a view (|cos| < ``min_view_cos``, 0.1) is not seen by it
  (the bake weighs such pixels by cos^4 < 1e-4: a recessed lid glimpsed at 1 degree is not "seen").
  Where no view pixel landed on a texel inside a seen region the texel still counts (the bake fills it from
  its neighbours): the figure depends on what the cameras saw, not on how densely their pixels sample the
  texture (measured on the barrel and the Fox, six views: within 0.005 from 256^2 to 2048^2 textures, within
  0.005 from 128 to 512 px views; texture_fill_fraction falls from 0.51 to 0.04 on the barrel meanwhile).
- :func:`coverage_fraction` -- share of texels in a mask (of the whole texture, or of the UV islands): the
  bake's splat mask over the whole texture is ``texture_fill_fraction`` in metrics.json (how much of the
  image view pixels were baked into; depends on sampling density and on the empty space between islands).
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

import time
from dataclasses import dataclass

import numpy as np

from concord.geometry.bake import TexelIndex, accumulate, build_texel_index, images_to_float

__all__ = [
    "DEFAULT_DEPTH_TOLERANCE",
    "DEFAULT_MIN_COS",
    "DEFAULT_MIN_VIEW_COS",
    "Disagreement",
    "SurfaceCoverage",
    "UVTexels",
    "coverage_fraction",
    "coverage_image",
    "coverage_metrics",
    "cross_view_disagreement",
    "per_view_textures",
    "psnr",
    "surface_arrays",
    "surface_coverage",
    "uv_island_mask",
    "uv_texels",
    "visible_in_view",
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


DEFAULT_DEPTH_TOLERANCE = 0.01  # tau: relative depth slack of the visibility test (module docstring)
MAX_MEASURE_SIZE = 1024  # larger textures: coverage measured on a 1024^2 grid (surface_coverage)
DEFAULT_MIN_COS = 0.5  # c_min: a pixel shows the point's surface only if their normals are within 60 degrees
DEFAULT_MIN_VIEW_COS = 0.1  # c_view: a surface seen within ~6 degrees of edge-on is not seen (cos^4 < 1e-4)
ISLAND_UNSEEN_GREY = 96  # coverage image: island texels no view saw (seen = 255, outside the islands = 0)
_MAX_CANDIDATES = 1 << 21  # texel candidates tested per rasterisation chunk (bounds memory at any size)


@dataclass
class UVTexels:
    """One chunk of (texel, UV triangle) pairs: texel centres inside a triangle.

    ``texel`` int64 (n,) flat ``row * S + col`` (row 0 = top); ``face`` int64 (n,) the triangle's index;
    ``bary`` float64 (n, 3) the centre's barycentric weights in the triangle (corner order as given).
    A texel appears once per triangle that contains its centre.
    """

    texel: np.ndarray
    face: np.ndarray
    bary: np.ndarray

    def points(self, triangles: np.ndarray) -> np.ndarray:
        """(n, D) the texels' points on ``triangles`` (F, 3, D): positions, normals, anything per corner."""
        corners = np.asarray(triangles, dtype=np.float64)[self.face]  # (n, 3, D)
        return np.einsum("nk,nkd->nd", self.bary, corners)


def _check_triangles(a: np.ndarray, d: int, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 3 or a.shape[1:] != (3, d):
        raise ValueError(f"{name} must be (F, 3, {d}), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return a


def uv_texels(triangle_uv: np.ndarray, texture_size: int, *, max_candidates: int = _MAX_CANDIDATES):
    """Yield :class:`UVTexels` chunks: every (texel, triangle) pair whose texel centre lies in the UV triangle.

    ``triangle_uv`` (F, 3, 2) Blender UVs (v up), wrapped modulo 1 like the texture (a triangle that crosses
    the unit square's edge is tested at each wrapped position). In continuous texel coordinates
    ``x = u S - 0.5``, ``y = (1 - v) S - 0.5`` the texel centres are the integer points; a centre is inside
    when its barycentric weights are all >= -1e-7 (a centre on a shared edge belongs to both triangles, so
    adjacent triangles leave no gap). Degenerate (zero-area) triangles contain nothing.

    Why by hand: no library returns every texel's triangle and barycentric weights for a whole mesh in
    one call. PIL draws one polygon per Python call (measured 12 us a triangle, 1 s for 82k triangles) and
    also fills texels whose centre is just outside (0.382 vs 0.376 of the Fox's texture at 512^2); embree
    ray casting (render.py's library) is exact but casts 2.4 M rays/s on one core (1.8 s at 2048^2). This
    vectorised bounding-box test takes ~0.1 s at 1024^2. Chunks hold at most ``max_candidates`` tested
    centres (a triangle bigger than that is split into row bands), so memory is bounded at any size.
    """
    s = int(texture_size)
    if s < 1:
        raise ValueError(f"texture_size must be positive, got {texture_size}")
    tri = _check_triangles(triangle_uv, 2, "triangle_uv")
    if tri.shape[0] == 0:
        return
    tri = tri - np.floor(tri.min(axis=1, keepdims=True))  # lowest u and v of each triangle in [0, 1)
    # Wrapped copies: shift by (-i, -j) for i < ceil(max u), j < ceil(max v) (one copy unless it spills).
    nu = np.maximum(np.ceil(tri[..., 0].max(axis=1)), 1).astype(np.int64)
    nv = np.maximum(np.ceil(tri[..., 1].max(axis=1)), 1).astype(np.int64)
    ncopy = nu * nv
    face = np.repeat(np.arange(tri.shape[0], dtype=np.int64), ncopy)
    k = np.arange(face.size) - np.repeat(np.cumsum(ncopy) - ncopy, ncopy)
    su, sv = np.divmod(k, nv[face])
    x = (tri[face, :, 0] - su[:, None]) * s - 0.5  # (C, 3)
    y = (1.0 - (tri[face, :, 1] - sv[:, None])) * s - 0.5
    # Barycentric weights as affine functions of (X, Y): b1 = a1 (X - x0) + c1 (Y - y0), b2 likewise.
    e1x, e1y = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]
    e2x, e2y = x[:, 2] - x[:, 0], y[:, 2] - y[:, 0]
    det = e1x * e2y - e1y * e2x
    x0 = np.maximum(np.ceil(x.min(axis=1)), 0).astype(np.int64)
    x1 = np.minimum(np.floor(x.max(axis=1)), s - 1).astype(np.int64)
    y0 = np.maximum(np.ceil(y.min(axis=1)), 0).astype(np.int64)
    y1 = np.minimum(np.floor(y.max(axis=1)), s - 1).astype(np.int64)
    ok = (np.abs(det) > 1e-12) & (x1 >= x0) & (y1 >= y0)
    face, x, y, det, x0, x1, y0, y1 = (a[ok] for a in (face, x, y, det, x0, x1, y0, y1))
    e1x, e1y, e2x, e2y = (a[ok] for a in (e1x, e1y, e2x, e2y))
    if face.size == 0:
        return
    inv = 1.0 / det
    # b1 = a1 (X - x0) + c1 (Y - y0), b2 = a2 (X - x0) + c2 (Y - y0) with (x0, y0) the first corner.
    a1, c1, a2, c2 = e2y * inv, -e2x * inv, -e1y * inv, e1x * inv
    ox, oy = x[:, 0], y[:, 0]
    w = x1 - x0 + 1
    # Split boxes larger than a chunk into row bands.
    rows_per_band = np.maximum(max_candidates // w, 1)
    bands = -(-(y1 - y0 + 1) // rows_per_band)
    entry = np.repeat(np.arange(face.size), bands)
    b = np.arange(entry.size) - np.repeat(np.cumsum(bands) - bands, bands)
    band_y0 = y0[entry] + b * rows_per_band[entry]
    band_y1 = np.minimum(band_y0 + rows_per_band[entry] - 1, y1[entry])
    counts = w[entry] * (band_y1 - band_y0 + 1)
    # Group consecutive bands into chunks of about max_candidates candidates.
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, np.arange(max_candidates, int(ends[-1]) + max_candidates, max_candidates), "right")
    cuts = np.unique(np.concatenate([[0], np.minimum(cuts, entry.size)]))
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi <= lo:
            continue
        c = counts[lo:hi]
        rep = np.repeat(np.arange(hi - lo), c)
        local = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        e = entry[lo:hi][rep]  # the box of each candidate
        dy, dx = np.divmod(local, w[e])
        X = x0[e] + dx
        Y = band_y0[lo:hi][rep] + dy
        px, py = X - ox[e], Y - oy[e]
        b1 = a1[e] * px + c1[e] * py
        b2 = a2[e] * px + c2[e] * py
        b0 = 1.0 - b1 - b2
        inside = (b0 >= -1e-7) & (b1 >= -1e-7) & (b2 >= -1e-7)
        if not inside.any():
            continue
        yield UVTexels(
            texel=Y[inside] * s + X[inside],
            face=face[e[inside]],
            bary=np.stack([b0[inside], b1[inside], b2[inside]], axis=1),
        )


def uv_island_mask(uv: np.ndarray, faces: np.ndarray, texture_size: int) -> np.ndarray:
    """bool (S,S): texels whose centre lies in some UV triangle (Blender UVs, wrapped modulo 1, row 0 = top).

    ``uv`` (N, 2) per vertex, ``faces`` (F, 3) vertex indices (:func:`uv_texels`).
    """
    s = int(texture_size)
    mask = np.zeros(s * s, dtype=bool)
    for chunk in uv_texels(np.asarray(uv, dtype=np.float64)[np.asarray(faces)], s):
        mask[chunk.texel] = True
    return mask.reshape(s, s)


@dataclass
class _ViewTable:
    """One view, prepared for :func:`_visible`: ``M`` (3, 4) = K [R | t] (world -> homogeneous pixel
    position and planar depth), ``centre`` (3,) the camera centre, and ``table`` float32 (H*W + 1, 7): per
    pixel its ray's world direction with unit camera z (3; the point at planar depth d is centre + d ray),
    the normal it shows (3, turned to the camera) and its depth (1); background rows and the last row are 0."""

    M: np.ndarray
    centre: np.ndarray
    height: int
    width: int
    table: np.ndarray
    dmin: np.ndarray  # (H+1)*(W+1): min / max depth of the foreground pixels among the 4 around each point
    dmax: np.ndarray
    slope: float  # 2 tan(theta_max) / f: bound on the relative depth change of a plane over ~1.4 pixels


def _view_table(K: np.ndarray, world_to_camera: np.ndarray, depth: np.ndarray, mask: np.ndarray,
                normal: np.ndarray, min_view_cos: float = DEFAULT_MIN_VIEW_COS) -> _ViewTable:
    K = np.asarray(K, dtype=np.float64)
    T = np.asarray(world_to_camera, dtype=np.float64)
    depth = np.asarray(depth, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool) & (depth > 0)
    h, w = depth.shape
    R, t = T[:3, :3], T[:3, 3]
    # The ViewSet contract: pixel (r, c) of depth d shows X = C + d R^T K^-1 (c + 0.5, r + 0.5, 1) (K's last
    # row is (0, 0, 1), so the ray has unit camera z): per axis j, A[j, 0] (c + 0.5) + A[j, 1] (r + 0.5) + A[j, 2].
    A = (R.T @ np.linalg.inv(K)).astype(np.float32)
    cols = np.arange(w, dtype=np.float32) + 0.5
    rows = np.arange(h, dtype=np.float32) + 0.5
    table = np.zeros((h * w + 1, 7), dtype=np.float32)
    for j in range(3):
        table[:-1, j] = (np.add.outer(A[j, 1] * rows + A[j, 2], A[j, 0] * cols)).reshape(-1)
    table[:-1, 3:6] = np.asarray(normal, dtype=np.float32).reshape(-1, 3)
    table[:-1, 6] = depth.reshape(-1)
    table[:-1][~mask.reshape(-1)] = 0.0
    # Entry (r, c) of the brackets covers pixels (r-1..r, c-1..c); +inf / -inf where none is foreground.
    lo = np.pad(np.where(mask, depth, np.inf), 1, constant_values=np.inf)
    hi = np.pad(np.where(mask, depth, -np.inf), 1, constant_values=-np.inf)
    dmin = np.minimum(np.minimum(lo[:-1, :-1], lo[:-1, 1:]), np.minimum(lo[1:, :-1], lo[1:, 1:]))
    dmax = np.maximum(np.maximum(hi[:-1, :-1], hi[:-1, 1:]), np.maximum(hi[1:, :-1], hi[1:, 1:]))
    c = max(float(min_view_cos), 1e-3)
    slope = 2.0 * np.sqrt(1.0 - c * c) / c / max(min(abs(K[0, 0]), abs(K[1, 1])), 1e-9)
    return _ViewTable(M=K @ T[:3], centre=-R.T @ t, height=h, width=w, table=table,
                      dmin=dmin.reshape(-1).astype(np.float32), dmax=dmax.reshape(-1).astype(np.float32),
                      slope=float(slope))


def _visible(points: np.ndarray, point_normals: np.ndarray, view: _ViewTable, depth_tolerance: float,
             min_cos: float, min_view_cos: float) -> np.ndarray:
    """bool (n,): the visibility test of the module docstring for world ``points`` (n, 3) with unit surface
    normals ``point_normals`` (n, 3; any sign; all zero = unknown) in one prepared view."""
    h, w = view.height, view.width
    M = view.M.astype(points.dtype)
    proj = points @ M[:, :3].T + M[:, 3]
    z = proj[:, 2]
    zs = np.where(z > 1e-9, z, np.inf)  # behind the camera: lands outside below
    # Pixel-centre coordinates x = X/z - 0.5: the 4 pixels around the point are floor(x) + {0, 1}.
    x = proj[:, 0] / zs - 0.5
    y = proj[:, 1] / zs - 0.5
    ok = (z > 1e-9) & (x > -1.0) & (x < w) & (y > -1.0) & (y < h)
    # Turn each point's normal towards the camera, as the renderer turns the normals it reports.
    to_cam = view.centre.astype(points.dtype) - points
    facing = np.einsum("nc,nc->n", point_normals, to_cam)
    known = np.abs(point_normals).max(axis=1) > 0
    # A surface seen (almost) edge-on is not seen: |cos| between its normal and the direction to the camera.
    ok &= ~known | (np.abs(facing) >= min_view_cos * np.linalg.norm(to_cam, axis=1))
    # Necessary for a hit (cheap, culls most occluded points): a plane seen at most min_view_cos from edge-on
    # changes depth by at most slope * z between the point and any of the 4 pixels, so the point's depth lies
    # within the 4 pixels' depth range widened by that and by tau.
    cell = np.where(ok, (np.floor(y) + 1) * (w + 1) + np.floor(x) + 1, 0).astype(np.int64)
    margin = (depth_tolerance + view.slope) * z
    lo = view.dmin[cell] * (1 - depth_tolerance) - margin
    hi = view.dmax[cell] * (1 + depth_tolerance) + margin
    ok &= (z >= lo) & (z <= hi)
    todo = np.flatnonzero(ok)
    x, y, z, known = x[todo], y[todo], z[todo], known[todo]
    nt = np.where((facing[todo] < 0)[:, None], -point_normals[todo], point_normals[todo])
    # Pixel ray C + s ray meets the point's plane n . (Y - X) = 0 at planar depth s = n . (X - C) / n . ray.
    num = -np.abs(facing[todo])  # n . (X - C) with n turned to the camera
    c0, r0 = np.floor(x), np.floor(y)
    # The nearest of the 4 pixels first: most points are decided there, the others are tried on the rest.
    near_c = (x - c0 >= 0.5).astype(np.int64)
    near_r = (y - r0 >= 0.5).astype(np.int64)
    c0, r0 = c0.astype(np.int64), r0.astype(np.int64)
    seen = np.zeros(points.shape[0], dtype=bool)
    for flip_r, flip_c in ((0, 0), (0, 1), (1, 0), (1, 1)):
        if todo.size == 0:
            break
        r = r0 + (near_r ^ flip_r)
        c = c0 + (near_c ^ flip_c)
        inb = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        g = view.table[np.where(inb, r * w + c, h * w)]  # (n, 7): ray, normal, depth; 0 off the image
        d = g[:, 6]
        den = np.einsum("nc,nc->n", nt, g[:, 0:3])
        s_hit = num / np.where(den < 0, den, -np.inf)  # 0 where the ray does not meet the plane's front
        same_plane = (np.abs(s_hit - d) <= depth_tolerance * d) & (np.einsum("nc,nc->n", nt, g[:, 3:6]) >= min_cos)
        # Unknown normal (a triangle of zero area): the point's own depth against the pixel's.
        hit = (d > 0) & np.where(known, same_plane, np.abs(d - z) <= depth_tolerance * z)
        seen[todo[hit]] = True
        rest = ~hit
        todo, z, known, nt, num = todo[rest], z[rest], known[rest], nt[rest], num[rest]
        r0, c0, near_r, near_c = r0[rest], c0[rest], near_r[rest], near_c[rest]
    return seen


def visible_in_view(
    points: np.ndarray,
    K: np.ndarray,
    world_to_camera: np.ndarray,
    depth: np.ndarray,
    mask: np.ndarray,
    normal: np.ndarray,
    point_normals: np.ndarray,
    *,
    depth_tolerance: float = DEFAULT_DEPTH_TOLERANCE,
    min_cos: float = DEFAULT_MIN_COS,
    min_view_cos: float = DEFAULT_MIN_VIEW_COS,
) -> np.ndarray:
    """bool (n,): which world ``points`` (n, 3) with surface normals ``point_normals`` (n, 3; any sign; zero =
    unknown) one view sees (the test of the module docstring). ``K``, ``world_to_camera``, ``depth`` (H, W),
    ``mask`` (H, W) and ``normal`` (H, W, 3) of one view of a ViewSet (its contract)."""
    pts = np.asarray(points, dtype=np.float64)
    nt = np.asarray(point_normals, dtype=np.float64)
    length = np.linalg.norm(nt, axis=1, keepdims=True)
    nt = np.divide(nt, length, out=np.zeros_like(nt), where=length > 0)
    view = _view_table(K, world_to_camera, depth, mask, normal, min_view_cos)
    return _visible(pts, nt, view, depth_tolerance, min_cos, min_view_cos)


@dataclass
class SurfaceCoverage:
    """``seen`` bool (S,S): island texels some view sees; ``islands`` bool (S,S): texels inside a UV
    triangle; ``coverage`` = |seen| / |islands| (0 when there are no islands); ``island_fraction`` = the
    share of the texture the islands occupy; ``seconds``: time taken."""

    seen: np.ndarray
    islands: np.ndarray
    coverage: float
    island_fraction: float
    seconds: float = 0.0

    def image(self) -> np.ndarray:
        """uint8 (S,S): 255 seen, ``ISLAND_UNSEEN_GREY`` on an island but seen by no view, 0 off the islands."""
        out = np.where(self.islands, ISLAND_UNSEEN_GREY, 0).astype(np.uint8)
        out[self.seen] = 255
        return out


def surface_coverage(
    viewset,
    triangles: np.ndarray,
    triangle_uv: np.ndarray,
    texture_size: int,
    *,
    depth_tolerance: float = DEFAULT_DEPTH_TOLERANCE,
    min_cos: float = DEFAULT_MIN_COS,
    min_view_cos: float = DEFAULT_MIN_VIEW_COS,
    max_size: int = MAX_MEASURE_SIZE,
) -> SurfaceCoverage:
    """Coverage of the UV islands by the views (module docstring): which island texels' surface points the
    views see, tested against what each view's pixels show (depth, normal).

    ``triangles`` (F, 3, 3) corner positions in the ViewSet's world frame, ``triangle_uv`` (F, 3, 2) their
    UVs (Blender convention); ``viewset`` needs depth, mask, normal, intrinsics and world_to_camera.
    Independent of the views' resolution relative to the texture: doubling the texture size leaves it
    unchanged up to the texels along island and visibility boundaries (module docstring). Textures larger
    than ``max_size`` are measured on a ``max_size``^2 grid and the masks repeated up to the texture size:
    the cost grows with the texel count (bench/coverage.py, CPU time on 2 loaded cores, six views: 0.1-0.3 s
    at 512^2, 0.3-1.1 s at 1024^2) while the share barely moves (0.8298 at 1024^2, 0.8305 at 2048^2 on the
    barrel). Each triangle tries the views most squarely facing it first; a texel is done at its first hit.
    """
    t0 = time.perf_counter()
    tri = _check_triangles(triangles, 3, "triangles")
    tuv = _check_triangles(triangle_uv, 2, "triangle_uv")
    if tri.shape[0] != tuv.shape[0]:
        raise ValueError(f"{tri.shape[0]} triangles but {tuv.shape[0]} UV triangles")
    size = int(texture_size)
    s = min(size, int(max_size))
    depth = np.asarray(viewset.depth, dtype=np.float32)
    mask = np.asarray(viewset.mask, dtype=bool)
    Ks = np.asarray(viewset.intrinsics, dtype=np.float64)
    Ts = np.asarray(viewset.world_to_camera, dtype=np.float64)
    islands = np.zeros(s * s, dtype=bool)
    seen = np.zeros(s * s, dtype=bool)
    normal = np.asarray(viewset.normal, dtype=np.float32)
    tables = [_view_table(Ks[v], Ts[v], depth[v], mask[v], normal[v], min_view_cos) for v in range(depth.shape[0])]
    tri32 = tri.astype(np.float32)
    face_normal = np.cross(tri32[:, 1] - tri32[:, 0], tri32[:, 2] - tri32[:, 0])
    face_normal /= np.maximum(np.linalg.norm(face_normal, axis=1, keepdims=True), 1e-30)
    # Each triangle tries the views in order of how squarely they face it (its winding's front first), so
    # most texels are decided by their first view.
    to_cam = np.stack([t.centre for t in tables]).astype(np.float32)[None] - tri32.mean(axis=1)[:, None]
    facing = np.einsum("fc,fvc->fv", face_normal, to_cam) / np.maximum(np.linalg.norm(to_cam, axis=2), 1e-30)
    view_order = np.argsort(-facing, axis=1, kind="stable").astype(np.int16)  # (F, V)
    for chunk in uv_texels(tuv, s):
        islands[chunk.texel] = True
        todo = np.flatnonzero(~seen[chunk.texel])  # a texel already seen (another of its triangles) is done
        texel = chunk.texel[todo]
        bary = chunk.bary[todo].astype(np.float32)
        corners = tri32[chunk.face[todo]]  # (n, 3, 3)
        pts = bary[:, 0:1] * corners[:, 0] + bary[:, 1:2] * corners[:, 1] + bary[:, 2:3] * corners[:, 2]
        nrm = face_normal[chunk.face[todo]]
        order = view_order[chunk.face[todo]]
        for k in range(len(tables)):
            if texel.size == 0:
                break
            vis = np.zeros(texel.size, dtype=bool)
            for v, table in enumerate(tables):
                sel = np.flatnonzero(order[:, k] == v)
                if sel.size:
                    vis[sel] = _visible(pts[sel], nrm[sel], table, depth_tolerance, min_cos, min_view_cos)
            seen[texel[vis]] = True
            keep = ~vis
            texel, pts, nrm, order = texel[keep], pts[keep], nrm[keep], order[keep]
    n = int(islands.sum())
    seen, islands = seen.reshape(s, s), islands.reshape(s, s)
    if size > s:  # texel (r, c) of the texture lies in grid cell (r * s // size, c * s // size)
        cell = np.arange(size) * s // size
        seen, islands = seen[np.ix_(cell, cell)], islands[np.ix_(cell, cell)]
    return SurfaceCoverage(
        seen=seen,
        islands=islands,
        coverage=float(seen.sum() / islands.sum()) if n else 0.0,
        island_fraction=float(islands.mean()),
        seconds=time.perf_counter() - t0,
    )


def surface_arrays(mesh) -> dict[str, np.ndarray]:
    """The texture job's optional surface arrays of a :class:`concord.geometry.mesh.Mesh` (its own frame):
    ``triangles`` float32 (F, 3, 3) corner positions and ``triangle_uv`` float32 (F, 3, 2) corner UVs."""
    if mesh.uv is None:
        raise ValueError("the mesh has no UVs")
    return {
        "triangles": np.asarray(mesh.vertices, dtype=np.float32)[mesh.faces],
        "triangle_uv": np.asarray(mesh.uv, dtype=np.float32)[mesh.faces],
    }


def coverage_image(baked: np.ndarray, surface: SurfaceCoverage | None) -> np.ndarray:
    """coverage.png's pixels, uint8 (S,S): :meth:`SurfaceCoverage.image` (255 seen, grey on an island that no
    view saw, 0 off the islands); without the mesh's triangles, 255 where view pixels were baked (``baked``)."""
    if surface is not None:
        return surface.image()
    return np.asarray(baked, dtype=bool).astype(np.uint8) * 255


def coverage_metrics(baked: np.ndarray, surface: SurfaceCoverage | None) -> dict:
    """The coverage entries of metrics.json.

    ``coverage``: share of UV-island texels some view sees (:func:`surface_coverage`; None without the
    mesh's triangles); ``uv_island_fraction``: share of the texture inside UV islands (None likewise);
    ``texture_fill_fraction``: share of the whole texture that view pixels were baked into (``baked``, the
    bake's splat mask).
    """
    return {
        "coverage": None if surface is None else surface.coverage,
        "uv_island_fraction": None if surface is None else surface.island_fraction,
        "texture_fill_fraction": coverage_fraction(baked),
    }


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
