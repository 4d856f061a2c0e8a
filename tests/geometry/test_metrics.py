"""Measures of MATH.md section 6 (concord.geometry.metrics): cross-view disagreement, coverage, PSNR."""

from __future__ import annotations

import numpy as np
import pytest

from concord.geometry import bake as B
from concord.geometry.metrics import (
    coverage_fraction,
    cross_view_disagreement,
    psnr,
    uv_island_mask,
)
from concord.geometry.mesh import icosphere_with_uv
from concord.geometry.render import render_views, sample_texture
from concord.geometry.rigs import orbit


def smooth_texture(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    return np.stack(
        [0.3 + 0.3 * x, 0.3 + 0.2 * np.sin(2 * np.pi * y), 0.4 + 0.1 * np.cos(2 * np.pi * x)], -1
    ).astype(np.float32)


@pytest.fixture(scope="module")
def sphere_views():
    mesh = icosphere_with_uv(4)
    c, r = mesh.bounding_sphere()
    cams = orbit(4, (10.0,)).cameras(c, r, 128, 128)  # 90 deg apart: neighbours overlap
    vs = render_views(mesh, cams, 128, 128).validate()
    return mesh, vs


def views_of(texture, vs):
    imgs = np.zeros(vs.uv.shape[:3] + (3,), np.float32)
    imgs[vs.mask] = sample_texture(texture, vs.uv[vs.mask])
    return imgs


def test_consistent_views_disagree_by_about_zero(sphere_views):
    _, vs = sphere_views
    idx = B.build_texel_index(vs, 128)
    # A constant colour: exactly consistent.
    const = np.zeros(vs.mask.shape + (3,), np.float32)
    const[vs.mask] = (0.2, 0.5, 0.7)
    d = cross_view_disagreement(idx, const)
    assert d.texels > 500
    assert d.mean < 1e-6
    # Views of one smooth texture: consistent up to resampling. Measured 0.0011 (sRGB 0..1).
    d = cross_view_disagreement(idx, views_of(smooth_texture(128), vs))
    assert d.mean < 0.005


def test_per_view_offsets_give_the_offset_difference(sphere_views):
    _, vs = sphere_views
    idx = B.build_texel_index(vs, 128)
    base = views_of(smooth_texture(128), vs)  # values in [0.1, 0.6]: offsets below do not clip
    offsets = np.array([0.0, 0.1, 0.25, 0.05], np.float32)
    shifted = base + offsets[:, None, None, None] * vs.mask[..., None]
    d = cross_view_disagreement(idx, shifted)
    d0 = cross_view_disagreement(idx, base)
    for i in range(4):
        for j in range(4):
            if i != j and d.pair_texels[i, j] > 0:
                # |c_i - c_j| = |o_i - o_j| exactly, on top of the (tiny) resampling disagreement.
                assert d.pairwise[i, j] == pytest.approx(abs(offsets[i] - offsets[j]), abs=d0.pairwise[i, j] + 1e-5)
    # Neighbours (90 deg apart) overlap, opposite views (180 deg) share no texel.
    assert d.pair_texels[0, 1] > 0 and d.pair_texels[0, 2] == 0 and np.isnan(d.pairwise[0, 2])
    # Two views only: D is their offset difference.
    idx2 = B.build_texel_index(vs.subset([0, 1]), 128)
    d2 = cross_view_disagreement(idx2, shifted[:2])
    assert d2.mean == pytest.approx(0.1, abs=0.005)
    # The mean weights every texel once: a texel seen by views (0, 1) only gives 0.1, by (1, 2) 0.15, ...
    assert min(0.05, 0.1) - 1e-3 <= d.mean <= 0.25 + 1e-3
    doc = d.as_dict()
    assert doc["pairwise"][0][2] is None and doc["texels_seen_by_2plus_views"] == d.texels


def test_disagreement_from_a_viewset(sphere_views):
    _, vs = sphere_views
    from dataclasses import replace

    vs_img = replace(vs, image=views_of(smooth_texture(64), vs))
    d = cross_view_disagreement(vs_img, texture_size=64)
    assert d.mean < 0.005
    with pytest.raises(ValueError, match="texture_size"):
        cross_view_disagreement(vs_img)


def test_psnr():
    a = np.zeros((4, 4, 3))
    b = a + 0.1
    assert psnr(a, b) == pytest.approx(20.0)
    m = np.zeros((4, 4), bool)
    m[0, 0] = True
    b[1:, :] = 1.0
    assert psnr(a, b, m) == pytest.approx(20.0)
    assert psnr(a, a) == float("inf")
    assert np.isnan(psnr(a, b, np.zeros((4, 4), bool)))


def test_coverage_and_uv_islands(sphere_views):
    mesh, vs = sphere_views
    islands = uv_island_mask(mesh.uv, mesh.faces, 64)
    # The sphere's equirectangular UVs fill the square (the seam faces wrap around u = 1) except the
    # wedges at the poles (the top and bottom two texel rows): measured 0.972 at 64^2.
    assert 0.95 < islands.mean() < 1.0
    assert islands[2:-2].all()
    idx = B.build_texel_index(vs, 64)
    f = coverage_fraction(idx.coverage, islands)
    # Four views at elevation 10 deg miss the poles: measured 0.843 of the island texels, 0.819 of all texels.
    assert 0.7 < f < 0.95 and f > coverage_fraction(idx.coverage)
    # A single triangle covering the lower-left half of the square, in Blender's UVs (v up): the rasterised
    # texels are the bottom-left ones of the stored (top-row-first) texture.
    tri = uv_island_mask(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), np.array([[0, 1, 2]]), 8)
    assert tri[7, 0] and not tri[0, 7] and tri.sum() == pytest.approx(32, abs=4)
    assert coverage_fraction(tri, tri) == 1.0 and coverage_fraction(~tri, tri) == 0.0
