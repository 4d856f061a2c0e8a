"""Initial-noise models (concord.noise): UV-space noise on real ViewSets, and the classic per-frame models.

Statistical bounds are derived from the sample size (and, for UV noise, from the exact covariance the texel
sets imply), at 5 sigma or a Bonferroni-corrected level; seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import norm

from concord.geometry.mesh import icosphere_with_uv, load_mesh
from concord.geometry.render import render_views
from concord.geometry.rigs import orbit, zero123pp
from concord.noise import (
    iid_noise,
    matched_noise_texture_size,
    mixed_noise,
    progressive_noise,
    shared_noise,
    uv_noise_texels,
    uv_space_noise,
)

BARREL = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "barrel" / "barrel.glb"
C = 4


@pytest.fixture(scope="module")
def sphere_views():
    """8 views (4 azimuths x 2 elevations) of a UV sphere at 64x64 and 256x256."""
    mesh = icosphere_with_uv(3)
    c, r = mesh.bounding_sphere()
    rig = orbit(4, (0, 30)).with_frame(mesh.up, mesh.front)
    return {res: render_views(mesh, rig.cameras(c, r, res, res), res, res) for res in (64, 256)}


@pytest.fixture(scope="module")
def barrel_views():
    mesh = load_mesh(BARREL)
    c, r = mesh.bounding_sphere()
    rig = zero123pp().with_frame(mesh.up, mesh.front)
    return render_views(mesh, rig.cameras(c, r, 64, 64), 64, 64)


def _texel_sets(uv, mask, h, s):
    """Independent (slow, loop) recomputation of each foreground latent pixel's distinct texel set."""
    v, hh, _ = mask.shape
    f = hh // h
    sets = {}
    for k in range(v):
        for i in range(h):
            for j in range(h):
                m = mask[k, i * f:(i + 1) * f, j * f:(j + 1) * f]
                if m.sum() * 2 <= f * f:
                    continue
                u = uv[k, i * f:(i + 1) * f, j * f:(j + 1) * f][m].astype(np.float64)
                col = np.minimum(np.floor(np.mod(u[:, 0], 1) * s), s - 1).astype(int)
                row = np.minimum(np.floor((1 - np.mod(u[:, 1], 1)) * s), s - 1).astype(int)
                sets[(k, i, j)] = frozenset((row * s + col).tolist())
    return sets


# ------------------------------------------------------------------------------------------------ (a)
@pytest.mark.parametrize("res, s", [(64, 8), (256, 16)])
def test_footprints_on_the_same_texels_get_the_same_noise_in_every_view(sphere_views, res, s):
    # S coarse: a latent footprint (1/8 of a 64^2 view of the sphere) often fits one texel
    vs, h = sphere_views[res], res // 8
    eps = uv_space_noise(vs.uv, vs.mask, (C, h, h), torch.Generator().manual_seed(0), noise_texture_size=s)
    assert eps.shape == (vs.num_views, C, h, h) and eps.dtype == torch.float32
    sets = _texel_sets(vs.uv, vs.mask, h, s)
    groups = defaultdict(list)
    for key, ts in sets.items():
        groups[ts].append(key)
    cross_view_single = 0
    for ts, keys in groups.items():
        ref = eps[keys[0][0], :, keys[0][1], keys[0][2]]
        for k, i, j in keys[1:]:
            assert torch.equal(eps[k, :, i, j], ref)
        if len(ts) == 1 and len({k for k, _, _ in keys}) > 1:
            cross_view_single += 1
    assert cross_view_single > 0, "the fixture never lets two views share a single texel"
    # different texel sets -> different values
    firsts = [eps[k[0][0], 0, k[0][1], k[0][2]].item() for k in groups.values()]
    assert len(set(firsts)) == len(firsts)
    # the module's own index agrees with the independent recomputation
    fg, texel, owner = uv_noise_texels(vs.uv, vs.mask, (h, h), s)
    assert fg.sum() == len(sets)
    mine = defaultdict(set)
    for t, o in zip(texel.tolist(), owner.tolist()):
        mine[np.unravel_index(o, fg.shape)].add(t)
    assert {tuple(int(x) for x in k): frozenset(v) for k, v in mine.items()} == sets


