"""Correspondence-weighted shared attention (concord.attention.extended.CorrespondenceBias) and the token surface
points it reads (concord.geometry.sync.token_grid / token_surface_points).

What must hold: the processor computes softmax(q K^T / sqrt(d) + b) V with b the documented bonus (checked against
the formula written out by hand); strength 0 is plain extended attention; chunking and per-group geometry change
nothing they should not; the token points of two views that see the same surface spot lie within a token of each
other (on a real fixture's rendered views), which is what makes the bonus land on the right keys.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from concord.attention.extended import (
    CorrespondenceBias,
    ExtendedSelfAttnProcessor,
    attention_grids,
    attention_levels,
    extended_attention,
    token_footprint,
)
from concord.models.tiny import TINY_TEXT_DIM, build_components

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BARREL = FIXTURES / "meshes" / "barrel" / "barrel.glb"


def _random_levels(g: int, v: int, grids, seed: int = 0):
    rng = np.random.default_rng(seed)
    levels = []
    for th, tw in grids:
        pts = rng.normal(size=(g, v, th, tw, 3)).astype(np.float32) * 0.5
        fg = rng.random((g, v, th, tw)) < 0.7
        levels.append((pts, fg))
    return levels


def _expected_bias(pts, fg, beta, radius):
    """b_ij by the module docstring's formula, one group: (V*N, V*N), written out element by element."""
    v, th, tw, _ = pts.shape
    n = th * tw
    foot = float(token_footprint(torch.as_tensor(pts)[None], torch.as_tensor(fg)[None])[0])
    P, F = pts.reshape(v * n, 3).astype(np.float64), fg.reshape(v * n)
    b = np.zeros((v * n, v * n))
    for i in range(v * n):
        for j in range(v * n):
            if F[i] and F[j] and i // n != j // n:
                b[i, j] = beta * math.exp(-np.sum((P[i] - P[j]) ** 2) / (2 * (radius * foot) ** 2))
    return torch.as_tensor(b, dtype=torch.float32)


def test_processor_matches_the_formula_with_the_bias():
    """softmax(q K^T / sqrt(d) + b) V per group, with each group's own geometry, against a hand-written loop."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    g, v, th, tw = 2, 3, 2, 3
    n = th * tw
    levels = _random_levels(g, v, [(th, tw)], seed=1)
    bias = CorrespondenceBias(levels, strength=3.0, radius=1.5)
    h = torch.randn(g * v, n, 16)
    with torch.no_grad():
        out = ExtendedSelfAttnProcessor(v, bias=bias)(attn, h)
        q = attn.to_q(h).view(g, v * n, 2, 8)
        k = attn.to_k(h).view(g, v * n, 2, 8)
        val = attn.to_v(h).view(g, v * n, 2, 8)
        expected = torch.empty(g, v * n, 2, 8)
        for gi in range(g):
            b = _expected_bias(levels[0][0][gi], levels[0][1][gi], 3.0, 1.5)
            for head in range(2):
                s = q[gi, :, head] @ k[gi, :, head].T / 8**0.5 + b
                expected[gi, :, head] = s.softmax(-1) @ val[gi, :, head]
        expected = attn.to_out[0](expected.reshape(g * v, n, 16))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_logits_are_zero_on_own_view_and_background_and_beta_on_an_exact_match():
    v, th, tw = 2, 2, 2
    pts = np.zeros((v, th, tw, 3), np.float32)
    pts[0] = np.arange(4, dtype=np.float32).reshape(2, 2, 1) * np.array([1.0, 0, 0], np.float32)
    pts[1] = pts[0]  # view 1 shows exactly what view 0 shows
    fg = np.ones((v, th, tw), bool)
    fg[1, 1, 1] = False
    bias = CorrespondenceBias([(pts, fg)], strength=5.0)
    L = bias.logits(4, None, 0, 8, "cpu", torch.float32)[0]
    assert L.shape == (8, 8)
    assert torch.all(L[:4, :4] == 0) and torch.all(L[4:, 4:] == 0), "own-view keys got a bonus"
    for i in range(3):
        assert L[i, 4 + i] == pytest.approx(5.0) and L[4 + i, i] == pytest.approx(5.0)
    assert torch.all(L[:, 7] == 0) and torch.all(L[7, :] == 0), "a background token got a bonus"
    torch.testing.assert_close(L, L.T)
    # a neighbour one footprint away: beta * exp(-1/2)
    assert L[0, 5] == pytest.approx(5.0 * math.exp(-0.5), rel=1e-5)
    # reference views: only view 1's keys
    R = bias.logits(4, [1], 0, 8, "cpu", torch.float32)[0]
    torch.testing.assert_close(R, L[:, 4:])


def test_zero_strength_is_plain_extended_attention_and_chunking_changes_nothing():
    unet = build_components(seed=0)["unet"].eval()
    V = 3
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2 * V, 4, 8, 8, generator=g)
    emb = torch.randn(2 * V, 5, TINY_TEXT_DIM, generator=g)
    levels = [(lv[0][0], lv[1][0]) for lv in _random_levels(1, V, attention_grids((8, 8)), seed=2)]

    def run(**kw):
        with torch.no_grad(), extended_attention([unet], V, **kw):
            return unet(x, 500, encoder_hidden_states=emb).sample

    plain = run()
    torch.testing.assert_close(run(bias=CorrespondenceBias(levels, 0.0)), plain, atol=1e-6, rtol=1e-6)
    strong = run(bias=CorrespondenceBias(levels, 6.0))
    assert (strong - plain).abs().max() > 1e-3, "the bias did not change the output"
    chunked = run(bias=CorrespondenceBias(levels, 6.0), chunk_size=7)
    torch.testing.assert_close(chunked, strong, atol=1e-5, rtol=1e-5)


def test_per_group_geometry_is_each_groups_own():
    """Two groups with different geometry give each group what it gives alone."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(1)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    v, grid = 2, (2, 2)
    levels = _random_levels(2, v, [grid], seed=3)
    h = torch.randn(2 * v, 4, 16)
    with torch.no_grad():
        both = ExtendedSelfAttnProcessor(v, bias=CorrespondenceBias(levels, 4.0))(attn, h)
        for gi in range(2):
            alone = CorrespondenceBias([(levels[0][0][gi], levels[0][1][gi])], 4.0)
            one = ExtendedSelfAttnProcessor(v, bias=alone)(attn, h[gi * v : (gi + 1) * v])
            torch.testing.assert_close(both[gi * v : (gi + 1) * v], one, atol=1e-6, rtol=1e-6)


