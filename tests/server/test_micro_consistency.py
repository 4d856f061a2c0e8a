"""Consistency measured on the shipped `micro` model (a model that has learned something, unlike `tiny`).

Six views of the Barrel fixture, same prompt and seeds, the texture job with each mechanism switched on alone
and together. Cross-view disagreement (MATH.md section 6) of the final views must fall by the ratios below,
which the shipped model meets with margin (figures from `bench/consistency.py` in docs/micro-model.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from concord.consistency_eval import measure, render_fixture_views
from concord.models.registry import offline_status

MESH = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "barrel" / "barrel.glb"

# Measured with bench/consistency.py (20 steps, 3 seeds): UV sync 0.41x of independent, both 0.41x, all 0.41x,
# shared attention alone 1.00x (micro attends only at its 8x8 level, so sharing it moves little). This test runs
# 10 steps and 2 seeds; the bounds leave room for that.
SYNC_RATIO = 0.6
ATTENTION_RATIO = 1.1

pytestmark = pytest.mark.skipif(not offline_status("micro")[0], reason="the micro weights are not installed")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    import torch

    from concord.models.registry import load_model

    threads = torch.get_num_threads()
    model = load_model("micro", "cpu")
    views = render_fixture_views(MESH, 64)
    try:
        return {r["config"]: r for r in measure(model, views, "a red and yellow checker cylinder", seeds=(0, 1),
                                                steps=10, out_dir=tmp_path_factory.mktemp("consistency"))}
    finally:
        torch.set_num_threads(threads)


def test_uv_sync_cuts_disagreement(rows):
    assert rows["UV sync"]["disagreement"] < SYNC_RATIO * rows["independent"]["disagreement"], rows


def test_both_mechanisms_together_cut_disagreement_most(rows):
    assert rows["both"]["disagreement"] < SYNC_RATIO * rows["independent"]["disagreement"], rows
    assert rows["all"]["disagreement"] < SYNC_RATIO * rows["independent"]["disagreement"], rows


def test_shared_attention_alone_does_not_make_views_disagree_more(rows):
    assert rows["shared attention"]["disagreement"] < ATTENTION_RATIO * rows["independent"]["disagreement"], rows


def test_every_configuration_covers_the_visible_surface(rows):
    cover = {r["coverage"] for r in rows.values()}
    assert len(cover) == 1  # same views, same bake: only the colours differ

