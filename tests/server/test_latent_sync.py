"""UV-space latent synchronisation (concord.geometry.sync.LatentSync) on real ViewSets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from concord.geometry import bake
from concord.geometry.mesh import icosphere_with_uv, load_mesh
from concord.geometry.render import render_views
from concord.geometry.rigs import orbit, zero123pp
from concord.geometry.sync import LatentSync, downsample_viewset, footprint_texture_size

BARREL = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "barrel" / "barrel.glb"
C = 4


@pytest.fixture(scope="module")
def barrel_views():
    """Six Zero123++ views of the barrel at 256x256 (32x32 latents)."""
    mesh = load_mesh(BARREL)
    c, r = mesh.bounding_sphere()
    rig = zero123pp().with_frame(mesh.up, mesh.front)
    return render_views(mesh, rig.cameras(c, r, 256, 256), 256, 256)


@pytest.fixture(scope="module")
def sphere_views():
    """Four views around a UV sphere; the one at azimuth 180 looks straight at the u = 0/1 seam."""
    mesh = icosphere_with_uv(4)
    c, r = mesh.bounding_sphere()
    rig = orbit(4, (10,)).with_frame(mesh.up, mesh.front)
    return render_views(mesh, rig.cameras(c, r, 128, 128), 128, 128)


@pytest.fixture(scope="module")
def sync(barrel_views):
    return LatentSync.from_viewset(barrel_views, (32, 32), texture_size=48)


def _random(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _bg(ls: LatentSync) -> torch.Tensor:
    """bool (V, 1, h, w): latent pixels outside the index."""
    v, (h, w) = ls.num_views, ls.latent_hw
    keep = torch.zeros(v * h * w, dtype=torch.bool)
    keep[ls.pixel] = True
    return ~keep.reshape(v, 1, h, w)


def test_sync_is_idempotent_and_leaves_background_untouched(sync):
    x = _random((6, C, 32, 32))
    x_copy = x.clone()
    y = sync.sync(x)
    assert torch.equal(x, x_copy), "sync wrote into its input"
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(sync.sync(y), y, atol=1e-6, rtol=1e-6)
    bg = _bg(sync).expand_as(x)
    assert bg.any() and (~bg).any()
    assert torch.equal(y[bg], x[bg])
    assert not torch.allclose(y[~bg], x[~bg])


def test_sync_removes_disagreement_between_views(sync):
    x = _random((6, C, 32, 32), seed=1)
    before = sync.disagreement(x)
    # iid N(0,1) per-view means: |a - b| of two means is about 2/sqrt(pi) / sqrt(pixels per texel) ~ 1
    assert before > 0.3
    assert sync.disagreement(sync.sync(x)) < 1e-6


def test_consistent_latents_are_left_as_they_are(sync):
    s = sync.texture_size
    texture = _random((s, s, C), seed=2).numpy()
    x_np = bake.gather(sync.index, texture)  # (V, h, w, C): every view sees the same texture
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    torch.testing.assert_close(sync.sync(x), x, atol=1e-5, rtol=1e-5)
    assert sync.disagreement(x) < 1e-6


@pytest.mark.parametrize("splat", ["nearest", "bilinear"])
def test_matches_numpy_scatter_mean_and_gather(barrel_views, splat):
    ls = LatentSync.from_viewset(barrel_views, (32, 32), texture_size=40, splat=splat)
    x = _random((6, C, 32, 32), seed=3)
    x_np = x.permute(0, 2, 3, 1).numpy()
    tex_np = bake.scatter_mean(ls.index, x_np)  # (S, S, C)
    torch.testing.assert_close(ls.texture(x), torch.from_numpy(tex_np).permute(2, 0, 1), atol=1e-5, rtol=1e-5)
    synced_np = bake.gather(ls.index, tex_np)  # (V, h, w, C), 0 off the index
    got = ls.sync(x).permute(0, 2, 3, 1).reshape(-1, C)[torch.from_numpy(ls.index.pixel)]
    want = torch.from_numpy(synced_np.reshape(-1, C)[ls.index.pixel])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cov = torch.from_numpy(ls.index.coverage)
    assert torch.equal(ls.coverage(), cov)


def test_half_precision_and_channels_last(sync):
    x = _random((6, C, 32, 32), seed=4)
    ref = sync.sync(x)
    half = sync.sync(x.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, atol=2e-2, rtol=1e-2)
    cl = x.clone().to(memory_format=torch.channels_last)
    cl_copy = cl.clone()
    torch.testing.assert_close(sync.sync(cl), ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(cl, cl_copy)
    with pytest.raises(ValueError, match="latents must be"):
        sync.sync(_random((6, C, 16, 16)))


def test_weights_follow_cos_power(barrel_views):
    flat = LatentSync.from_viewset(barrel_views, (32, 32), texture_size=48, cos_power=0.0)
    assert torch.allclose(flat.weight, torch.ones_like(flat.weight))
    steep = LatentSync.from_viewset(barrel_views, (32, 32), texture_size=48, cos_power=4.0)
    assert steep.weight.max() <= 1 and steep.weight.min() > 0 and steep.weight.std() > 0.05


def test_downsampled_viewset_is_valid_and_never_averages_across_a_seam(sphere_views):
    vs, f = sphere_views, 8
    lvs = downsample_viewset(vs, (16, 16))
    lvs.validate()  # depth > 0 exactly on the mask, zeros on background, unit normals
    assert np.allclose(lvs.intrinsics[:, :2], vs.intrinsics[:, :2] / f)
    blocks = vs.mask.reshape(4, 16, f, 16, f).sum(axis=(2, 4))
    assert np.array_equal(lvs.mask, blocks * 2 > f * f)

    uvb = vs.uv.reshape(4, 16, f, 16, f, 2).transpose(0, 1, 3, 2, 4, 5).reshape(4, 16, 16, f * f, 2)
    mb = vs.mask.reshape(4, 16, f, 16, f).transpose(0, 1, 3, 2, 4).reshape(4, 16, 16, f * f)
    spread = np.where(mb[..., None], uvb, -np.inf).max(axis=3) - np.where(mb[..., None], uvb, np.inf).min(axis=3)
    straddle = lvs.mask & (spread[..., 0] > 0.5)
    assert straddle.sum() >= 2, "the fixture should have footprints across the u seam"
    # every latent UV is next to one of its block's own pixels' UVs (a mean across the seam would sit near
    # u = 0.5, far from all of them)
    d = np.abs(uvb - lvs.uv[:, :, :, None, :]).max(-1)
    nearest = np.where(mb, d, np.inf).min(-1)[lvs.mask]
    assert nearest.max() < 0.02
    # and a sync built on it keeps the seam: latents of views on both sides agree through one texel set
    ls = LatentSync.from_viewset(vs, (16, 16))
    x = _random((4, C, 16, 16), seed=5)
    assert ls.disagreement(ls.sync(x)) < 1e-6


def test_automatic_texture_size_matches_the_latent_footprint(barrel_views):
    lvs32 = downsample_viewset(barrel_views, (32, 32))
    lvs16 = downsample_viewset(barrel_views, (16, 16))
    s32 = footprint_texture_size(lvs32.uv, lvs32.mask)
    s16 = footprint_texture_size(lvs16.uv, lvs16.mask)
    assert 1.5 < s32 / s16 < 2.5  # half the footprint -> twice the texels
    ls = LatentSync.from_viewset(barrel_views, (32, 32))
    assert ls.texture_size == s32
    # about one latent pixel per texel per view: texels shared by views, not pixels piled up
    per_texel = torch.bincount(ls.slot[:, 0]).float()
    assert 1.0 <= per_texel.median().item() <= 6.0


@pytest.mark.gpu
def test_sync_on_cuda_matches_cpu(barrel_views):
    cpu = LatentSync.from_viewset(barrel_views, (32, 32), texture_size=48)
    gpu = LatentSync.from_viewset(barrel_views, (32, 32), texture_size=48, device="cuda")
    x = _random((6, C, 32, 32), seed=6)
    torch.testing.assert_close(gpu.sync(x.cuda()).cpu(), cpu.sync(x), atol=1e-5, rtol=1e-5)
    half = gpu.sync(x.cuda().half())
    assert half.dtype == torch.float16 and half.is_cuda
    assert abs(gpu.disagreement(x.cuda()) - cpu.disagreement(x)) < 1e-4