# ------------------------------------------------------------------------------------------------ (b)
def _exact_moments(vs, h, s, view):
    """Sums of the exact covariance (and its square) over one view's elements (per channel):
    cov(p, q) = |T_p cap T_q| / sqrt(|T_p| |T_q|) for foreground pixels, identity for background ones."""
    fg, texel, owner = uv_noise_texels(vs.uv, vs.mask, (h, h), s)
    n_view = h * h
    sel = (owner // n_view) == view
    rows, cols = owner[sel] % n_view, texel[sel]
    count = np.bincount(rows, minlength=n_view)
    A = sp.csr_matrix((1.0 / np.sqrt(count[rows]), (rows, cols)), shape=(n_view, s * s))
    n_bg = int((~fg[view]).sum())
    sum_cov = float((np.asarray(A.sum(axis=0)) ** 2).sum()) + n_bg
    gram = (A.T @ A).tocsr()
    sum_cov2 = float(gram.multiply(gram).sum()) + n_bg
    return sum_cov, sum_cov2


def test_each_view_is_marginally_standard_normal(barrel_views):
    vs, h, s, K = barrel_views, 8, 24, 400
    draws = torch.stack(
        [uv_space_noise(vs.uv, vs.mask, (C, h, h), torch.Generator().manual_seed(1000 + i), s) for i in range(K)]
    ).double()  # (K, V, C, h, w)
    # per element: mean over seeds ~ N(0, 1/K); (K-1) var ~ chi2(K-1); Bonferroni over all elements
    n_el = draws[0].numel()
    z = norm.isf(1e-3 / (2 * n_el))
    assert (draws.mean(0).abs() * math.sqrt(K)).max() < z
    var = draws.var(0)
    assert (var - 1).abs().max() < z * math.sqrt(2 / (K - 1)) * 1.2  # chi2 skew margin
    # per view, pooled: exact variance of the pooled mean and mean square from the texel sets' covariance
    for v in range(vs.num_views):
        x = draws[:, v]
        n = x[0].numel()
        sum_cov, sum_cov2 = _exact_moments(vs, h, s, v)
        sd_mean = math.sqrt(C * sum_cov / (K * n * n))
        sd_sq = math.sqrt(2 * C * sum_cov2 / (K * n * n))
        assert abs(x.mean().item()) < 5 * sd_mean
        assert abs((x**2).mean().item() - 1) < 5 * sd_sq


def test_automatic_texture_size_follows_the_latent_footprint(sphere_views):
    sizes = {}
    for res, vs in sphere_views.items():
        h = res // 8
        sizes[res] = matched_noise_texture_size(vs.uv, vs.mask, (h, h))
        eps = uv_space_noise(vs.uv, vs.mask, (C, h, h), torch.Generator().manual_seed(0))
        # at the automatic size a footprint covers about one texel: few distinct texels per pixel
        fg, texel, owner = uv_noise_texels(vs.uv, vs.mask, (h, h), sizes[res])
        assert 1.0 <= np.median(np.bincount(owner)[np.bincount(owner) > 0]) <= 4
        assert torch.isfinite(eps).all()
    # 4x the resolution -> footprints 4x smaller in UV -> ~4x the texels
    assert 3.0 < sizes[256] / sizes[64] < 5.0


# ------------------------------------------------------------------------------------------------ (c)
def test_background_is_iid_and_independent_of_the_foreground(sphere_views):
    vs, h, s, K = sphere_views[64], 8, 16, 400
    fg, _, _ = uv_noise_texels(vs.uv, vs.mask, (h, h), s)
    bg = torch.from_numpy(~fg)
    # draw order: the background is the generator's first randn((V, C, h, w)), whatever the geometry
    eps = uv_space_noise(vs.uv, vs.mask, (C, h, h), torch.Generator().manual_seed(7), s)
    ref = torch.randn((vs.num_views, C, h, h), generator=torch.Generator().manual_seed(7))
    bgm = bg[:, None].expand_as(eps)
    assert torch.equal(eps[bgm], ref[bgm])
    other = uv_space_noise(vs.uv[::-1].copy(), vs.mask[::-1].copy(), (C, h, h), torch.Generator().manual_seed(7), 32)
    both_bg = (bg & bg.flip(0))[:, None].expand_as(eps)
    assert torch.equal(eps[both_bg], other[both_bg])

    draws = torch.stack(
        [uv_space_noise(vs.uv, vs.mask, (C, h, h), torch.Generator().manual_seed(i), s) for i in range(K)]
    ).double()
    xb = draws[:, bgm].T  # (n_bg, K)
    xf = draws[:, ~bgm].T
    xb = (xb - xb.mean(1, keepdim=True)) / xb.std(1, keepdim=True)
    xf = (xf - xf.mean(1, keepdim=True)) / xf.std(1, keepdim=True)
    corr_bf = (xb @ xf.T) / (K - 1)
    corr_bb = (xb @ xb.T) / (K - 1)
    n_bb = xb.shape[0] * (xb.shape[0] - 1) // 2
    # under independence a sample correlation is ~N(0, 1/K): Bonferroni over the pairs tested
    assert corr_bf.abs().max() < norm.isf(1e-3 / (2 * corr_bf.numel())) / math.sqrt(K)
    off = corr_bb[~torch.eye(xb.shape[0], dtype=torch.bool)]
    assert off.abs().max() < norm.isf(1e-3 / (2 * n_bb)) / math.sqrt(K)
    # whereas foreground pixels of different views on the same texel are perfectly correlated
    assert (xf @ xf.T / (K - 1)).triu(1).max() > 0.999


# ------------------------------------------------------------------------------------------------ (d)
def test_seeds_reproduce_the_noise(sphere_views):
    vs = sphere_views[256]
    a = uv_space_noise(vs.uv, vs.mask, (C, 32, 32), torch.Generator().manual_seed(3))
    b = uv_space_noise(vs.uv, vs.mask, (C, 32, 32), torch.Generator().manual_seed(3))
    c = uv_space_noise(vs.uv, vs.mask, (C, 32, 32), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    half = uv_space_noise(vs.uv, vs.mask, (C, 32, 32), torch.Generator().manual_seed(3), dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, a.half())


def test_latent_size_must_divide_the_view_size(sphere_views):
    vs = sphere_views[64]
    with pytest.raises(ValueError, match="multiple"):
        uv_space_noise(vs.uv, vs.mask, (C, 7, 7), torch.Generator().manual_seed(0), 16)


# ------------------------------------------------------------------------------------------------ classic
N_FRAMES, SHAPE = 5, (5, 4, 64, 64)
N_EL = 4 * 64 * 64


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _check_unit_variance(eps):
    for i in range(eps.shape[0]):
        assert abs(eps[i].double().var().item() - 1) < 5 * math.sqrt(2 / N_EL)
        assert abs(eps[i].double().mean().item()) < 5 / math.sqrt(N_EL)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 3.0])