def test_footprint_is_the_token_spacing():
    ys, xs = np.meshgrid(np.arange(4) * 0.3, np.arange(5) * 0.3, indexing="ij")
    plane = np.stack([xs, ys, np.zeros_like(xs)], -1)[None, None].astype(np.float32)  # (1, 1, 4, 5, 3)
    fg = np.ones(plane.shape[:-1], bool)
    assert float(token_footprint(torch.as_tensor(plane), torch.as_tensor(fg))[0]) == pytest.approx(0.3, rel=1e-5)
    lone = np.zeros_like(fg)
    lone[..., 0, 0] = True  # one foreground token: no neighbour pair, no scale, no bonus
    assert math.isinf(float(token_footprint(torch.as_tensor(plane), torch.as_tensor(lone))[0]))
    b = CorrespondenceBias([(np.concatenate([plane[0]] * 2), np.concatenate([lone[0]] * 2))], 4.0)
    assert torch.all(b.logits(20, None, 0, 40, "cpu", torch.float32) == 0)


def test_unknown_token_grid_and_bad_settings_are_clear_errors():
    levels = [(lv[0][0], lv[1][0]) for lv in _random_levels(1, 2, [(4, 4)])]
    bias = CorrespondenceBias(levels, 2.0)
    with pytest.raises(ValueError, match="no token grid with 9 tokens"):
        bias.logits(9, None, 0, 18, "cpu", torch.float32)
    with pytest.raises(ValueError, match="strength"):
        CorrespondenceBias(levels, -1.0)
    with pytest.raises(ValueError, match="points must be"):
        CorrespondenceBias([(np.zeros((2, 4, 4, 2)), np.ones((2, 4, 4), bool))], 1.0)


def test_attention_grids_follow_the_unets_downsampling():
    """Each level is what a stride-2, padding-1 3x3 convolution makes of the one above (checked against torch's
    own output size), down to 1 x 1; odd sides round up."""
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    for hw in ((32, 32), (12, 8), (9, 9), (13, 6)):
        grids = attention_grids(hw)
        assert grids[0] == hw and grids[-1] == (1, 1)
        for above, below in zip(grids, grids[1:]):
            assert tuple(conv(torch.zeros(1, 1, *above)).shape[2:]) == below
    assert attention_grids((32, 32)) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert attention_grids((9, 9)) == [(9, 9), (5, 5), (3, 3), (2, 2), (1, 1)]
    assert attention_levels((72, 72), (9, 9))[:3] == [((9, 9), (8, 8)), ((5, 5), (16, 16)), ((3, 3), (32, 32))]
    with pytest.raises(ValueError, match="does not divide"):
        attention_levels((72, 72), (7, 7))


