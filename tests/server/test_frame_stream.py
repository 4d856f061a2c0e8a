"""The animation noise stream (concord.noise.frame_stream): every mode N(0, 1) per pixel and white within a frame;
mixed / progressive correlations equal their formulas; warped noise follows the motion and stays white."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from concord.frames.frameset import correspondence
from concord.noise.frame_stream import FrameNoiseStream, NoiseSpec, carry_fine_cells

C, h, w = 4, 48, 48
H, W = 8 * h, 8 * w  # the frames' pixels: 8 per latent pixel, as Stable Diffusion's VAE


def lag1(x: torch.Tensor) -> tuple[float, float]:
    """Horizontal and vertical lag-1 autocorrelation within each frame (pooled)."""
    a = x - x.mean()
    hz = float((a[..., :, 1:] * a[..., :, :-1]).mean() / a.var())
    vt = float((a[..., 1:, :] * a[..., :-1, :]).mean() / a.var())
    return hz, vt


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def shift_motion(dx: float, dy: float, frames: int) -> np.ndarray:
    """A whole-frame translation: every pixel was at (x - dx, y - dy) in the previous frame."""
    m = np.zeros((frames, H, W, 2), np.float32)
    m[..., 0], m[..., 1] = -dx, -dy
    return m


def run(spec: NoiseSpec, frames: int = 6, motion: np.ndarray | None = None, seed: int = 0) -> torch.Tensor:
    s = FrameNoiseStream(spec, (C, h, w), (H, W), torch.Generator().manual_seed(seed))
    out = []
    for i in range(frames):
        if motion is None or i == 0:
            out.append(s.next())
        else:
            src, ok = correspondence(motion[i])
            out.append(s.next(src, ok))
    return torch.stack(out)


@pytest.mark.parametrize("mode,strength", [("iid", 1.0), ("shared", 1.0), ("mixed", 1.0), ("progressive", 2.0), ("warped", 1.0), ("warped", 0.7)])
def test_every_mode_is_unit_variance_and_white(mode, strength):
    x = run(NoiseSpec(mode, strength), frames=6, motion=shift_motion(13.0, -5.0, 6))
    for f in x:
        assert abs(float(f.var()) - 1.0) <= 0.05
        assert abs(float(f.mean())) <= 0.05
    hz, vt = lag1(x)
    assert abs(hz) <= 0.05 and abs(vt) <= 0.05


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_mixed_and_progressive_correlations_follow_their_formulas(a):
    x = run(NoiseSpec("mixed", a), frames=4)
    expected = a * a / (1 + a * a)
    for i, j in [(0, 1), (0, 3), (2, 3)]:
        assert abs(corr(x[i], x[j]) - expected) <= 0.05
    x = run(NoiseSpec("progressive", a), frames=4)
    rho = a / math.sqrt(1 + a * a)
    for k in (1, 2, 3):
        assert abs(corr(x[3], x[3 - k]) - rho**k) <= 0.05


def test_warped_noise_follows_a_translation_by_whole_latent_pixels():
    # 16 image px = 2 latent pixels per frame: every latent pixel carries all of its cells over, so the noise
    # of frame i at p equals that of frame i-1 at p - (2, 0) exactly (r = 1), fresh in the uncovered columns.
    x = run(NoiseSpec("warped", 1.0), frames=3, motion=shift_motion(16.0, 0.0, 3))
    assert torch.equal(x[1][:, :, 2:], x[0][:, :, :-2])
    assert corr(x[1][:, :, :2], x[0][:, :, :2]) < 0.1  # disoccluded: fresh


def test_warped_noise_with_sub_pixel_motion_stays_correlated_and_white():
    x = run(NoiseSpec("warped", 1.0), frames=2, motion=shift_motion(4.0, 0.0, 2))  # half a latent pixel
    # the same surface point is half a latent pixel further on: most cells carried over, spread over 2 pixels
    rho = corr(x[1][:, :, 1:], x[0][:, :, :-1])
    rho0 = corr(x[1], x[0])
    assert rho0 + rho > 0.9  # all of a pixel's cells come from these two pixels
    assert min(rho, rho0) > 0.35
    hz, vt = lag1(x[1:])
    assert abs(hz) <= 0.05 and abs(vt) <= 0.05


def test_warped_r_sets_the_carried_correlation():
    for r in (0.0, 0.5, 0.9):
        x = run(NoiseSpec("warped", r), frames=2, motion=shift_motion(16.0, 0.0, 2), seed=3)
        assert abs(corr(x[1][:, :, 2:], x[0][:, :, :-2]) - r) <= 0.05


def test_stretching_motion_never_duplicates_a_cell():
    # a zoom in: many cells of frame i map into few cells of frame i-1; each source cell is kept at most once
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    m = np.stack([(xx - W / 2) * -0.5, (yy - H / 2) * -0.5], -1)  # x' = W/2 + (x - W/2) / 2
    src, ok = correspondence(m)
    target, source = carry_fine_cells(src, ok, (h * 4, w * 4))
    assert len(np.unique(source)) == len(source) == len(target)
    assert 0.2 < len(target) / (h * 4 * w * 4) < 0.3  # a 2x zoom keeps about a quarter of the cells
    x = run(NoiseSpec("warped", 1.0), frames=2, motion=np.stack([np.zeros_like(m), m]))
    assert abs(float(x[1].var()) - 1.0) <= 0.05
    hz, vt = lag1(x[1:])
    assert abs(hz) <= 0.05 and abs(vt) <= 0.05


def test_state_round_trip_continues_the_same_stream():
    spec, motion = NoiseSpec("warped", 0.9), shift_motion(5.0, 3.0, 5)
    whole = run(spec, frames=5, motion=motion, seed=7)
    s = FrameNoiseStream(spec, (C, h, w), (H, W), torch.Generator().manual_seed(7))
    first = [s.next()] + [s.next(*correspondence(motion[i])) for i in (1, 2)]
    state = s.state_dict()
    t = FrameNoiseStream(spec, (C, h, w), (H, W), torch.Generator().manual_seed(999))
    t.load_state_dict(state)
    rest = [t.next(*correspondence(motion[i])) for i in (3, 4)]
    assert torch.equal(torch.stack(first + rest), whole)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="noise mode"):
        NoiseSpec("pink")
    with pytest.raises(ValueError, match="out of range"):
        NoiseSpec("warped", 1.5)