def test_mixed_noise_correlation_and_variance(alpha):
    eps = mixed_noise(SHAPE, torch.Generator().manual_seed(0), alpha)
    rho = alpha**2 / (1 + alpha**2)
    _check_unit_variance(eps)
    for i in range(N_FRAMES):
        for j in range(i + 1, N_FRAMES):
            # sample correlation sd ~ (1 - rho^2) / sqrt(n)
            assert abs(_corr(eps[i], eps[j]) - rho) < 5 * (1 - rho**2) / math.sqrt(N_EL) + 1e-9


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_progressive_noise_correlation_and_variance(alpha):
    eps = progressive_noise(SHAPE, torch.Generator().manual_seed(1), alpha)
    r = alpha / math.sqrt(1 + alpha**2)
    _check_unit_variance(eps)
    for k in (1, 2, 3):
        rho = r**k
        for i in range(k, N_FRAMES):
            assert abs(_corr(eps[i], eps[i - k]) - rho) < 5 * (1 - rho**2) / math.sqrt(N_EL) + 1e-9


def test_iid_and_shared_noise():
    g = torch.Generator().manual_seed(2)
    eps = iid_noise(SHAPE, g)
    _check_unit_variance(eps)
    assert abs(_corr(eps[0], eps[1])) < 5 / math.sqrt(N_EL)
    sh = shared_noise(SHAPE, torch.Generator().manual_seed(2))
    _check_unit_variance(sh)
    assert all(torch.equal(sh[0], sh[i]) for i in range(1, N_FRAMES))
    # reproducible from the seed
    assert torch.equal(mixed_noise(SHAPE, torch.Generator().manual_seed(5), 1.0),
                       mixed_noise(SHAPE, torch.Generator().manual_seed(5), 1.0))
    with pytest.raises(ValueError):
        mixed_noise((4, 64, 64), g, 1.0)