def test_token_grid_of_a_level_that_does_not_divide_the_image():
    """A 72 px view's 5 x 5 level (16 px tokens): tokens wholly inside the image are those of the same grid on the
    image cropped to 64 px; the last row and column cover the remaining 8 px, the padding counting as background
    (so a token whose image pixels are all foreground is only half foreground: background, no bonus; the
    conservative side, since the UNet's token there also mixes in its zero padding)."""
    from concord.geometry.sync import token_grid

    rng = np.random.default_rng(0)
    pts = rng.normal(size=(2, 72, 72, 3)).astype(np.float32)
    mask = np.ones((2, 72, 72), bool)
    mask[:, :30, :30] = False
    p5, f5 = token_grid(pts, mask, (5, 5), block=(16, 16))
    p4, f4 = token_grid(pts[:, :64, :64], mask[:, :64, :64], (4, 4))
    assert np.array_equal(p5[:, :4, :4], p4) and np.array_equal(f5[:, :4, :4], f4)
    assert not f5[:, 4, :].any() and not f5[:, :, 4].any()
    _, f5 = token_grid(pts, np.ones_like(mask), (5, 5), block=(16, 16))
    assert f5[:, :4, :4].all() and not f5[:, 4, :].any() and not f5[:, :, 4].any()
    with pytest.raises(ValueError, match="does not cover"):
        token_grid(pts, mask, (4, 4), block=(16, 16))


def test_token_points_of_rendered_views_meet_where_the_views_see_the_same_spot():
    """On the Barrel's six rendered views: each foreground token's point re-projects into its own token, and where
    another view sees that point unoccluded, the other view's token there shows a point within ~one footprint."""
    from concord.consistency_eval import render_fixture_views
    from concord.geometry.sync import token_surface_points

    vs = render_fixture_views(BARREL, size=64)
    th = tw = 16
    pts, fg = token_surface_points(vs, (th, tw))
    foot = float(token_footprint(torch.as_tensor(pts)[None], torch.as_tensor(fg)[None])[0])
    f = vs.height // th
    K, T = vs.intrinsics.astype(np.float64), vs.world_to_camera.astype(np.float64)

    def project(k, X):
        cam = X @ T[k, :3, :3].T + T[k, :3, 3]
        uvw = cam @ K[k].T
        return uvw[:, :2] / uvw[:, 2:3], cam[:, 2]

    # own view: the point lies on the ray through a pixel of the token's own block
    for k in range(vs.num_views):
        rc = np.argwhere(fg[k])
        px, _ = project(k, pts[k][fg[k]])
        assert np.all(np.floor(px[:, 1] / f) == rc[:, 0]) and np.all(np.floor(px[:, 0] / f) == rc[:, 1])

    # other views: the token where the point lands, when the point is visible there, shows (nearly) the same spot
    gaps = []
    for a in range(vs.num_views):
        X = pts[a][fg[a]].astype(np.float64)
        for b in range(vs.num_views):
            if a == b:
                continue
            px, z = project(b, X)
            c, r = np.floor(px[:, 0]).astype(int), np.floor(px[:, 1]).astype(int)
            inside = (c >= 0) & (c < vs.width) & (r >= 0) & (r < vs.height)
            c, r, z, Xi = c[inside], r[inside], z[inside], X[inside]
            seen = vs.mask[b, r, c] & (np.abs(vs.depth[b, r, c] - z) < 0.01 * z)
            tr, tc = r[seen] // f, c[seen] // f
            ok = fg[b, tr, tc]
            gaps.append(np.linalg.norm(pts[b, tr[ok], tc[ok]] - Xi[seen][ok], axis=1) / foot)
    gaps = np.concatenate(gaps)
    assert gaps.size > 500, "too few shared spots to test"
    # the token there is at most ~a token away (its representative pixel is in the same block)
    assert np.median(gaps) < 0.75 and np.quantile(gaps, 0.9) < 1.5, (np.median(gaps), np.quantile(gaps, 0.9))
