"""Extended self-attention (concord.attention.extended): views share keys/values within a guidance group only.

Tiny UNet / ControlNet from concord.models.tiny (random weights, fixed seeds), 8x8 latents, one forward pass
per case. Equalities that the method guarantees are asserted bit-exact (torch.equal); ones that differ only by
float rounding (chunking, a different but equivalent kernel call) with allclose 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from concord.attention import (
    ExtendedSelfAttnProcessor,
    extended_attention,
    install_extended_attention,
    restore_attention,
    self_attention_keys,
)
from concord.attention import extended as extended_module
from concord.models.tiny import TINY_TEXT_DIM, build_components

V = 3  # views per group
T = 500  # timestep


@pytest.fixture(scope="module")
def models():
    comps = build_components(seed=0)
    unet, controlnet = comps["unet"].eval(), comps["controlnet"].eval()
    return unet, controlnet


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    emb = torch.randn(batch, 5, TINY_TEXT_DIM, generator=g)
    cond = torch.rand(batch, 3, 64, 64, generator=g)
    return x, emb, cond


@torch.no_grad()
def _unet(unet, x, emb):
    return unet(x, T, encoder_hidden_states=emb).sample


@torch.no_grad()
def _controlnet(controlnet, x, emb, cond):
    down, mid = controlnet(x, T, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
    return list(down) + [mid]


def _install(model, processor) -> dict:
    previous = dict(model.attn_processors)
    new = dict(previous)
    for k in self_attention_keys(model):
        new[k] = processor
    model.set_attn_processor(new)
    return previous


class NaiveWholeBatchProcessor:
    """Deliberately WRONG: treats the whole batch (2V with guidance) as one group of views, so the
    conditional views attend to the unconditional ones. Exists only so the CFG test can show it catches this."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        b, n, _ = hidden_states.shape
        q, key, val = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        h, d = attn.heads, key.shape[-1] // attn.heads
        q = q.view(b, n, h, d).transpose(1, 2)
        # keys/values of every sample of the batch, concatenated: (1, h, b*n, d) shared by all
        key = key.view(1, b * n, h, d).transpose(1, 2)
        val = val.view(1, b * n, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, key, val)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _guidance_groups_mix(unet, processor) -> bool:
    """Batch [uncond V, cond V]: does changing a cond view change any uncond output, or vice versa?
    Also checks that the change does reach the other views of its own half (the processor is active)."""
    previous = _install(unet, processor)
    try:
        x, emb, _ = _inputs(2 * V, seed=1)
        base = _unet(unet, x, emb)
        mixed = False
        for changed, other in ((V + 1, slice(0, V)), (1, slice(V, 2 * V))):
            x2 = x.clone()
            x2[changed] += 1.0
            out = _unet(unet, x2, emb)
            mixed |= not torch.equal(out[other], base[other])
            same_half = [i for i in (range(V, 2 * V) if changed >= V else range(V)) if i != changed]
            assert all(not torch.equal(out[i], base[i]) for i in same_half), "views of a group did not share"
        return mixed
    finally:
        unet.set_attn_processor(previous)


# ------------------------------------------------------------------------------------------------ (a)
def test_views_influence_each_other_only_with_extended_attention(models):
    unet, _ = models
    x, emb, _ = _inputs(V)
    x2 = x.clone()
    x2[2] += 1.0  # change view k = 2 only

    base_off, changed_off = _unet(unet, x, emb), _unet(unet, x2, emb)
    for j in (0, 1):
        assert torch.equal(base_off[j], changed_off[j]), "default processors leak between batch samples"

    with extended_attention([unet], V):
        base_on, changed_on = _unet(unet, x, emb), _unet(unet, x2, emb)
    for j in (0, 1):
        assert (base_on[j] - changed_on[j]).abs().max() > 1e-4, f"view {j} did not see view 2"
    # extended attention really changes the result of a joint batch
    assert not torch.allclose(base_on, base_off)


# ------------------------------------------------------------------------------------------------ (b)
def test_guidance_halves_never_mix(models):
    unet, _ = models
    assert not _guidance_groups_mix(unet, ExtendedSelfAttnProcessor(V))


def test_the_guidance_test_catches_a_naive_whole_batch_processor(models):
    unet, _ = models
    assert _guidance_groups_mix(unet, NaiveWholeBatchProcessor())


# ------------------------------------------------------------------------------------------------ (c)
def test_chunked_equals_unchunked(models, monkeypatch):
    unet, _ = models
    x, emb, _ = _inputs(2 * V, seed=2)
    with extended_attention([unet], V):
        full = _unet(unet, x, emb)
    with extended_attention([unet], V, chunk_size=5):  # 5 does not divide V*N: a ragged last chunk
        chunked = _unet(unet, x, emb)
    # automatic chunking kicks in when the scores exceed the budget
    monkeypatch.setattr(extended_module, "AUTO_CHUNK_BUDGET_BYTES", 4096)
    with extended_attention([unet], V):
        auto = _unet(unet, x, emb)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(auto, full, atol=1e-5, rtol=1e-5)


def test_automatic_chunk_rule():
    p = ExtendedSelfAttnProcessor(6)
    n = 6 * 4096  # SD1.5 top level, six views
    # 2 groups x 8 heads x 24576^2 fp16 scores = 19 GiB: split to fit 256 MiB
    chunk = p._query_chunk(2, 8, n, n, torch.float16)
    assert 1 <= chunk < n and 2 * 8 * n * 2 * chunk <= extended_module.AUTO_CHUNK_BUDGET_BYTES
    assert p._query_chunk(2, 8, 64, 64, torch.float32) == 64  # small: one call
    assert ExtendedSelfAttnProcessor(6, chunk_size=100)._query_chunk(2, 8, n, n, torch.float32) == 100


