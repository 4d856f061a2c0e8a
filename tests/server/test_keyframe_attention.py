"""Keyframe attention (concord.attention.keyframe) on a real diffusers Attention layer: each frame attends to
exactly [itself, the keyframes, its previous frame]; guidance groups never mix; a chunk border (the carry) gives
the same result as one chunk; the record does not grow with the frames."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from concord.attention.keyframe import FrameAttnProcessor, FrameMemory

N, D, HEADS = 5, 8, 2  # tokens per frame, channels, heads


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return Attention(query_dim=D, heads=HEADS, dim_head=D // HEADS).eval()


def reference(attn: Attention, x: torch.Tensor, keys_from: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(d)) V by hand for one frame's tokens x (N, D) against tokens keys_from (L, D)."""
    q, k, v = attn.to_q(x), attn.to_k(keys_from), attn.to_v(keys_from)
    d = D // HEADS
    out = []
    for h in range(HEADS):
        s = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[:, s] @ k[:, s].T / d**0.5, dim=-1)
        out.append(w @ v[:, s])
    return attn.to_out[0](torch.cat(out, -1))


def run(attn, memory, x):
    attn.set_processor(FrameAttnProcessor("layer", memory))
    with torch.no_grad():
        return attn(x)


def test_each_frame_attends_to_itself_the_keyframe_and_its_previous_frame(layer):
    g = torch.Generator().manual_seed(1)
    key = torch.randn(2, N, D, generator=g)  # (guidance groups, tokens, channels): one keyframe
    frames = torch.randn(2, 3, N, D, generator=g)  # groups x 3 frames
    mem = FrameMemory(phase="keyframes", keyframe_count=1)
    run(layer, mem, key)
    mem.phase, mem.use_keyframes = "frames", True
    mem.previous = [("key", 0), ("live", 0), ("live", 1)]
    out = run(layer, mem, frames.reshape(6, N, D)).reshape(2, 3, N, D)
    with torch.no_grad():
        for grp in range(2):
            for j in range(3):
                prev = key[grp] if j == 0 else frames[grp, j - 1]
                want = reference(layer, frames[grp, j], torch.cat([frames[grp, j], key[grp], prev]))
                assert torch.allclose(out[grp, j], want, atol=1e-5)


def test_guidance_groups_never_mix(layer):
    g = torch.Generator().manual_seed(2)
    key = torch.randn(2, N, D, generator=g)
    frames = torch.randn(2, 2, N, D, generator=g)

    def cond_out(uncond_shift: float):
        k, f = key.clone(), frames.clone()
        k[0] += uncond_shift
        f[0] += uncond_shift
        mem = FrameMemory(phase="keyframes", keyframe_count=1)
        run(layer, mem, k)
        mem.phase, mem.use_keyframes, mem.previous = "frames", True, [("key", 0), ("live", 0)]
        return run(layer, mem, f.reshape(4, N, D)).reshape(2, 2, N, D)[1]

    assert torch.equal(cond_out(0.0), cond_out(3.0))  # the conditional half sees nothing of the unconditional


def test_a_chunk_border_is_the_same_as_one_chunk_and_the_record_stays_one_frame(layer):
    g = torch.Generator().manual_seed(3)
    key = torch.randn(2, N, D, generator=g)
    frames = torch.randn(2, 4, N, D, generator=g)
    mem = FrameMemory(phase="keyframes", keyframe_count=1)
    run(layer, mem, key)
    mem.phase, mem.use_keyframes, mem.record_last = "frames", True, True
    mem.previous = [("key", 0), ("live", 0), ("live", 1), ("live", 2)]
    whole = run(layer, mem, frames.reshape(8, N, D)).reshape(2, 4, N, D)
    parts = []
    for chunk, plan in (([0, 1], [("key", 0), ("live", 0)]), ([2, 3], [("carry",), ("live", 0)])):
        mem.previous = plan
        parts.append(run(layer, mem, frames[:, chunk].reshape(4, N, D)).reshape(2, 2, N, D))
        size = mem.nbytes()
        mem.advance_carry()
    assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-6)
    # what is kept: the keyframe's and one carried frame's keys/values, whatever the number of frames
    assert size == 3 * 2 * (2 * HEADS * N * (D // HEADS)) * 4  # (keyframe, carry, next carry) x (k, v), fp32
