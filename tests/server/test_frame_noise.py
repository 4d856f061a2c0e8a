"""Per-frame initial-noise models (concord.noise.frame_noise; MATH.md section 1, unit-variance forms).

Tolerances (the brief's): per-frame variance 1 +/- 0.05 and correlations equal to their formulas within 0.05.
With n = 4 * 64 * 64 = 16384 elements per frame the sample variance has sd sqrt(2 / n) = 0.011 (0.05 is 4.5 sd)
and a sample correlation sd <= 1 / sqrt(n) = 0.008 (0.05 is 6 sd); seeds are fixed, so the tests are
deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from concord.noise.frame_noise import iid_noise, mixed_noise, progressive_noise, shared_noise

N_FRAMES, SHAPE = 5, (5, 4, 64, 64)
N_EL = 4 * 64 * 64
TOL = 0.05


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _check_unit_variance(eps: torch.Tensor) -> None:
    assert eps.shape == SHAPE and eps.dtype == torch.float32
    for i in range(eps.shape[0]):
        assert abs(eps[i].double().var().item() - 1) < TOL, i
        assert abs(eps[i].double().mean().item()) < 5 / math.sqrt(N_EL), i


def test_iid_noise_is_unit_variance_and_uncorrelated():
    eps = iid_noise(SHAPE, torch.Generator().manual_seed(2))
    _check_unit_variance(eps)
    for i in range(1, N_FRAMES):
        assert abs(_corr(eps[0], eps[i])) < TOL


def test_shared_noise_repeats_one_unit_variance_draw():
    eps = shared_noise(SHAPE, torch.Generator().manual_seed(2))
    _check_unit_variance(eps)
    assert all(torch.equal(eps[0], eps[i]) for i in range(1, N_FRAMES))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 3.0])
def test_mixed_noise_correlation_is_a2_over_1_plus_a2(alpha):
    eps = mixed_noise(SHAPE, torch.Generator().manual_seed(0), alpha)
    _check_unit_variance(eps)
    rho = alpha**2 / (1 + alpha**2)
    for i in range(N_FRAMES):
        for j in range(i + 1, N_FRAMES):
            assert abs(_corr(eps[i], eps[j]) - rho) < TOL, (i, j)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_progressive_noise_correlation_is_r_to_the_lag(alpha):
    eps = progressive_noise(SHAPE, torch.Generator().manual_seed(1), alpha)
    _check_unit_variance(eps)
    r = alpha / math.sqrt(1 + alpha**2)
    for k in (1, 2, 3):
        for i in range(k, N_FRAMES):
            assert abs(_corr(eps[i], eps[i - k]) - r**k) < TOL, (i, k)


def test_the_slides_weights_would_fail_the_variance_test():
    """Control: the slides' AR(1) with (1 - r) weights, eps_i = r eps_{i-1} + (1 - r) eta_i, has variance
    (1 - r) / (1 + r) -- the check above rejects it (so it can fail)."""
    g = torch.Generator().manual_seed(1)
    r = 1 / math.sqrt(2)
    z = torch.randn(SHAPE, generator=g)
    out = z.clone()
    for i in range(1, N_FRAMES):
        out[i] = r * out[i - 1] + (1 - r) * z[i]
    with pytest.raises(AssertionError):
        _check_unit_variance(out)


def test_seeds_dtype_and_bad_input():
    a = mixed_noise(SHAPE, torch.Generator().manual_seed(5), 1.0)
    assert torch.equal(a, mixed_noise(SHAPE, torch.Generator().manual_seed(5), 1.0))
    assert not torch.equal(a, mixed_noise(SHAPE, torch.Generator().manual_seed(6), 1.0))
    half = progressive_noise(SHAPE, torch.Generator().manual_seed(5), 1.0, dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, progressive_noise(SHAPE, torch.Generator().manual_seed(5), 1.0).half())
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        mixed_noise((4, 64, 64), g, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        progressive_noise(SHAPE, g, -1.0)
    with pytest.raises(ValueError, match="alpha"):
        mixed_noise(SHAPE, g, float("nan"))