def test_reference_views_restrict_what_is_shared(models):
    unet, _ = models
    x, emb, _ = _inputs(V, seed=3)
    with extended_attention([unet], V, reference_views=[0]):
        base = _unet(unet, x, emb)
        x2 = x.clone()
        x2[2] += 1.0
        changed2 = _unet(unet, x2, emb)
        x0 = x.clone()
        x0[0] += 1.0
        changed0 = _unet(unet, x0, emb)
    assert torch.equal(changed2[1], base[1]), "view 1 saw view 2, which is not a reference view"
    assert (changed0[1] - base[1]).abs().max() > 1e-4, "view 1 did not see reference view 0"


# ------------------------------------------------------------------------------------------------ (d)
def test_single_view_group_equals_default_processor(models):
    unet, _ = models
    x, emb, _ = _inputs(4, seed=4)
    default = _unet(unet, x, emb)
    with extended_attention([unet], 1):
        single = _unet(unet, x, emb)
    torch.testing.assert_close(single, default, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ (e)
def test_controlnet_install_and_exact_restore(models):
    unet, controlnet = models
    x, emb, cond = _inputs(2 * V, seed=5)
    x2 = x.clone()
    x2[V] += 1.0  # cond view 0
    original_procs = dict(controlnet.attn_processors)
    before = _controlnet(controlnet, x, emb, cond)

    previous = install_extended_attention(controlnet, V)
    try:
        assert previous.keys() == original_procs.keys()
        procs = controlnet.attn_processors
        for k, p in procs.items():
            if ".attn1." in k:
                assert isinstance(p, ExtendedSelfAttnProcessor)
            else:
                assert p is original_procs[k]
        on = _controlnet(controlnet, x, emb, cond)
        on2 = _controlnet(controlnet, x2, emb, cond)
    finally:
        restore_attention(controlnet, previous)

    mid, mid2 = on[-1], on2[-1]
    assert (mid[V + 1] - mid2[V + 1]).abs().max() > 1e-5, "cond view 1 did not see cond view 0"
    for j in range(V):  # the uncond half is untouched by a cond change
        assert all(torch.equal(a[j], b[j]) for a, b in zip(on, on2))

    assert all(controlnet.attn_processors[k] is p for k, p in original_procs.items())
    after = _controlnet(controlnet, x, emb, cond)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_context_manager_restores_every_model_after_an_exception(models):
    unet, controlnet = models
    procs = [dict(m.attn_processors) for m in (unet, controlnet)]
    with pytest.raises(RuntimeError, match="boom"):
        with extended_attention([unet, None, controlnet], V):
            assert isinstance(unet.attn_processors[self_attention_keys(unet)[0]], ExtendedSelfAttnProcessor)
            raise RuntimeError("boom")
    for m, before in zip((unet, controlnet), procs):
        assert all(m.attn_processors[k] is p for k, p in before.items())


def test_batch_not_a_multiple_of_views_is_a_clear_error(models):
    unet, _ = models
    x, emb, _ = _inputs(5)
    with extended_attention([unet], V):
        with pytest.raises(ValueError, match="num_views=3"):
            _unet(unet, x, emb)
    with pytest.raises(ValueError, match="reference view"):
        ExtendedSelfAttnProcessor(3, reference_views=[3])


# ------------------------------------------------------------------------------------------------ formula
def test_processor_matches_the_formula_on_one_layer():
    """Att(q_i, K, V) = softmax(q_i K^T / sqrt(d)) V with K, V the group's reference views' keys/values."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    g, v, n = 2, 3, 5
    h = torch.randn(g * v, n, 16)
    refs = [2, 0]
    with torch.no_grad():
        out = ExtendedSelfAttnProcessor(v, reference_views=refs)(attn, h)
        q = attn.to_q(h).view(g, v, n, 2, 8)
        k = attn.to_k(h).view(g, v, n, 2, 8)
        val = attn.to_v(h).view(g, v, n, 2, 8)
        expected = torch.empty(g, v, n, 2, 8)
        for gi in range(g):
            kk = torch.cat([k[gi, j] for j in refs])  # (|S| n, heads, d)
            vv = torch.cat([val[gi, j] for j in refs])
            for i in range(v):
                for head in range(2):
                    s = q[gi, i, :, head] @ kk[:, head].T / 8**0.5
                    expected[gi, i, :, head] = s.softmax(-1) @ vv[:, head]
        expected = attn.to_out[0](expected.reshape(g * v, n, 16))
        # a key-padding mask of zeros (additive) changes nothing
        masked = ExtendedSelfAttnProcessor(v, reference_views=refs)(attn, h, attention_mask=torch.zeros(g * v, 1, n))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, out, atol=1e-6, rtol=1e-6)


def test_calls_with_encoder_states_are_plain_attention():
    """Put on a cross-attention layer by mistake, the processor does ordinary (per-sample) attention."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(1)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    h, enc = torch.randn(6, 5, 16), torch.randn(6, 7, 12)
    with torch.no_grad():
        got = ExtendedSelfAttnProcessor(3)(attn, h, encoder_hidden_states=enc)
        want = AttnProcessor2_0()(attn, h, encoder_hidden_states=enc)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
