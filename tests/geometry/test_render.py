"""Blender-free renderer (concord.geometry.render) against analytic answers on a sphere, plus texture sampling.

The icosphere's vertices lie on the unit sphere and its flat faces inside it: the mesh surface lies between
the sphere of radius 1 and the sphere of radius r_in = min over faces of the distance from the centre to
the face's plane. So the depth of every pixel whose ray meets the inner sphere is bounded by the two analytic
ray-sphere depths, and the silhouette lies between the two discs: tolerances set by the tessellation.
"""

import math

import numpy as np
import pytest

from concord.geometry.mesh import Mesh, icosphere_with_uv
from concord.geometry.render import pixel_rays, render_views, sample_texture
from concord.geometry.rigs import orbit, zero123pp

W, H = 160, 120


@pytest.fixture(scope="module")
def sphere() -> Mesh:
    return icosphere_with_uv(5)  # unit sphere at the origin, 20480 faces


def _inner_radius(m: Mesh) -> float:
    fn = m.face_normals()
    return float(np.abs(np.einsum("ij,ij->i", fn, m.vertices[m.faces[:, 0]])).min())


def _ray_sphere(o, d, r):
    """Smallest t >= 0 with |o + t d| = r (NaN where the ray misses): t^2 |d|^2 + 2 t o.d + |o|^2 - r^2 = 0."""
    a = np.einsum("ij,ij->i", d, d)
    b = 2 * d @ o
    c = o @ o - r * r
    disc = b * b - 4 * a * c
    t = (-b - np.sqrt(np.where(disc >= 0, disc, np.nan))) / (2 * a)
    return t


@pytest.fixture(scope="module")
def rendered(sphere):
    cams = zero123pp().cameras(np.zeros(3), 1.0, W, H) + orbit(2, [80]).cameras(np.zeros(3), 1.0, W, H)
    return cams, render_views(sphere, cams, W, H)


def test_viewset_is_valid(rendered):
    _, vs = rendered
    vs.validate()
    assert vs.depth.shape == (8, H, W) and vs.uv.dtype == np.float32


def test_depth_and_mask_match_analytic_sphere(sphere, rendered):
    cams, vs = rendered
    r_in = _inner_radius(sphere)
    assert 0.998 < r_in < 1.0
    for k, (K, T) in enumerate(cams):
        o, d = pixel_rays(K, T, W, H)
        # pixel_rays' directions have unit camera z, so the ray parameter is the planar depth
        t_out = _ray_sphere(o, d, 1.0).reshape(H, W)
        t_in = _ray_sphere(o, d, r_in).reshape(H, W)
        outer, inner = np.isfinite(t_out), np.isfinite(t_in)
        mask = vs.mask[k]
        # silhouette between the two discs, and the mask agrees with the analytic unit disc
        assert mask[inner].all() and not mask[~outer].any()
        iou = (mask & outer).sum() / (mask | outer).sum()
        assert iou > 0.98
        # depth between the analytic depths of the outer and inner spheres (float32 slack)
        z = vs.depth[k][inner]
        slack = 2e-6 * z
        assert np.all(z >= t_out[inner] - slack) and np.all(z <= t_in[inner] + slack)
        # and close to the unit sphere's depth in relative terms, away from the silhouette
        cos_incidence = np.abs(np.sum(
            (o + t_out[..., None].reshape(-1, 1) * d).reshape(H, W, 3) * d.reshape(H, W, 3), -1)
        ) / np.linalg.norm(d.reshape(H, W, 3), axis=-1)
        frontal = inner & (cos_incidence > 0.5)
        rel = np.abs(vs.depth[k][frontal] - t_out[frontal]) / t_out[frontal]
        assert rel.max() < (1 - r_in) * 2 / 0.5 / 3  # sagitta / cos over a depth of >= 3 radii


def test_uv_and_normal_match_analytic_sphere(sphere, rendered):
    cams, vs = rendered
    for k, (K, T) in enumerate(cams):
        o, d = pixel_rays(K, T, W, H)
        t = _ray_sphere(o, d, 1.0)
        p = (o + t[:, None] * d).reshape(H, W, 3)
        m = vs.mask[k] & np.isfinite(p).all(-1)
        q = p[m]
        u = np.arctan2(q[:, 1], q[:, 0]) / (2 * np.pi) + 0.5
        v = np.arcsin(np.clip(q[:, 2], -1, 1)) / np.pi + 0.5
        uv = vs.uv[k][m].astype(np.float64)
        du = np.abs((uv[:, 0] - u + 0.5) % 1.0 - 0.5)  # consumers wrap u modulo 1
        away_from_poles = np.abs(q[:, 2]) < 0.95
        assert np.median(du[away_from_poles]) < 1e-3 and np.percentile(du[away_from_poles], 99) < 5e-3
        dv = np.abs(uv[:, 1] - v)
        assert np.median(dv) < 1e-3 and np.percentile(dv, 99) < 5e-3
        # normals: analytic normal of the unit sphere is the point itself; facing the camera
        n = vs.normal[k][m].astype(np.float64)
        angle = np.degrees(np.arccos(np.clip(np.sum(n * q, -1), -1, 1)))
        assert np.median(angle) < 0.5 and np.percentile(angle, 99) < 2.0
        assert np.all(np.sum(n * d.reshape(H, W, 3)[m], -1) < 0)


