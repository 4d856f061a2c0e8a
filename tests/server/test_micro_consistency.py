"""Consistency measured on the shipped `micro` model (a model that has learned something, unlike `tiny`).

Six views of the Barrel fixture, same prompt and seeds, the texture job with each mechanism switched on alone
and together. Cross-view disagreement (MATH.md section 6) of the final views must fall by the ratios below, for
every seed, which the shipped model meets with margin (figures from `bench/consistency.py` in docs/micro-model.md);
and each mechanism, switched on over a configuration without it, must change the views.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from concord.consistency_eval import CONFIGS, CORRESPONDENCE, measure, render_fixture_views, views_of
from concord.micro.evaluate import colour_pair_agreement
from concord.models.registry import offline_status

MESH = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "barrel" / "barrel.glb"

# The full prompt names shape, pattern and both colours, so views can disagree only on the pattern's phase.
# Measured with bench/consistency.py (20 steps, 3 seeds; docs/micro-model.md): UV sync and both/all well under
# half of independent; plain shared attention alone and grid ~1.00x (from features alone, attention does not find
# where the phase of one view's pattern sits in another's); correspondence-weighted shared attention (micro's
# recommended strength 8, which tells attention where each spot sits) 0.76x. This test runs 10 steps and 2 seeds;
# the bounds leave room for that.
SYNC_RATIO = 0.6
ATTENTION_RATIO = 1.1
GRID_RATIO = 1.1
CORRESPONDENCE_RATIO = 0.9

pytestmark = pytest.mark.skipif(not offline_status("micro")[0], reason="the micro weights are not installed")


SEEDS = (0, 1)
OPEN_PROMPT = "a checker cylinder"
# The open prompt runs at micro's recommended 20 steps: at 10, plain shared attention's colour agreement is not yet
# settled (measured, seeds 0/1: 1.00/0.33). Measured, 20 steps, seeds 0/1: disagreement independent 0.314/0.303,
# plain shared attention 0.313/0.283 (0.97x of the mean) with views agreeing on their colour pair 1.00/1.00
# (independent 0.33/0.33), correspondence-weighted 0.173/0.172 (0.56x).
OPEN_STEPS = 20
OPEN_CORRESPONDENCE_RATIO = 0.75  # of the mean over seeds; every seed must also fall below OPEN_SEED_RATIO
OPEN_SEED_RATIO = 0.85
OPEN_AGREEMENT = 0.66  # at least 4 of the 6 views share one colour pair


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("consistency")


@pytest.fixture(scope="module")
def model():
    from concord.models.registry import load_model

    return load_model("micro", "cpu")


@pytest.fixture(scope="module")
def fixture_views():
    return render_fixture_views(MESH, 64)


def _measure(model, views, prompt, out_dir, configs=None, steps=10):
    import torch

    threads = torch.get_num_threads()
    try:
        return {r["config"]: r for r in measure(model, views, prompt, seeds=SEEDS, steps=steps, out_dir=out_dir,
                                                configs=configs)}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows(model, fixture_views, out_dir):
    return _measure(model, fixture_views, "a red and yellow checker cylinder", out_dir)


@pytest.fixture(scope="module")
def open_rows(model, fixture_views, out_dir):
    """The open prompt: shape and pattern named, colours left to the model (`concord.micro.data.open_prompt`)."""
    return _measure(model, fixture_views, OPEN_PROMPT, out_dir / "open",
                    {k: CONFIGS[k] for k in ("independent", "shared attention", "correspondence")}, OPEN_STEPS)


def test_uv_sync_cuts_disagreement(rows):
    assert rows["UV sync"]["disagreement"] < SYNC_RATIO * rows["independent"]["disagreement"], rows
    # not only on average: for every seed
    for synced, alone in zip(rows["UV sync"]["per_seed"], rows["independent"]["per_seed"]):
        assert synced < SYNC_RATIO * alone, rows


def test_both_mechanisms_together_cut_disagreement_most(rows):
    for config in ("both", "all"):
        assert rows[config]["disagreement"] < SYNC_RATIO * rows["independent"]["disagreement"], rows
        for joint, alone in zip(rows[config]["per_seed"], rows["independent"]["per_seed"]):
            assert joint < SYNC_RATIO * alone, (config, rows)


def test_shared_attention_alone_does_not_make_views_disagree_more(rows):
    assert rows["shared attention"]["disagreement"] < ATTENTION_RATIO * rows["independent"]["disagreement"], rows


def test_correspondence_weighted_attention_aligns_the_pattern_the_prompt_names(rows):
    """With the full prompt only the pattern's phase is left to disagree on; correspondence weighting tells each
    view's attention where its spots sit in the other views, and the views align."""
    assert CONFIGS["correspondence"]["attention_correspondence"] == CORRESPONDENCE
    assert rows["correspondence"]["disagreement"] < CORRESPONDENCE_RATIO * rows["independent"]["disagreement"], rows
    for weighted, plain in zip(rows["correspondence"]["per_seed"], rows["shared attention"]["per_seed"]):
        assert weighted < plain, rows


