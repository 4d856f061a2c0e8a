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

from concord.consistency_eval import CONFIGS, measure, render_fixture_views, views_of
from concord.micro.evaluate import colour_pair_agreement
from concord.models.registry import offline_status

MESH = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "barrel" / "barrel.glb"

# The full prompt names shape, pattern and both colours, so views can disagree only on the pattern's phase.
# Measured with bench/consistency.py (20 steps, 3 seeds): UV sync 0.41x of independent, both 0.40x, all 0.38x,
# shared attention alone 1.00x and grid 1.00x (attention does not find where the phase of one view's pattern sits
# in another's: nothing in micro's training rewards it). This test runs 10 steps and 2 seeds; the bounds leave room
# for that.
SYNC_RATIO = 0.6
ATTENTION_RATIO = 1.1
GRID_RATIO = 1.1

pytestmark = pytest.mark.skipif(not offline_status("micro")[0], reason="the micro weights are not installed")


SEEDS = (0, 1)
OPEN_PROMPT = "a checker cylinder"
# The open prompt (measured, 10 steps, seeds 0/1): disagreement independent 0.262/0.271, shared attention alone
# 0.197/0.261 (0.75x/0.96x; 0.86x of the mean); views agreeing on their colour pair 1.00/0.83 with shared attention,
# 0.17/0.33 independent. bench/consistency.py --open (20 steps, 3 seeds): 0.80x, agreement 0.67/1.00/1.00.
OPEN_ATTENTION_RATIO = 0.95  # of the mean over seeds; every seed must also fall below independent
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


def _measure(model, views, prompt, out_dir, configs=None):
    import torch

    threads = torch.get_num_threads()
    try:
        return {r["config"]: r for r in measure(model, views, prompt, seeds=SEEDS, steps=10, out_dir=out_dir,
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
                    {k: CONFIGS[k] for k in ("independent", "shared attention")})


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


def test_grid_alone_does_not_make_views_disagree_more(rows):
    assert rows["grid"]["disagreement"] < GRID_RATIO * rows["independent"]["disagreement"], rows


# Each mechanism must act: switched on over a configuration without it (same seed, same everything else), it
# changes the generated views (an ignored switch gives bit-identical views). Measured, 10 steps, seeds 0/1, share of
# pixels changed (mean |difference|, 0..255): shared attention over independent 0.41/0.35 (1.6/0.9), UV sync over
# independent 0.66/0.67 (8.5/9.0), shared attention over UV sync 0.41/0.32 (1.6/0.8), UV noise over both 0.84/0.86
# (17.8/19.2).
ADDED = [
    ("shared attention", "independent"),  # shared attention alone
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


def test_shared_attention_makes_views_agree_on_what_the_prompt_leaves_open(open_rows, out_dir, fixture_views):
    assert open_rows["shared attention"]["disagreement"] < OPEN_ATTENTION_RATIO * open_rows["independent"]["disagreement"]
    for shared, alone in zip(open_rows["shared attention"]["per_seed"], open_rows["independent"]["per_seed"]):
        assert shared < alone, open_rows
    mask = fixture_views.depth > 0
    for seed in SEEDS:
        shared = colour_pair_agreement(views_of(out_dir / "open", "shared attention", seed), mask)
        alone = colour_pair_agreement(views_of(out_dir / "open", "independent", seed), mask)
        print(f"seed {seed}: views agreeing on the colour pair: shared attention {shared:.2f}, independent {alone:.2f}")
        assert shared >= OPEN_AGREEMENT and shared > alone, (seed, shared, alone)
