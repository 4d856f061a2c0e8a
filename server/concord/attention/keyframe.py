"""Cross-frame self-attention for animation: every frame attends to keyframes and to its previous frame, whose
keys and values are computed once and cached, so memory does not grow with the number of frames.

What it is for
--------------
The `stylize` job generates a sequence in chunks of frames. Extended self-attention (MATH.md section 3) with a
reference set S per frame makes the frames share appearance:

    Att(q_i, K, V) = softmax(q_i K^T / sqrt(d)) V,   K = [k_i, k_j for j in S_i],   V likewise

with S_i from the job's ``keyframes`` setting:

* ``first`` -- S_i = {frame 0} (Text2Video-Zero, Khachatryan et al., ICCV 2023, "cross-frame attention");
* ``middle`` -- S_i = {frame N // 2} (FateZero, Qi et al., ICCV 2023, attends to a middle frame);
* ``first+previous`` -- S_i = {frame 0, frame i - 1} (Pix2Video, Ceylan et al., ICCV 2023);
* an explicit list -- S_i = the listed frames.

Choice: the frame's own keys stay in K (as in Pix2Video and Rerender-A-Video's cross-frame attention), so a frame
can still attend to itself where the keyframe does not show what it shows; Text2Video-Zero replaces them.

How the memory stays flat
-------------------------
The keyframes are denoised first, together (each attends to all keyframes), and their keys/values are recorded
per (layer, step) in a `FrameMemory`: |keyframes| frames' worth, whatever the sequence length. Then the frames go
through in chunks; the previous frame's keys/values come from the chunk itself (the frame before in the batch, at
the same step), from the keyframe record (a keyframe's neighbour), or -- for a chunk's first frame -- from the
*carry*: the keys/values of the previous chunk's last frame, recorded while that chunk ran. So a chunk border is
invisible to the attention: frame i sees frame i - 1 at the same step whichever chunk it was in. Memory: one
frame's keys/values per keyframe plus one for the carry, times layers times steps; nothing grows with N.

Classifier-free guidance doubles the batch ([uncond frames..., cond frames...]); keys are taken per guidance group,
so the halves never mix (as in `concord.attention.extended`). Cross-attention (``attn2``) is never touched.

What it must never do: import bpy, touch the network or the file system, attend across guidance groups, or keep
references to anything but the detached cached keys/values in its `FrameMemory`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from concord.attention.extended import _plain_attention, self_attention_keys

__all__ = ["FrameMemory", "FrameAttnProcessor", "frame_attention", "PREVIOUS_LIVE", "PREVIOUS_CARRY", "PREVIOUS_KEY"]

PREVIOUS_LIVE = "live"  # ("live", j): the previous frame is batch frame j, computed in the same call
PREVIOUS_CARRY = "carry"  # ("carry",): the previous frame is the previous chunk's last frame
PREVIOUS_KEY = "key"  # ("key", m): the previous frame is keyframe m (its recorded keys/values)


@dataclass
class FrameMemory:
    """The cached keys/values one sequence's frames attend to, and what the current model call is.

    ``phase``: "keyframes" (the batch is the keyframes: they attend to each other and are recorded) or "frames"
    (a chunk: each frame attends to itself, the keyframes if ``use_keyframes``, and its ``previous[j]`` entry).
    ``keyframe_count``: the keyframes in the batch during the keyframes phase.
    ``step``: the sampler's step index (the record's second key), set by the job before every model call.
    ``record_last``: in the frames phase, record the batch's last frame as the next chunk's carry.
    ``dtype``: the dtype the record is kept in (None: as computed)."""

    phase: str = "frames"
    step: int = 0
    keyframe_count: int = 0  # frames in the batch in the keyframes phase
    use_keyframes: bool = False
    previous: list = field(default_factory=list)
    record_last: bool = False
    dtype: torch.dtype | None = None
    keyframes: dict = field(default_factory=dict)  # (layer, step) -> (k, v) (G, h, M*N, d)
    carry: dict = field(default_factory=dict)  # (layer, step) -> (k, v) (G, h, N, d)
    next_carry: dict = field(default_factory=dict)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(self.dtype) if self.dtype is not None else t.clone()

    def advance_carry(self) -> None:
        """After a chunk: its last frame's record becomes the carry of the next chunk."""
        self.carry, self.next_carry = self.next_carry, {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.keyframes, self.carry, self.next_carry)
                   for kv in d.values() for t in kv)

    def state_dict(self) -> dict:
        """What a resumed job needs (CPU tensors): the keyframes' record and the carry."""
        cpu = lambda d: {k: tuple(t.cpu() for t in kv) for k, kv in d.items()}  # noqa: E731
        return {"keyframes": cpu(self.keyframes), "carry": cpu(self.carry)}

    def load_state_dict(self, state: dict, device) -> None:
        to = lambda d: {k: tuple(t.to(device) for t in kv) for k, kv in d.items()}  # noqa: E731
        self.keyframes, self.carry, self.next_carry = to(state["keyframes"]), to(state["carry"]), {}