def test_grid_alone_does_not_make_views_disagree_more(rows):
    assert rows["grid"]["disagreement"] < GRID_RATIO * rows["independent"]["disagreement"], rows


# Each mechanism must act: switched on over a configuration without it (same seed, same everything else), it
# changes the generated views (an ignored switch gives bit-identical views). Measured, 10 steps, seeds 0/1, share of
# pixels changed (mean |difference|, 0..255): shared attention over independent 0.41/0.35 (1.6/0.9), UV sync over
# independent 0.66/0.67 (8.5/9.0), shared attention over UV sync 0.41/0.32 (1.6/0.8), UV noise over both 0.84/0.86
# (17.8/19.2).
ADDED = [
    ("shared attention", "independent"),  # shared attention alone
    ("correspondence", "shared attention"),  # correspondence weighting on top of plain shared attention
    ("UV sync", "independent"),  # UV sync alone
    ("both", "UV sync"),  # shared attention on top of UV sync
    ("all", "both"),  # UV noise on top of both
    ("grid", "independent"),  # grid stacking alone (one canvas per guidance half)
]


@pytest.mark.parametrize("config,without", ADDED)
def test_every_mechanism_changes_the_views(rows, out_dir, config, without):
    for seed in SEEDS:
        on, off = views_of(out_dir, config, seed), views_of(out_dir, without, seed)
        assert on.shape == off.shape == (6, 64, 64, 3)
        diff = np.abs(on.astype(np.int16) - off.astype(np.int16))
        print(f"{config} vs {without}, seed {seed}: mean |diff| {diff.mean():.2f}, "
              f"pixels changed {(diff > 0).mean():.3f}")
        # on the object in every view, not a stray pixel: >= 1 % of each view's pixels change
        assert ((diff > 0).any(-1).reshape(6, -1).mean(1) >= 0.01).all(), (config, without, seed)


# What shared attention is for: views agreeing on what the prompt leaves open. With "a checker cylinder" the
# colours are the model's choice; generated independently, each view picks its own pair, and with shared attention
# (micro's second training stage read other views on open prompts, docs/micro-model.md) the six views settle on one.


def test_shared_attention_makes_views_agree_on_the_colours_the_prompt_leaves_open(open_rows, out_dir, fixture_views):
    assert open_rows["shared attention"]["disagreement"] < ATTENTION_RATIO * open_rows["independent"]["disagreement"]
    mask = fixture_views.depth > 0
    for seed in SEEDS:
        shared = colour_pair_agreement(views_of(out_dir / "open", "shared attention", seed), mask)
        alone = colour_pair_agreement(views_of(out_dir / "open", "independent", seed), mask)
        print(f"seed {seed}: views agreeing on the colour pair: shared attention {shared:.2f}, independent {alone:.2f}")
        assert shared >= OPEN_AGREEMENT and shared > alone, (seed, shared, alone)


def test_correspondence_weighted_attention_makes_views_agree_where_the_prompt_leaves_them_free(open_rows):
    """What the recommended setting does with an open prompt: the views agree on colours and on where the pattern
    sits, far more than plain shared attention makes them."""
    ind, weighted = open_rows["independent"], open_rows["correspondence"]
    assert weighted["disagreement"] < OPEN_CORRESPONDENCE_RATIO * ind["disagreement"], open_rows
    for w, alone in zip(weighted["per_seed"], ind["per_seed"]):
        assert w < OPEN_SEED_RATIO * alone, open_rows
    assert weighted["disagreement"] < open_rows["shared attention"]["disagreement"], open_rows
