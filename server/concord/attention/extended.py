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

Correspondence weighting (``bias``)
-----------------------------------
Plain extended attention leaves the model to find, from features alone, which tokens of another view show the
same spot of the surface; a small model trained for minutes does not (docs/micro-model.md: it shares colours,
not where a pattern's cells sit). The texture job knows the answer exactly (every foreground pixel's surface
point, from the ViewSet's depth and cameras), so :class:`CorrespondenceBias` adds it to the logits::

    Att(q_i, K, V) = softmax(q_i K^T / sqrt(d) + b_i) V
    b_ij = beta * exp(-|X_i - X_j|^2 / (2 (rho s)^2))   if i and j are foreground tokens of different views
    b_ij = 0                                            otherwise (own view, background)

X: the surface point a token shows (its representative pixel's, ``concord.geometry.sync.token_grid``), s: the
surface size of one token (median distance between neighbouring foreground tokens), rho: ``radius``. beta = 0
is plain extended attention; a key of another view showing exactly the query's spot weighs e^beta times what
the features alone give it. Occlusion needs no test: a point hidden in view j has no token of view j near it.
This is a soft form of MVDiffusion's correspondence-aware attention (Tang et al., NeurIPS 2023), which restricts
each pixel's cross-view attention to a neighbourhood of its corresponding pixels; here every key stays
reachable and only the matches are favoured, so with beta = 0 nothing changes. A model works best with the
strengths it was trained with (``concord train-micro --correspondence``). The logits of a block of queries are
computed per call from the token points (``(rows, |S| N)``, the size of the score block itself), so the memory
bound below holds with the bias on.

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
    "CorrespondenceBias",
    "attention_grids",
    "token_footprint",
    "ExtendedSelfAttnProcessor",
    "extended_attention",
    "install_extended_attention",
    "restore_attention",
    "self_attention_keys",
]

#: A block of correspondence logits up to this size is kept for the next layer that asks for the same block.
_BIAS_MEMO_BYTES = 64 * 1024 * 1024

#: Bytes of attention scores (per chunk) above which ``chunk_size=None`` splits the queries.
AUTO_CHUNK_BUDGET_BYTES = 256 * 1024 * 1024


class CorrespondenceBias:
    """Additive attention logits that make a view's tokens look at the tokens of the other views showing the same
    spot of the surface: correspondence-weighted extended attention (module docstring, "Correspondence weighting").

    ``levels``: one ``(points, foreground)`` per attention level (token grid) the denoiser may run at: points
    (V, th, tw, 3) -- or (G, V, th, tw, 3), one geometry per group of views (training batches several objects) --
    the surface point each token shows, and foreground (V, th, tw) / (G, V, th, tw) whether it shows the object
    (``concord.geometry.sync.token_surface_points`` makes them from a ViewSet). ``strength``: beta, the logit
    bonus of an exact match (0: plain extended attention). ``radius``: the match's length scale in token
    footprints; a group's footprint is the median distance between neighbouring foreground tokens of one view.
    Tensors are made once per (level, device) and kept; the logits of a block of queries are computed when
    asked, so memory stays that of the score block."""

    def __init__(self, levels, strength: float, radius: float = 1.0):
        if not (strength >= 0.0) or not (radius > 0.0):
            raise ValueError(f"correspondence strength must be >= 0 and radius > 0, got {strength!r}, {radius!r}")
        self.strength = float(strength)
        self.radius = float(radius)
        self._levels: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for points, fg in levels:
            pts = torch.as_tensor(points, dtype=torch.float32)
            mask = torch.as_tensor(fg, dtype=torch.bool)
            if pts.ndim == 4:
                pts, mask = pts[None], mask[None]
            if pts.ndim != 5 or pts.shape[-1] != 3 or tuple(mask.shape) != tuple(pts.shape[:-1]):
                raise ValueError("a level's points must be (V, th, tw, 3) or (G, V, th, tw, 3), foreground the same "
                                 f"without the last axis; got {tuple(pts.shape)} and {tuple(mask.shape)}")
            g, v, th, tw, _ = pts.shape
            scale = 1.0 / (2.0 * (self.radius * token_footprint(pts, mask)) ** 2)  # (G,); 0 where unknown
            self._levels[th * tw] = (pts.reshape(g, v * th * tw, 3), mask.reshape(g, v * th * tw), scale)
        self._cache: dict = {}
        self._last = None  # (key, logits) of the last block asked for, when small (_BIAS_MEMO_BYTES)

    @property
    def token_counts(self) -> tuple[int, ...]:
        """The tokens-per-view counts this bias knows (one per attention level)."""
        return tuple(sorted(self._levels))

    def _tensors(self, tokens: int, device):
        key = (tokens, str(device))
        if key not in self._cache:
            if tokens not in self._levels:
                raise ValueError(
                    f"correspondence-weighted attention has no token grid with {tokens} tokens per view "
                    f"(it knows {self.token_counts}); build it for the latent size the sampler runs at"
                )
            pts, fg, scale = self._levels[tokens]
            view = torch.arange(pts.shape[1] // tokens).repeat_interleave(tokens)
            self._cache[key] = (pts.to(device), fg.to(device), view.to(device), scale.to(device))
        return self._cache[key]

    def logits(self, tokens: int, refs, start: int, stop: int, device, dtype) -> torch.Tensor:
        """(G, stop - start, |S| * N) logits (G = 1 when every group has the same geometry) for the view-major
        queries ``start:stop`` of a group against the keys of the views ``refs`` (None: all)."""
        memo = (tokens, None if refs is None else tuple(refs), start, stop, str(device), dtype)
        if self._last is not None and self._last[0] == memo:  # every layer of a level asks for the same block
            return self._last[1]
        pts, fg, view, scale = self._tensors(tokens, device)
        if refs is None:
            keys = slice(None)
        else:
            keys = torch.cat([torch.arange(r * tokens, (r + 1) * tokens, device=device) for r in refs])
        q_pts, k_pts = pts[:, start:stop], pts[:, keys]
        d2 = torch.cdist(q_pts, k_pts).square()
        b = self.strength * torch.exp(-d2 * scale[:, None, None])
        keep = fg[:, start:stop, None] & fg[:, keys][:, None, :] & (scale > 0)[:, None, None]
        keep = keep & (view[start:stop, None] != view[keys][None, :])[None]
        out = torch.where(keep, b, torch.zeros((), device=device)).to(dtype)
        small = out.numel() * out.element_size() <= _BIAS_MEMO_BYTES
        self._last = (memo, out) if small else None
        return out


def attention_grids(latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The token grids a UNet's attention levels can run at: the latent (h, w), then the size after each stride-2
    downsampler, down to 1 x 1 (the levels a :class:`CorrespondenceBias` is built for). diffusers' Downsample2D is a
    3x3 convolution with stride 2 and padding 1, so an odd side rounds up: ceil(h / 2) (a 72 px view of an SD model:
    latent 9, then 5, 3, 2, 1)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    grids = [(h, w)]
    while (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
        grids.append((h, w))
    return grids


def attention_levels(image_hw: tuple[int, int], latent_hw: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(token grid, pixel block) per level of :func:`attention_grids`: level k's token covers the image pixels of a
    2^k x 2^k block of latent pixels, f 2^k pixels a side for a latent pixel of f (the latent must divide the
    image); where the side does not divide, the last row or column of blocks reaches past the image."""
    hh, ww = int(image_hw[0]), int(image_hw[1])
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h < 1 or w < 1 or hh % h or ww % w:
        raise ValueError(f"a latent of {h}x{w} does not divide views of {hh}x{ww}")
    fy, fx = hh // h, ww // w
    return [(grid, (fy << k, fx << k)) for k, grid in enumerate(attention_grids((h, w)))]


def token_footprint(points: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """(G,) the median distance between horizontally or vertically neighbouring foreground tokens of one view, per
    group of (G, V, th, tw, 3) points: the surface size of one token. inf where a group has no such pair (its
    matches then get no bonus)."""
    out = []
    for p, m in zip(points, fg):
        dx = (p[:, :, 1:] - p[:, :, :-1]).norm(dim=-1)[m[:, :, 1:] & m[:, :, :-1]]
        dy = (p[:, 1:] - p[:, :-1]).norm(dim=-1)[m[:, 1:] & m[:, :-1]]
        d = torch.cat([dx, dy])
        out.append(d.median() if d.numel() else torch.tensor(float("inf")))
    return torch.stack(out).float()


class ExtendedSelfAttnProcessor:
    """A diffusers attention processor: each view's queries attend to the keys/values of the views ``S`` of
    its own guidance group (module docstring). Use on self-attention layers (``attn1``) only.

    ``num_views``: V, views per group; the batch must be a multiple of it.
    ``reference_views``: S as view indices in ``0..V-1`` (None: all views). Order is kept, duplicates dropped.
    ``chunk_size``: query tokens per attention call (None: automatic, see the module docstring).
    ``bias``: a :class:`CorrespondenceBias` added to the logits (None: plain extended attention).
    """

    def __init__(
        self,
        num_views: int,
        reference_views: Sequence[int] | None = None,
        chunk_size: int | None = None,
        bias: "CorrespondenceBias | None" = None,
    ):
        self.bias = bias
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
            f"chunk_size={self.chunk_size}, bias={'on' if self.bias is not None else 'off'})"
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
        if self.bias is not None:  # the bias block (rows x keys, shared by groups and heads) and its temporaries
            per_query += 3 * n_keys * elem
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

        def block_mask(start: int, stop: int):
            m = None
            if mask is not None:
                m = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]
            if self.bias is not None:
                b = self.bias.logits(tokens, refs, start, stop, q.device, q.dtype)[:, None]  # (G or 1, 1, rows, keys)
                if m is not None and m.dtype == torch.bool:
                    m = torch.where(m, 0.0, float("-inf")).to(q.dtype)
                m = b if m is None else m + b
            return m

        if chunk >= n_q:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask(0, n_q), dropout_p=0.0, is_causal=False)
        else:
            out = torch.empty_like(q)
            for start in range(0, n_q, chunk):
                stop = min(start + chunk, n_q)
                out[:, :, start:stop] = F.scaled_dot_product_attention(
                    q[:, :, start:stop], k, v, attn_mask=block_mask(start, stop), dropout_p=0.0, is_causal=False
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
    bias: CorrespondenceBias | None = None,
) -> dict:
    """Put an :class:`ExtendedSelfAttnProcessor` on every ``attn1`` layer of a diffusers UNet2DConditionModel
    or ControlNetModel (any model with ``attn_processors`` / ``set_attn_processor``); every other layer keeps
    its processor. Returns the previous processors (a dict for :func:`restore_attention`)."""
    previous = dict(model.attn_processors)
    keys = self_attention_keys(model)
    if not keys:
        raise ValueError(f"{type(model).__name__} has no self-attention (attn1) layers to extend")
    processor = ExtendedSelfAttnProcessor(num_views, reference_views, chunk_size, bias)
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
    bias: CorrespondenceBias | None = None,
) -> Iterator[None]:
    """Extended self-attention on every model of ``models`` (UNet, ControlNet(s); ``None`` entries are skipped)
    inside the ``with`` block; the previous processors come back on exit, also after an exception."""
    installed: list[tuple[object, dict]] = []
    try:
        for m in models:
            if m is None:
                continue
            installed.append((m, install_extended_attention(m, num_views, reference_views, chunk_size, bias)))
        yield
    finally:
        for m, prev in reversed(installed):
            restore_attention(m, prev)