class FrameAttnProcessor:
    """A diffusers attention processor for one self-attention layer (``name``), reading and writing ``memory``
    (module docstring). The batch holds G guidance groups of F frames: [group 0 frames..., group 1 frames...]."""

    def __init__(self, name: str, memory: FrameMemory):
        self.name = name
        self.memory = memory

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        shape4d = None
        if input_ndim == 4:
            b, ch, hh, ww = hidden_states.shape
            shape4d = (ch, hh, ww)
            hidden_states = hidden_states.view(b, ch, hh * ww).transpose(1, 2)
        batch_size, tokens, _ = hidden_states.shape
        if encoder_hidden_states is not None:
            return _plain_attention(attn, hidden_states, encoder_hidden_states, attention_mask, residual,
                                    input_ndim, batch_size, shape4d)
        if attention_mask is not None:
            raise ValueError("frame attention does not take an attention mask on self-attention")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        heads = attn.heads
        q, k, v = (f(hidden_states) for f in (attn.to_q, attn.to_k, attn.to_v))
        d = k.shape[-1] // heads
        split = lambda t: t.view(batch_size, -1, heads, d).transpose(1, 2)  # noqa: E731  (B, h, N, d)
        q, k, v = split(q), split(k), split(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        mem = self.memory
        key = (self.name, mem.step)
        if mem.phase == "keyframes":
            frames = mem.keyframe_count
            if frames < 1 or batch_size % frames:
                raise ValueError(f"frame attention: batch {batch_size} is not guidance groups of {frames} keyframes")
            groups = batch_size // frames
            kg = k.reshape(groups, frames, heads, tokens, d).permute(0, 2, 1, 3, 4).reshape(groups, heads, frames * tokens, d)
            vg = v.reshape(groups, frames, heads, tokens, d).permute(0, 2, 1, 3, 4).reshape(groups, heads, frames * tokens, d)
            mem.keyframes[key] = (mem.keep(kg), mem.keep(vg))
            qg = q.reshape(groups, frames, heads, tokens, d).permute(0, 2, 1, 3, 4).reshape(groups, heads, frames * tokens, d)
            out = F.scaled_dot_product_attention(qg, kg, vg)
            out = out.reshape(groups, heads, frames, tokens, d).permute(0, 2, 1, 3, 4).reshape(batch_size, heads, tokens, d)
        else:
            frames = len(mem.previous)
            if frames == 0 or batch_size % frames:
                raise ValueError(f"frame attention: batch {batch_size} is not guidance groups of the {frames} frames planned")
            groups = batch_size // frames
            qf = q.reshape(groups, frames, heads, tokens, d)
            kf = k.reshape(groups, frames, heads, tokens, d)
            vf = v.reshape(groups, frames, heads, tokens, d)
            kv_key = mem.keyframes.get(key) if mem.use_keyframes else None
            if mem.use_keyframes and kv_key is None:
                raise RuntimeError(f"no keyframe record for layer {self.name} at step {mem.step}: denoise the keyframes first")
            outs = []
            for j, prev in enumerate(mem.previous):
                ks, vs = [kf[:, j]], [vf[:, j]]
                if kv_key is not None:
                    ks.append(kv_key[0].to(k.dtype))
                    vs.append(kv_key[1].to(v.dtype))
                pk = self._previous(prev, kf, vf, key, tokens, d)
                if pk is not None:
                    ks.append(pk[0].to(k.dtype))
                    vs.append(pk[1].to(v.dtype))
                outs.append(F.scaled_dot_product_attention(qf[:, j], torch.cat(ks, 2), torch.cat(vs, 2)))
            if mem.record_last:
                mem.next_carry[key] = (mem.keep(kf[:, -1]), mem.keep(vf[:, -1]))
            out = torch.stack(outs, 1).reshape(batch_size, heads, tokens, d)

        hidden = out.transpose(1, 2).reshape(batch_size, tokens, heads * d).to(q.dtype)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        if input_ndim == 4:
            hidden = hidden.transpose(-1, -2).reshape(batch_size, *shape4d)
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor

    def _previous(self, prev, kf, vf, key, tokens: int, d: int):
        """(k, v) (G, h, N, d) of a frame's previous frame per its plan entry, or None."""
        if prev is None:
            return None
        kind = prev[0]
        if kind == PREVIOUS_LIVE:
            return kf[:, prev[1]], vf[:, prev[1]]
        if kind == PREVIOUS_CARRY:
            kv = self.memory.carry.get(key)
            if kv is None:
                raise RuntimeError(f"no carried record for layer {self.name} at step {self.memory.step}")
            return kv
        if kind == PREVIOUS_KEY:
            kk, vv = self.memory.keyframes[key]
            m = prev[1]
            return kk[:, :, m * tokens:(m + 1) * tokens], vv[:, :, m * tokens:(m + 1) * tokens]
        raise ValueError(f"unknown previous-frame plan entry {prev!r}")


@contextmanager
def frame_attention(models: Sequence, memory: FrameMemory) -> Iterator[FrameMemory]:
    """A `FrameAttnProcessor` on every ``attn1`` layer of each model (UNet, ControlNet; None skipped) inside the
    ``with`` block, all sharing ``memory``; the previous processors come back on exit, also after an exception."""
    installed: list[tuple[object, dict]] = []
    try:
        for n, m in enumerate(models):
            if m is None:
                continue
            previous = dict(m.attn_processors)
            keys = self_attention_keys(m)
            if not keys:
                raise ValueError(f"{type(m).__name__} has no self-attention (attn1) layers")
            new = dict(previous)
            for k in keys:
                new[k] = FrameAttnProcessor(f"{n}:{k}", memory)
            m.set_attn_processor(new)
            installed.append((m, previous))
        yield memory
    finally:
        for m, prev in reversed(installed):
            m.set_attn_processor(dict(prev))