def test_depth_is_planar_not_radial():
    # a plane z = 5 in front of a camera at the origin looking along +z: planar depth is 5 everywhere
    v = np.array([[-50, -50, 5], [50, -50, 5], [50, 50, 5], [-50, 50, 5.0]])
    f = np.array([[0, 1, 2], [0, 2, 3]])
    plane = Mesh.from_arrays(v, f, v[:, :2] / 100 + 0.5)
    K = np.array([[40.0, 0, 32], [0, 40, 24], [0, 0, 1]])
    vs = render_views(plane, [(K, np.eye(4))], 64, 48)
    assert vs.mask.all()
    np.testing.assert_allclose(vs.depth, 5.0, rtol=1e-6)
    # pixel (row 0, col 0) centre at (0.5, 0.5): x = (0.5 - 32) / 40 * 5, y = (0.5 - 24) / 40 * 5 (y down = -v up)
    x, y = (0.5 - 32) / 40 * 5, (0.5 - 24) / 40 * 5
    np.testing.assert_allclose(vs.uv[0, 0, 0], [x / 100 + 0.5, y / 100 + 0.5], atol=1e-6)
    np.testing.assert_allclose(vs.normal[0, 0, 0], [0, 0, -1], atol=1e-6)  # faces the camera


def test_background_and_row_order():
    # a small sphere in the upper-left of the image: row 0 is the top (OpenCV y down)
    s = icosphere_with_uv(2, radius=0.3, center=(-1.0, -1.0, 6.0))
    K = np.array([[50.0, 0, 50], [0, 50, 50], [0, 0, 1]])
    vs = render_views(s, [(K, np.eye(4))], 100, 100)
    rows, cols = np.nonzero(vs.mask[0])
    assert rows.mean() < 50 and cols.mean() < 50
    bg = ~vs.mask
    assert (vs.depth[bg] == 0).all() and (vs.uv[bg] == 0).all() and (vs.normal[bg] == 0).all()


def test_texture_image():
    tex = np.zeros((4, 4, 3), np.float32)
    tex[:2] = [1.0, 0.0, 0.0]  # top half red (v > 0.5), bottom half blue
    tex[2:] = [0.0, 0.0, 1.0]
    from PIL import Image

    v = np.array([[-1, -1, 5], [1, -1, 5], [1, 1, 5], [-1, 1, 5.0]])
    plane = Mesh.from_arrays(v, np.array([[0, 1, 2], [0, 2, 3]]), (v[:, :2] + 1) / 2,
                             texture=Image.fromarray((tex * 255).astype(np.uint8)))
    K = np.array([[100.0, 0, 16], [0, 100, 16], [0, 0, 1]])
    vs = render_views(plane, [(K, np.eye(4))], 32, 32, texture=True)
    # camera y is down and world y = v up... here world +y maps to image down, so v grows downwards:
    # the image's bottom rows see v > 0.5 (red)
    assert vs.image.dtype == np.float32
    np.testing.assert_allclose(vs.image[0, 24, 16], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(vs.image[0, 8, 16], [0, 0, 1], atol=1e-6)
    assert (vs.image[~vs.mask] == 0).all()


def test_sample_texture_convention_and_wrap():
    rng = np.random.default_rng(0)
    tex = rng.random((6, 8, 3)).astype(np.float32)
    Ht, Wt = tex.shape[:2]
    # texel centres: u = (j + 0.5) / W, v = 1 - (i + 0.5) / H return the texel exactly
    i, j = np.meshgrid(np.arange(Ht), np.arange(Wt), indexing="ij")
    uv = np.stack([(j + 0.5) / Wt, 1 - (i + 0.5) / Ht], -1)
    np.testing.assert_allclose(sample_texture(tex, uv), tex, atol=1e-6)
    # wrap: shifting by whole tiles changes nothing
    np.testing.assert_allclose(sample_texture(tex, uv + [3.0, -2.0]), tex, atol=1e-5)
    # halfway between two horizontal texel centres is their mean; across the u seam it wraps
    mid = sample_texture(tex, np.array([[1.0 / Wt, 1 - 0.5 / Ht]]))
    np.testing.assert_allclose(mid[0], (tex[0, 0] + tex[0, 1]) / 2, atol=1e-6)
    seam = sample_texture(tex, np.array([[0.0, 1 - 0.5 / Ht]]))
    np.testing.assert_allclose(seam[0], (tex[0, 0] + tex[0, -1]) / 2, atol=1e-6)
    assert sample_texture(tex[..., 0], uv).shape == (Ht, Wt, 1)


def test_no_ray_caster_is_a_clear_error(monkeypatch):
    import builtins

    from concord.geometry import render as render_mod

    real_import = builtins.__import__

    def no_rtree(name, *args, **kwargs):
        if name == "rtree":
            raise ImportError("no rtree")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(render_mod, "_HAVE_EMBREE", False)
    monkeypatch.setattr(builtins, "__import__", no_rtree)
    with pytest.raises(RuntimeError, match="install embreex"):
        render_views(icosphere_with_uv(1), orbit(1).cameras(np.zeros(3), 1.0, 8, 8), 8, 8)


def test_fallback_without_embree_agrees(monkeypatch):
    pytest.importorskip("rtree", reason="trimesh's numpy ray fallback needs rtree")
    from concord.geometry import render as render_mod

    s = icosphere_with_uv(2)
    cams = orbit(2, [20]).cameras(np.zeros(3), 1.0, 24, 20)
    fast = render_views(s, cams, 24, 20)
    monkeypatch.setattr(render_mod, "_HAVE_EMBREE", False)
    with pytest.warns(RuntimeWarning, match="embreex is not installed"):
        slow = render_views(s, cams, 24, 20)
    both = fast.mask & slow.mask
    assert (fast.mask != slow.mask).sum() <= 4  # rays grazing an edge may go either way
    np.testing.assert_allclose(slow.depth[both], fast.depth[both], rtol=1e-4)
    np.testing.assert_allclose(slow.uv[both], fast.uv[both], atol=1e-4)
    np.testing.assert_allclose(slow.normal[both], fast.normal[both], atol=1e-4)
