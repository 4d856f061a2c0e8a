"""Blender-free correspondence renderer: depth, mask, UV and normal maps of a mesh by ray casting.

:func:`render_views` produces a :class:`concord.geometry.viewset.ViewSet` (see its module docstring for the
array contract) from a :class:`concord.geometry.mesh.Mesh` and cameras from ``concord.geometry.rigs``, so the
CLI, tests and benchmarks run every pipeline without Blender. ``tests/blender/test_cycles_agreement.py``
checks that it agrees with Cycles' Depth/UV passes.

How
---
One ray per pixel centre: pixel (row r, col c) has centre (c + 0.5, r + 0.5) and camera-space direction
``d_cam = K^-1 (c + 0.5, r + 0.5, 1)`` (z = 1), world direction ``d = R^T d_cam`` from the camera centre
``C = -R^T t``. Embree (through ``embreex``, the library trimesh's fast path uses) returns the first hit's
triangle, barycentrics (b1, b2) with ``p = (1 - b1 - b2) v0 + b1 v1 + b2 v2`` and ray parameter ``t``.
Because ``d_cam`` has z = 1, the hit's planar camera depth is exactly ``t``. All views' rays go in one call.

* UV: barycentric interpolation of the hit face's three vertex UVs. Vertices are split at UV seams (one UV
  per face corner where they differ), so interpolation never blends across a seam.
* Normal: barycentric interpolation of the vertex (shading) normals, renormalised, as Cycles' Normal pass
  reports. Flipped where the ray hits the back of a face (geometric normal . d > 0) so it faces the camera.
* Mask: the ray hit something. Background: depth 0, UV 0, normal 0.

Geometry is recentred on its bounding-box centre before building the embree scene (embree works in float32;
this keeps precision for meshes far from the origin). Without embreex, trimesh's pure-numpy intersector is used
with a warning (about 500x slower).

Also here: :func:`sample_texture`, bilinear texture lookup in Blender's UV convention with wrapping; its texel
coordinates are the baker's (:func:`concord.geometry.bake.texel_coordinates`), one formula for both.

Layer rule: numpy, trimesh, embreex. No bpy, no torch.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from .bake import texel_coordinates
from .mesh import Mesh
from .viewset import ViewSet

__all__ = ["render_views", "sample_texture", "pixel_rays", "has_embree"]

try:  # embree through embreex (what trimesh.ray.ray_pyembree wraps)
    from embreex import rtcore_scene as _rtcore_scene
    from embreex.mesh_construction import TriangleMesh as _EmbreeTriangleMesh

    _HAVE_EMBREE = True
except Exception:  # pragma: no cover - depends on the platform
    _HAVE_EMBREE = False


def has_embree() -> bool:
    """Whether the fast ray caster (embreex) is available."""
    return _HAVE_EMBREE


def pixel_rays(K: np.ndarray, world_to_camera: np.ndarray, width: int, height: int):
    """Rays through the pixel centres of one camera: origin (3,) and directions (H*W, 3), row-major from the
    top-left pixel. Directions are ``R^T K^-1 (c + 0.5, r + 0.5, 1)``: unnormalised, unit camera z."""
    K = np.asarray(K, dtype=np.float64)
    T = np.asarray(world_to_camera, dtype=np.float64)
    R, t = T[:3, :3], T[:3, 3]
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pix = np.stack([cols.ravel(), rows.ravel(), np.ones(width * height)], axis=1)
    d_cam = pix @ np.linalg.inv(K).T
    d_cam /= d_cam[:, 2:3]  # exact z = 1 even with skew
    return -R.T @ t, d_cam @ R  # (R^T d)^T = d^T R


def render_views(
    mesh: Mesh,
    cameras: Sequence[tuple[np.ndarray, np.ndarray]],
    width: int,
    height: int,
    *,
    texture: bool = False,
) -> ViewSet:
    """Render depth / mask / UV / normal for each camera (K, world_to_camera) at width x height.

    ``texture=True`` also fills ``image`` (float32 sRGB in [0, 1], unlit base colour sampled at the UVs;
    0 on background) when the mesh has a texture. The result is not validated (a camera that misses the
    object yields an empty mask): call ``.validate()`` where that matters.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    cams = [(np.asarray(K, np.float64), np.asarray(T, np.float64)) for K, T in cameras]
    if not cams:
        raise ValueError("need at least one camera")
    V, HW = len(cams), width * height
    if mesh.uv is None:
        raise ValueError("the mesh has no UVs (load it with unwrap=True)")

    center = 0.5 * (mesh.vertices.min(axis=0) + mesh.vertices.max(axis=0))
    # one ray per pixel centre and view (`pixel_rays`: d = R^T K^-1 (c + 0.5, r + 0.5, 1), unit camera z), in
    # float32 for the ray caster, the origin relative to the mesh's centre
    origins = np.empty((V * HW, 3), dtype=np.float32)
    dirs = np.empty((V * HW, 3), dtype=np.float32)
    for k, (K, T) in enumerate(cams):
        origin, d = pixel_rays(K, T, width, height)
        dirs[k * HW : (k + 1) * HW] = d
        origins[k * HW : (k + 1) * HW] = origin - center

    tri_local = (mesh.vertices - center)[mesh.faces]
    face, b1, b2, tfar, ng = _cast(tri_local, origins, dirs)
    del origins

    hit = face >= 0
    hit_idx = np.flatnonzero(hit)
    f = face[hit_idx]
    b1h, b2h = b1[hit_idx], b2[hit_idx]
    w = np.stack([1.0 - b1h - b2h, b1h, b2h], axis=1)  # (n, 3) float32 barycentric weights

    depth = np.zeros(V * HW, dtype=np.float32)
    depth[hit_idx] = tfar[hit_idx]
    uv = np.zeros((V * HW, 2), dtype=np.float32)
    face_uv = mesh.uv[mesh.faces].astype(np.float32)  # (F, 3, 2): per face corner
    uv[hit_idx] = np.einsum("nk,nkc->nc", w, face_uv[f])

    face_n = mesh.normals[mesh.faces].astype(np.float32)  # (F, 3, 3)
    n = np.einsum("nk,nkc->nc", w, face_n[f])
    length = np.sqrt(np.einsum("nc,nc->n", n, n))
    ng_hit = ng[hit_idx]  # geometric normal (v1 - v0) x (v2 - v0), unnormalised
    small = length < 1e-6  # opposite vertex normals cancel: fall back to the face normal
    if small.any():
        n[small] = ng_hit[small]
        length[small] = np.sqrt(np.einsum("nc,nc->n", n[small], n[small]))
    # face the camera: flip where the ray meets the back of the face (geometric normal . d > 0)
    sign = np.where(np.einsum("nc,nc->n", ng_hit, dirs[hit_idx]) > 0, -1.0, 1.0).astype(np.float32)
    normal = np.zeros((V * HW, 3), dtype=np.float32)
    normal[hit_idx] = n * (sign / length)[:, None]

    image = None
    if texture and mesh.texture is not None:
        tex = mesh.texture_rgb()
        image = np.zeros((V * HW, 3), dtype=np.float32)
        image[hit_idx] = np.clip(sample_texture(tex, uv[hit_idx]), 0.0, 1.0)
        image = image.reshape(V, height, width, 3)

    Ks = np.stack([K for K, _ in cams]).astype(np.float32)
    Ts = np.stack([T for _, T in cams]).astype(np.float32)
    return ViewSet(
        depth=depth.reshape(V, height, width),
        mask=hit.reshape(V, height, width),
        uv=uv.reshape(V, height, width, 2),
        normal=normal.reshape(V, height, width, 3),
        intrinsics=Ks,
        world_to_camera=Ts,
        image=image,
    )


