"""Extended (shared) self-attention across the views of one batch: the views attend to each other's features.

What it is for
--------------
Training-free joint generation of V views (MATH.md section 3). In every self-attention layer (``attn1``) of
the denoiser (and of its ControlNet), the queries of view i attend to the keys and values of a set S of views
of the same guidance group instead of only its own::

    Att(q_i, K, V) = softmax(q_i K^T / sqrt(d)) V,     K = [k_j for j in S],  V = [v_j for j in S]

(keys/values concatenated along the token axis). The views then share appearance: what one view paints,
the others see while painting. Choices of S, from the papers:

* S = all views -- "batch attention", as in Zero123++ (Shi et al. 2023; its reference attention) and SyncMVD
  (Liu et al. 2023, "Text-Guided Texturing by Synchronized Multi-View Diffusion"), which Concord's texture
  job uses;
* S = {first} -- Text2Video-Zero (Khachatryan et al., ICCV'23, "cross-frame attention" to the first frame);
* S = {first, previous} -- Pix2Video (Ceylan et al., ICCV'23). This processor takes one reference set for
  every view of the group (``reference_views``), so "previous" (a different set per view) is not expressed
  here; {first} and any fixed subset are.

Classifier-free guidance doubles the batch: the processor sees G = batch // num_views groups laid out
``[group 0 views 0..V-1, group 1 views 0..V-1, ...]`` (diffusers' ``[uncond..., cond...]`` with G = 2, or
G = 1 without guidance). Attention is extended **within a group only**: the conditional views never see the
unconditional ones' keys (reshaping the whole batch into one group would mix them -- tests/server/
test_extended_attention.py checks that this processor does not and that such a naive one is caught).
Cross-attention (``attn2``, to the text) is never extended; :func:`install_extended_attention` touches
``attn1`` only.

Cost
----
Per self-attention layer with N tokens per view, head width d (summed over heads: the layer's inner width)
and V views, ordinary attention spends ``4 N^2 d`` multiply-adds per view on ``Q K^T`` and ``softmax V``;
extended attention spends ``4 N (|S| N) d``: the attention matmuls cost |S| times more, the projections
(to_q/k/v/out) the same. At Stable Diffusion 1.5's 64x64 latent (N = 4096 at the top level) with six views
that is about +76 % of the whole UNet's FLOPs (MATH.md section 3); ENVIRONMENT.md measures ~2.8x the time of
a plain batch on the 2-core CPU. Memory: the attention matrix is ``G * heads * (V N) * (|S| N)`` elements
when a kernel materialises it (the CPU "math" path does; CUDA's flash / memory-efficient kernels do not).

Memory bound (``chunk_size``)
-----------------------------
The queries of a group (all V views' tokens, ``V * N`` of them) are processed in chunks of ``chunk_size``
query tokens; each row of the softmax only involves its own query, so chunked results equal unchunked ones
(up to float rounding in the matmul's blocking). ``chunk_size=None`` picks automatically: no chunking when the
score matrix ``G * heads * (V N) * (|S| N)`` elements (in the query's dtype) fits
:data:`AUTO_CHUNK_BUDGET_BYTES` (256 MiB); otherwise the largest chunk whose scores fit that budget
(at least 1 query token).

What it must never do: import bpy, touch the network or the file system, keep per-call state (one processor
instance is shared by every layer it is installed on), or attend across guidance groups.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "AUTO_CHUNK_BUDGET_BYTES",
    "ExtendedSelfAttnProcessor",
    "extended_attention",
    "install_extended_attention",
    "restore_attention",
    "self_attention_keys",
]

#: Bytes of attention scores (per chunk) above which ``chunk_size=None`` splits the queries.
AUTO_CHUNK_BUDGET_BYTES = 256 * 1024 * 1024


class ExtendedSelfAttnProcessor:
    """A diffusers attention processor: each view's queries attend to the keys/values of the views ``S`` of
    its own guidance group (module docstring). Use on self-attention layers (``attn1``) only.

    ``num_views``: V, views per group; the batch must be a multiple of it.
    ``reference_views``: S as view indices in ``0..V-1`` (None: all views). Order is kept, duplicates dropped.
    ``chunk_size``: query tokens per attention call (None: automatic, see the module docstring).
    """

    def __init__(
        self,
        num_views: int,
        reference_views: Sequence[int] | None = None,
        chunk_size: int | None = None,
    ):
        if int(num_views) != num_views or num_views < 1:
            raise ValueError(f"num_views must be a positive whole number, got {num_views!r}")
        self.num_views = int(num_views)
        if reference_views is None:
            self.reference_views: tuple[int, ...] | None = None
        else:
            refs: list[int] = []
            for r in reference_views:
                if int(r) != r or not 0 <= int(r) < self.num_views:
                    raise ValueError(
                        f"reference view {r!r} is not a view index in 0..{self.num_views - 1} "
                        f"(num_views={self.num_views})"
                    )
                if int(r) not in refs:
                    refs.append(int(r))
            if not refs:
                raise ValueError("reference_views is empty: pass None to attend to all views")
            self.reference_views = tuple(refs)
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive whole number or None, got {chunk_size!r}")
        self.chunk_size = None if chunk_size is None else int(chunk_size)

    def __repr__(self) -> str:
        return (
            f"ExtendedSelfAttnProcessor(num_views={self.num_views}, reference_views={self.reference_views}, "
            f"chunk_size={self.chunk_size})"
        )

    # ------------------------------------------------------------------------------------------------------
    def _group_of(self, batch_size: int) -> int:
        if batch_size % self.num_views:
            raise ValueError(
                f"extended attention: batch of {batch_size} is not a whole number of groups of "
                f"num_views={self.num_views} views (with classifier-free guidance the batch is 2 x views); "
                "install the processor with the number of views the pipeline actually batches"
            )
        return batch_size // self.num_views

    def _query_chunk(self, groups: int, heads: int, n_queries: int, n_keys: int, dtype: torch.dtype) -> int:
        """Query tokens per attention call (module docstring, "Memory bound")."""
        if self.chunk_size is not None:
            return min(self.chunk_size, n_queries)
        elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
        per_query = groups * heads * n_keys * elem
        if per_query * n_queries <= AUTO_CHUNK_BUDGET_BYTES:
            return n_queries
        return max(1, AUTO_CHUNK_BUDGET_BYTES // per_query)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # Mirrors diffusers' AttnProcessor2_0 step by step; only the attention itself is grouped.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, tokens, _ = hidden_states.shape
        groups = self._group_of(batch_size)

        if encoder_hidden_states is not None:
            # Not a self-attention call (the processor was put on a cross-attention layer): nothing to share.
            return _plain_attention(attn, hidden_states, encoder_hidden_states, attention_mask, residual,
                                    input_ndim, batch_size, None if input_ndim != 4 else (channel, height, width))

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        heads = attn.heads
        head_dim = inner_dim // heads
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        v_views = self.num_views
        refs = self.reference_views
        n_ref = v_views if refs is None else len(refs)

        # Queries of all views of a group in one sequence: (G, h, V*N, d), view-major.
        q = query.reshape(groups, v_views, heads, tokens, head_dim).permute(0, 2, 1, 3, 4)
        q = q.reshape(groups, heads, v_views * tokens, head_dim)

        # Keys/values of the group's reference views, concatenated along tokens: (G, h, |S|*N, d).
        def extend(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(groups, v_views, heads, tokens, head_dim)
            if refs is not None:
                t = t[:, list(refs)]
            return t.permute(0, 2, 1, 3, 4).reshape(groups, heads, n_ref * tokens, head_dim)

        k = extend(key)
        v = extend(value)

        mask = None
        if attention_mask is not None:
            mask = _extend_mask(attention_mask, groups, v_views, heads, tokens, refs)

        n_q = v_views * tokens
        chunk = self._query_chunk(groups, heads, n_q, n_ref * tokens, q.dtype)
        if chunk >= n_q:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        else:
            out = torch.empty_like(q)
            for start in range(0, n_q, chunk):
                stop = min(start + chunk, n_q)
                m = None
                if mask is not None:
                    m = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]
                out[:, :, start:stop] = F.scaled_dot_product_attention(
                    q[:, :, start:stop], k, v, attn_mask=m, dropout_p=0.0, is_causal=False
                )

        # (G, h, V*N, d) -> (B, N, h*d), back in batch order.
        out = out.reshape(groups, heads, v_views, tokens, head_dim).permute(0, 2, 3, 1, 4)
        hidden_states = out.reshape(batch_size, tokens, heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _extend_mask(mask: torch.Tensor, groups: int, v_views: int, heads: int, tokens: int, refs) -> torch.Tensor:
    """(B, h, Lq, N) per-view mask -> (G, h, Lq', |S| N) for the grouped queries.

    Query (view i, token q) against key (view j, token k) uses view j's own mask entry ``mask[j, :, q, k]``
    (a key-padding mask, Lq = 1, broadcasts over every query).
    """
    lq = mask.shape[-2]
    m = mask.reshape(groups, v_views, heads, lq, mask.shape[-1])
    if refs is not None:
        m = m[:, list(refs)]
    n_ref = m.shape[1]
    m = m.permute(0, 2, 3, 1, 4).reshape(groups, heads, lq, n_ref * mask.shape[-1])
    if lq != 1:
        if lq != tokens:
            raise ValueError(f"attention mask with {lq} query rows for {tokens} tokens")
        m = m.repeat(1, 1, v_views, 1)  # row (i, q) -> row q of the key views' masks
    return m


def _plain_attention(attn, hidden_states, encoder_hidden_states, attention_mask, residual, input_ndim,
                     batch_size, shape4d):
    """diffusers' AttnProcessor2_0 for calls that bring their own encoder states (never extended)."""
    _, seq_len, _ = encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                         is_causal=False)
    out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        channel, height, width = shape4d
        out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


# ----------------------------------------------------------------------------------------------------------
# Installing on a diffusers model
# ----------------------------------------------------------------------------------------------------------


def self_attention_keys(model) -> list[str]:
    """The processor keys of ``model``'s self-attention layers (``...attn1.processor``)."""
    return [k for k in model.attn_processors if k.split(".")[-2:-1] == ["attn1"]]


def install_extended_attention(
    model,
    num_views: int,
    reference_views: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> dict:
    """Put an :class:`ExtendedSelfAttnProcessor` on every ``attn1`` layer of a diffusers UNet2DConditionModel
    or ControlNetModel (any model with ``attn_processors`` / ``set_attn_processor``); every other layer keeps
    its processor. Returns the previous processors (a dict for :func:`restore_attention`)."""
    previous = dict(model.attn_processors)
    keys = self_attention_keys(model)
    if not keys:
        raise ValueError(f"{type(model).__name__} has no self-attention (attn1) layers to extend")
    processor = ExtendedSelfAttnProcessor(num_views, reference_views, chunk_size)
    new = dict(previous)
    for k in keys:
        new[k] = processor
    model.set_attn_processor(new)  # set_attn_processor pops from the dict it gets: `new` is ours
    return previous


def restore_attention(model, previous: dict) -> None:
    """Put back the processors :func:`install_extended_attention` returned."""
    model.set_attn_processor(dict(previous))


@contextmanager
def extended_attention(
    models: Sequence,
    num_views: int,
    reference_views: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> Iterator[None]:
    """Extended self-attention on every model of ``models`` (UNet, ControlNet(s); ``None`` entries are skipped)
    inside the ``with`` block; the previous processors come back on exit, also after an exception."""
    installed: list[tuple[object, dict]] = []
    try:
        for m in models:
            if m is None:
                continue
            installed.append((m, install_extended_attention(m, num_views, reference_views, chunk_size)))
        yield
    finally:
        for m, prev in reversed(installed):
            restore_attention(m, prev)