def _cast(triangles: np.ndarray, origins: np.ndarray, dirs: np.ndarray):
    """First hits per ray: face index (-1 = miss), barycentrics b1, b2, ray parameter t and the geometric
    normal (v1 - v0) x (v2 - v0) of the hit face (unnormalised; embree's Ng has this orientation)."""
    if _HAVE_EMBREE:
        scene = _rtcore_scene.EmbreeScene()
        _EmbreeTriangleMesh(scene, np.ascontiguousarray(triangles, dtype=np.float32))
        res = scene.run(origins, dirs, output=1)
        face = res["primID"].astype(np.int64)
        face[res["geomID"] < 0] = -1
        return face, res["u"], res["v"], res["tfar"], res["Ng"]

    try:
        import rtree  # noqa: F401  (trimesh's numpy intersector needs it for its broad phase)
    except ImportError:
        raise RuntimeError(
            "no ray caster: install embreex (fast, x86_64) or rtree (trimesh's slow numpy fallback)"
        ) from None
    warnings.warn(
        "embreex is not installed: ray casting falls back to trimesh's pure-numpy intersector (~500x slower)",
        RuntimeWarning,
        stacklevel=3,
    )
    import trimesh
    from trimesh.ray.ray_triangle import RayMeshIntersector

    tm = trimesh.Trimesh(vertices=triangles.reshape(-1, 3), faces=np.arange(triangles.shape[0] * 3).reshape(-1, 3),
                         process=False)
    index_tri, index_ray, loc = RayMeshIntersector(tm).intersects_id(
        origins.astype(np.float64), dirs.astype(np.float64), multiple_hits=False, return_locations=True
    )
    n = len(origins)
    face = np.full(n, -1, dtype=np.int64)
    b1 = np.zeros(n, np.float32)
    b2 = np.zeros(n, np.float32)
    tfar = np.zeros(n, np.float32)
    face[index_ray] = index_tri
    bary = trimesh.triangles.points_to_barycentric(triangles[index_tri], loc)
    b1[index_ray], b2[index_ray] = bary[:, 1], bary[:, 2]
    d = dirs[index_ray].astype(np.float64)
    tfar[index_ray] = np.einsum("ij,ij->i", loc - origins[index_ray], d) / np.einsum("ij,ij->i", d, d)
    ng = np.zeros((n, 3), np.float32)
    tri = triangles[index_tri]
    ng[index_ray] = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return face, b1, b2, tfar, ng


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of ``texture`` (H, W, C) float, row 0 = top, at Blender-convention ``uv`` (..., 2).

    Texel (row i, col j) has its centre at u = (j + 0.5) / W, v = 1 - (i + 0.5) / H, so the continuous
    texel coordinates are x = u W - 0.5, y = (1 - v) H - 0.5; both wrap (the texture tiles), matching
    Blender's default "Repeat" extension with linear interpolation. Returns float32 (..., C).
    """
    tex = np.asarray(texture)
    if tex.ndim == 2:
        tex = tex[..., None]
    H, W = tex.shape[:2]
    x, y = texel_coordinates(uv, (H, W))  # frac(u) W - 0.5, (1 - frac(v)) H - 0.5
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    x0 = x0.astype(np.int64) % W
    y0 = y0.astype(np.int64) % H
    x1 = (x0 + 1) % W
    y1 = (y0 + 1) % H
    top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
    bottom = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)
