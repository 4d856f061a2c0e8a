"""The micro model: procedural data, tokenizer, model sizes, pipeline (save/load, sizes, cancel), training resume,
the evaluation's metrics on ground truth and noise, and -- when the trained weights are shipped -- their quality."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from concord.micro import data as D
from concord.micro.data import BACKGROUND, COLOURS, COLOUR_NAMES, generate_batch, parse_prompt
from concord.micro.evaluate import TARGETS, colour_votes, evaluate, score, train_pattern_classifier
from concord.micro.model import (
    CONDITIONING_CHANNELS,
    DEFAULT_WEIGHTS,
    MicroDenoiser,
    MicroPipeline,
    build_components,
    build_pipeline,
    build_tokenizer,
    count_parameters,
    micro_codec,
    micro_conditioning,
    micro_parts,
    tokenize,
)
from tests.harness import one_torch_thread


_one_thread = one_torch_thread()


# --------------------------------------------------------------------------------------------------------------
# Data


def test_generator_is_reproducible_and_splits_differ():
    a = generate_batch(6, seed=3, index=2)
    b = generate_batch(6, seed=3, index=2)
    assert a.prompts == b.prompts
    for k in ("images", "depth", "coords"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    c = generate_batch(6, seed=3, index=2, split="eval")
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.images, generate_batch(6, seed=3, index=3).images)


def test_generator_shapes_and_contract():
    b = generate_batch(8, seed=0, index=0, height=48, width=80)
    assert b.images.shape == (8, 48, 80, 3) and b.images.dtype == np.float32
    assert b.depth.shape == (8, 48, 80) and b.depth.dtype == np.float32
    assert b.coords.shape == (8, 48, 80, 3)
    assert (b.depth >= 0).all()
    np.testing.assert_array_equal(b.mask, b.depth > 0)
    assert b.mask.any(axis=(1, 2)).all(), "every sample shows its object"
    assert (~b.mask).any(axis=(1, 2)).all(), "and some background"
    fg = b.depth[b.mask]
    assert fg.min() > 1.5 and fg.max() < 5.0  # object ~3.3 units away
    assert np.abs(b.coords[b.mask]).max() <= 1.0 + 1e-3  # object coordinates in the unit ball


def test_background_untouched_and_prompts_match_paint():
    b = generate_batch(48, seed=1, index=0, split="test")
    bg = ~b.mask
    assert (b.images[bg] == BACKGROUND).all()
    palette = {i: np.array(COLOURS[c], np.float32) / 255.0 for i, c in enumerate(COLOUR_NAMES)}
    for i, (prompt, spec) in enumerate(zip(b.prompts, b.specs)):
        shape, pattern, c1, c2 = parse_prompt(prompt)
        assert (shape, pattern, c1, c2) == (spec.shape, spec.pattern, spec.colour1, spec.colour2)
        fg = b.images[i][b.mask[i]]
        used = {k for k, col in palette.items() if (np.abs(fg - col).max(1) == 0).any()}
        # every object pixel is exactly one of the prompt's colours
        allowed = [palette[c1]] + ([palette[c2]] if c2 >= 0 else [])
        exact = np.zeros(len(fg), bool)
        for col in allowed:
            exact |= (fg == col).all(1)
        assert exact.all(), prompt
        # and the paint shows the pattern: one colour when plain, both otherwise (on this seed's 35 two-colour
        # samples the rarer colour covers >= 6 % of the object)
        assert used == ({c1} if pattern == "plain" else {c1, c2}), prompt
        if pattern == "dots":  # balls of radius 0.22 on a 0.55 lattice fill ~27 % of space: the ground colour dominates
            assert (fg == palette[c1]).all(1).mean() > 0.5, prompt


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and model


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(16)
    ids = tokenize(tok, ["a red and white stripes torus", "A Blue, sphere!", "", "a mauve sphere"])
    assert ids.shape == (4, 16)
    words = tok.convert_ids_to_tokens(ids[0].tolist())
    assert words[:8] == ["<|startoftext|>", "a", "red", "and", "white", "stripes", "torus", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens(ids[1, :4].tolist()) == ["<|startoftext|>", "a", "blue", "sphere"]
    assert tok.unk_token_id in ids[3].tolist()
    tok.save_pretrained(tmp_path)
    tok2 = type(tok).from_pretrained(tmp_path)
    assert torch.equal(tokenize(tok2, ["a red and white stripes torus", "a mauve sphere"]), ids[[0, 3]])
    assert tok2.model_max_length == 16
    assert set(D.VOCABULARY) <= set(tok2.get_vocab())


def test_model_sizes():
    comps = build_components("micro")
    unet, text = comps["unet"], comps["text_encoder"]
    n = count_parameters(unet) + count_parameters(text)
    assert 2.5e6 <= n <= 4.0e6, n
    assert unet.config.in_channels == 12 + CONDITIONING_CHANNELS and unet.config.out_channels == 12
    assert comps["scheduler"].config.prediction_type == "v_prediction"
    assert comps["scheduler"].config.beta_schedule == "squaredcos_cap_v2"


def test_codec_and_conditioning():
    codec = micro_codec()
    img = torch.rand(2, 3, 64, 48)
    z = codec.encode(img)
    assert z.shape == (2, 12, 32, 24)
    torch.testing.assert_close(codec.decode(z), img, rtol=0, atol=1e-6)
    b = generate_batch(2, seed=0, index=0, height=64, width=48)
    c = micro_conditioning(b.depth)
    assert c.shape == (2, 4, 32, 24)
    bg = torch.nn.functional.pixel_unshuffle(torch.from_numpy(~b.mask)[:, None].float(), 2) > 0.5
    assert (c[bg] == -1).all() and (c[~bg] >= 0.1 * 2 - 1 - 1e-6).all()
    # the sampler's path (depth-control map -> MicroDenoiser.prepare_control) gives the same tensor
    from concord.pipelines.depth_image import depth_to_control

    control = torch.from_numpy(np.stack([depth_to_control(d) for d in b.depth]))[:, None]
    den = MicroDenoiser(build_components("test")["unet"])
    torch.testing.assert_close(den.prepare_control(control, (32, 24)), c, rtol=0, atol=0)


@pytest.fixture(scope="module")
def test_pipe():
    return build_pipeline("test", seed=0)


def _weights(pipe):
    return {f"{n}.{k}": v for n in ("unet", "text_encoder") for k, v in getattr(pipe, n).state_dict().items()}


def test_pipeline_save_load_round_trip(tmp_path, test_pipe):
    test_pipe.save_pretrained(tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").rglob("*.safetensors"))
    assert files == ["diffusion_pytorch_model.safetensors", "model.safetensors"]
    p1 = MicroPipeline.from_pretrained(tmp_path / "a")
    assert p1.unet.dtype == torch.float32
    for k, v in _weights(test_pipe).items():  # what was saved is the fp16 rounding of the model
        torch.testing.assert_close(_weights(p1)[k], v.half().float(), rtol=0, atol=0)
    p1.save_pretrained(tmp_path / "b")
    p2 = MicroPipeline.from_pretrained(tmp_path / "b")
    for k, v in _weights(p1).items():
        assert torch.equal(v, _weights(p2)[k]), k
    b = generate_batch(2, seed=0, index=0)
    kw = dict(prompt=b.prompts, depth=b.depth, num_inference_steps=2)
    o1 = p1(generator=torch.Generator().manual_seed(0), **kw).images
    o2 = p2(generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(o1, o2)
    assert test_pipe.unet.dtype == torch.float32  # saving did not touch the in-memory model


def test_pipeline_sizes_image_input_and_guidance(test_pipe):
    for h, w in ((64, 64), (96, 64)):
        b = generate_batch(1, seed=0, index=0, height=h, width=w)
        out = test_pipe(b.prompts[0], depth=b.depth[0], num_inference_steps=2, generator=torch.Generator().manual_seed(1))
        assert out.images.shape == (1, h, w, 3)
        assert out.images.min() >= 0 and out.images.max() <= 1
    # a depth-control picture (what the ControlNet path hands over) works too, and matches the depth up to 8 bits
    from PIL import Image

    from concord.pipelines.depth_image import depth_to_control

    b = generate_batch(1, seed=0, index=0)
    img = Image.fromarray((depth_to_control(b.depth[0]) * 255 + 0.5).astype(np.uint8)).convert("RGB")
    kw = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np")
    a = test_pipe("a red sphere", image=img, generator=torch.Generator().manual_seed(2), height=64, width=64, **kw).images
    d = test_pipe("a red sphere", depth=b.depth[0], generator=torch.Generator().manual_seed(2), **kw).images
    assert np.abs(a - d).max() < 0.05
    with pytest.raises(ValueError):
        test_pipe("x", depth=np.ones((60, 60), np.float32), num_inference_steps=1)
    with pytest.raises(ValueError):
        test_pipe("x", num_inference_steps=1)


def test_pipeline_cancel_within_one_step(test_pipe):
    calls = []
    hook = test_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    seen = []

    def cb(pipe, i, t, kwargs):
        seen.append(i)
        if i == 1:
            pipe._interrupt = True
        return kwargs

    try:
        b = generate_batch(1, seed=0, index=0)
        out = test_pipe(b.prompts, depth=b.depth, num_inference_steps=6, callback_on_step_end=cb)
    finally:
        hook.remove()
    assert seen == [0, 1] and len(calls) == 2
    assert out.images.shape == (1, 64, 64, 3)
    # the next call starts clean: every one of its steps runs (one batched model call per step)
    calls.clear()
    hook = test_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = test_pipe(b.prompts, depth=b.depth, num_inference_steps=2)
    finally:
        hook.remove()
    assert len(calls) == 2 and out.images.shape == (1, 64, 64, 3)


def test_micro_parts_for_the_texture_sampler(test_pipe):
    parts = micro_parts(test_pipe)
    assert parts.denoiser.prediction_type == "v_prediction" and parts.codec.scale_factor == 2
    emb = parts.text_embeddings("a red sphere", "")
    assert emb.shape[0] == 2
    b = generate_batch(2, seed=0, index=0)
    from concord.pipelines.depth_image import depth_to_control

    control = torch.from_numpy(np.stack([depth_to_control(d) for d in b.depth]))[:, None]
    c = parts.denoiser.prepare_control(control, (32, 32))
    x = torch.randn(2, 12, 32, 32)
    out = parts.denoiser.predict(x, torch.tensor(500), emb[1:].repeat(2, 1, 1), c)
    assert out.shape == (2, 12, 32, 32)


# --------------------------------------------------------------------------------------------------------------
# Training


def _read_log(path):
    with open(path) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_training_runs_checkpoints_and_resumes_exactly(tmp_path):
    from concord.micro.train import CHECKPOINT, LOSS_LOG, MODEL_DIR, TrainConfig, TrainError, train

    common = dict(preset="test", batch=2, size=32, log_every=1, warmup_steps=2, seed=5, minutes=5, threads=0)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), steps=3, **common), progress=False)
    assert whole["steps"] == 3
    train(TrainConfig(out=str(tmp_path / "split"), steps=2, **common), progress=False)
    assert (tmp_path / "split" / CHECKPOINT).exists()
    with pytest.raises(TrainError):  # an existing run is not overwritten without --resume
        train(TrainConfig(out=str(tmp_path / "split"), steps=3, **common), progress=False)
    train(TrainConfig(out=str(tmp_path / "split"), steps=3, resume=True, **common), progress=False)
    a, b = _read_log(tmp_path / "whole" / LOSS_LOG), _read_log(tmp_path / "split" / LOSS_LOG)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert a == b, (a, b)  # the step after the resume has exactly the loss it would have had
    pa = MicroPipeline.from_pretrained(tmp_path / "whole" / MODEL_DIR)
    pb = MicroPipeline.from_pretrained(tmp_path / "split" / MODEL_DIR)
    for k, v in _weights(pa).items():
        assert torch.equal(v, _weights(pb)[k]), k
    assert (tmp_path / "whole" / MODEL_DIR / "training.json").exists()


def test_cli_entry_points(tmp_path):
    import argparse

    from concord.micro.train import add_arguments, main_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "r"), "--steps", "1", "--preset", "test", "--batch", "2", "--no-progress", "--threads", "0"])
    assert main_from_args(args) == 0
    assert main_from_args(args) == 2  # exists, no --resume: one-line error, exit 2


# --------------------------------------------------------------------------------------------------------------
# Evaluation


@pytest.fixture(scope="module")
def small_classifier():
    return train_pattern_classifier(n_train=384, steps=300, seed=0)


class _GroundTruthPipeline:
    """Answers every request with the generator's own image for that depth map: a perfect model."""

    def __init__(self, seed, n, batch_size):
        self.by_depth = {}
        for i, start in enumerate(range(0, n, batch_size)):
            b = generate_batch(min(batch_size, n - start), seed, index=i, split="eval")
            for d, img in zip(b.depth, b.images):
                self.by_depth[d.tobytes()] = img

    def __call__(self, prompt, depth, **kw):
        class Out:
            images = np.stack([self.by_depth[d.tobytes()] for d in depth])

        return Out()


def test_evaluate_on_ground_truth(small_classifier):
    n, bs = 48, 16
    res = evaluate(_GroundTruthPipeline(7, n, bs), n_samples=n, seed=7, batch_size=bs, classifier=small_classifier)
    assert res["plain_colour_accuracy"] == 1.0
    assert res["pair_colour_accuracy"] >= 0.95
    assert res["background_fidelity"] == 1.0
    assert res["pattern_accuracy"] >= 0.8
    assert small_classifier.holdout_accuracy >= 0.8


def test_score_on_noise_is_low(small_classifier):
    b = generate_batch(48, seed=8, index=0, split="eval")
    noise = np.random.default_rng(0).random(b.images.shape).astype(np.float32)
    res = score(b, noise, small_classifier)
    assert res["plain_colour_accuracy"] < 0.4 and res["pair_colour_accuracy"] < 0.3
    assert res["background_fidelity"] < 0.05
    assert not any(res["passed"].values())
    # a flat grey picture keeps the background but names no colour
    grey = np.broadcast_to(BACKGROUND, b.images.shape).copy()
    res = score(b, grey, small_classifier)
    assert res["background_fidelity"] == 1.0
    assert colour_votes(grey, b.mask).sum() == 0


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_WEIGHTS / "model_index.json").exists(), reason="micro weights not shipped yet")
def test_shipped_micro_model_meets_targets():
    from concord.micro.model import load_micro

    pipe = load_micro()
    clf = train_pattern_classifier(n_train=768, steps=400, seed=0)
    res = evaluate(pipe, n_samples=48, seed=4321, steps=20, batch_size=16, classifier=clf)
    # a 48-sample estimate: targets with a margin for sampling error (the bench measures 200+ samples)
    assert res["plain_colour_accuracy"] >= TARGETS["plain_colour_accuracy"] - 0.1, res
    assert res["pair_colour_accuracy"] >= TARGETS["pair_colour_accuracy"] - 0.1, res
    # background: the target itself, no margin -- the shipped model's pixel head reaches 0.999 on 600 samples
    # (bench/results/micro_eval*.json); the same UNet without it (0.984-0.985) fails this bound
    assert res["background_fidelity"] >= TARGETS["background_fidelity"], res
    assert pipe.head is not None
    assert res["pattern_accuracy"] >= TARGETS["pattern_accuracy"] - 0.1, res


@pytest.mark.skipif(not (DEFAULT_WEIGHTS / "model_index.json").exists(), reason="micro weights not shipped yet")
def test_shipped_micro_weights_are_small_and_their_training_is_on_record():
    """The consistency issue's limits on the shipped model: at most 10 MB on disk; its training.json records every
    stage with the seed and command that reproduce it, and a total that is the stages' sum (the model card quotes
    it; it is not asserted under the two-hour budget, which the shipped model misses: docs/micro-model.md)."""
    import json

    size = sum(f.stat().st_size for f in DEFAULT_WEIGHTS.rglob("*") if f.is_file())
    assert size <= 10 * 1024 * 1024, size
    record = json.loads((DEFAULT_WEIGHTS / "training.json").read_text())
    stages = record["stages"]
    assert stages and all(isinstance(st["seed"], int) and "concord train-micro" in st["command"] for st in stages)
    assert record["train_minutes_total"] == pytest.approx(sum(st["train_minutes"] for st in stages), abs=0.01)


def test_micro_joins_the_multiview_texture_sampler(tiny_model, test_pipe, tmp_path):
    """ARCHITECTURE rule 7: the micro model runs through the texture job's sampler unchanged (grid, shared
    attention, UV sync) via `micro_parts`."""
    import threading
    from pathlib import Path

    from concord.api.schemas import TextureParams
    from concord.geometry.mesh import load_mesh
    from concord.geometry.render import render_views
    from concord.geometry.rigs import parse_rig
    from concord.jobs.context import JobContext
    from concord.pipelines import texture as T

    box = Path(__file__).resolve().parents[1] / "fixtures" / "meshes" / "boxtextured" / "BoxTextured.glb"
    mesh = load_mesh(box, unwrap="always")
    c, r = mesh.bounding_sphere()
    cams = parse_rig("zero123pp").with_frame(mesh.up, mesh.front).cameras(c, r, 64, 64)
    arrays = render_views(mesh, [(k.K, k.world_to_camera) for k in cams], 64, 64).validate().to_npz_dict()
    p = TextureParams.model_validate(
        {"prompt": "a red and white checker box", "steps": 2, "seed": 1, "texture_size": 128, "guidance": 3.0,
         "consistency": {"grid": True, "uv_sync": True}}
    )
    out = tmp_path / "job"
    out.mkdir()
    shapes = []
    hook = test_pipe.unet.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        ctx = JobContext(out, lambda *a: None, threading.Event())
        m = T.run(tiny_model, p, arrays, ctx, parts=micro_parts(test_pipe))
    finally:
        hook.remove()
    assert m["prediction_type"] == "v_prediction"
    # micro's own UNet denoises the 3 x 2 grid of 32x32 pixel-unshuffled views (12 channels + 4 of depth), one
    # canvas per guidance half, once per step; UV sync ran on every step
    assert shapes == [(2, 16, 96, 64)] * 2
    assert m["grid"] == [3, 2] and m["synced_steps"] == 2
    assert sorted(p.name for p in (out / "views").glob("*.png")) == [f"view_{k:02d}.png" for k in range(6)]


# --------------------------------------------------------------------------------------------------------------
# Multi-view training (docs/micro-model.md, "Training"): view sets, growing a trained model, exact resume


def test_view_sets_are_one_object_seen_from_around_it():
    from concord.geometry.rigs import ZERO123PP_AZIMUTHS, ZERO123PP_ELEVATIONS
    from concord.micro.data import RIG_AZIMUTHS, RIG_ELEVATIONS, generate_view_sets

    assert RIG_AZIMUTHS == ZERO123PP_AZIMUTHS and RIG_ELEVATIONS == ZERO123PP_ELEVATIONS
    b = generate_view_sets(3, 6, seed=1, index=2, height=32, width=32)
    again = generate_view_sets(3, 6, seed=1, index=2, height=32, width=32)
    assert np.array_equal(b.images, again.images)
    assert not np.array_equal(b.images, generate_view_sets(3, 6, seed=1, index=3, height=32, width=32).images)
    assert b.images.shape == (18, 32, 32, 3)
    for s in range(3):
        views = range(6 * s, 6 * s + 6)
        assert len({b.prompts[i] for i in views}) == 1  # one object: one prompt
        specs = [b.specs[i] for i in views]
        assert len({(sp.shape, sp.params, sp.colour1, sp.colour2, tuple(sp.phase)) for sp in specs}) == 1
        assert all((b.depth[i] > 0).any() for i in views)
        # the camera moves: no two views of a set share a pose
        assert all(not np.allclose(b.specs[i].rotation, b.specs[j].rotation) for i in views for j in views if i < j)
        # and the paint sticks to the object: each view's pixels are the paint at their object coordinates
        for i in views:
            fg = b.mask[i]
            assert np.array_equal(b.images[i][fg], D._PALETTE[D._paint(b.specs[i], b.coords[i][fg].astype(np.float64))])


def _v1_test_model(folder):
    """A small model of the first shipped architecture (attention at 8x8 only), saved like a trained one."""
    from concord.micro.model import PRESET_CONFIGS, MicroConfig

    v1 = MicroConfig(**{**PRESET_CONFIGS["test"].__dict__, "down_block_types": PRESET_CONFIGS["micro-v1"].down_block_types})
    pipe = build_pipeline(v1, seed=3)
    pipe.save_pretrained(folder)
    return MicroPipeline.from_pretrained(folder)


def test_warm_start_grows_a_trained_model_without_changing_what_it_computes(tmp_path):
    from concord.micro.train import _warm_start

    old = _v1_test_model(tmp_path / "v1")
    comps = build_components("test", seed=0)
    _warm_start(comps, tmp_path / "v1")
    new_keys = set(comps["unet"].state_dict()) - set(old.unet.state_dict())
    assert any(".attentions." in k for k in new_keys)  # the grown model has attention blocks the old one lacks
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    ids = tokenize(old.tokenizer, ["a red sphere", "a blue and white dots box"])
    with torch.no_grad():
        a = old.unet(x, t, encoder_hidden_states=old.text_encoder(ids)[0]).sample
        b = comps["unet"](x, t, encoder_hidden_states=comps["text_encoder"](ids)[0]).sample
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_multiview_training_from_a_grown_model_resumes_exactly(tmp_path):
    from concord.micro.train import LOSS_LOG, TrainConfig, TrainError, _self_correct_at, train

    _v1_test_model(tmp_path / "v1")
    common = dict(preset="test", batch=6, size=32, log_every=1, warmup_steps=2, seed=2, minutes=5, threads=0,
                  views=3, single_share=0.5, init_from=str(tmp_path / "v1"), open_share=0.5, set_timesteps="shared",
                  edge_weight=4.0, correspondence=(0.0, 4.0), self_correct=0.5)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), steps=4, **common), progress=False)
    assert whole["views"] == 3 and whole["init_from"] == str(tmp_path / "v1") and whole["open_share"] == 0.5
    assert whole["set_timesteps"] == "shared" and whole["edge_weight"] == 4.0 and whole["correspondence"] == [0.0, 4.0]
    assert "--open-prompts 0.5" in whole["command"] and "--set-timesteps shared --edge-weight 4" in whole["command"]
    assert "--correspondence 0,4" in whole["command"] and "--self-correct 0.5" in whole["command"]
    assert whole["self_correct"] == 0.5
    assert {_self_correct_at(TrainConfig(out="x", **common), k) for k in range(4)} == {True, False}  # both kinds run
    train(TrainConfig(out=str(tmp_path / "split"), steps=2, **common), progress=False)
    with pytest.raises(TrainError, match="resume with the same values"):
        train(TrainConfig(out=str(tmp_path / "split"), steps=4, resume=True, **{**common, "views": 2}), progress=False)
    with pytest.raises(TrainError, match="open_share=0.5"):
        train(TrainConfig(out=str(tmp_path / "split"), steps=4, resume=True, **{**common, "open_share": 0.0}), progress=False)
    with pytest.raises(TrainError, match="edge_weight=4.0"):
        train(TrainConfig(out=str(tmp_path / "split"), steps=4, resume=True, **{**common, "edge_weight": 1.0}), progress=False)
    with pytest.raises(TrainError, match="correspondence"):
        train(TrainConfig(out=str(tmp_path / "split"), steps=4, resume=True, **{**common, "correspondence": ()}), progress=False)
    with pytest.raises(TrainError, match="self_correct=0.5"):
        train(TrainConfig(out=str(tmp_path / "split"), steps=4, resume=True, **{**common, "self_correct": 0.0}), progress=False)
    train(TrainConfig(out=str(tmp_path / "split"), steps=4, resume=True, **common), progress=False)
    assert _read_log(tmp_path / "whole" / LOSS_LOG) == _read_log(tmp_path / "split" / LOSS_LOG)


def test_training_only_the_attention_blocks_leaves_everything_else_as_it_was(tmp_path):
    from concord.micro.train import MODEL_DIR, TrainConfig, train

    _v1_test_model(tmp_path / "v1")
    grown = build_components("test", seed=0)
    from concord.micro.train import _warm_start

    _warm_start(grown, tmp_path / "v1")
    train(TrainConfig(out=str(tmp_path / "run"), steps=2, preset="test", batch=4, size=32, warmup_steps=1, lr=1e-2,
                      seed=1, minutes=5, threads=0, views=2, single_share=0.0, init_from=str(tmp_path / "v1"),
                      train_only="attention"), progress=False)
    after = MicroPipeline.from_pretrained(tmp_path / "run" / MODEL_DIR)
    before = {k: v.half().float() for k, v in grown["unet"].state_dict().items()}  # saved in fp16
    changed = {k for k, v in after.unet.state_dict().items() if not torch.equal(v.float(), before[k])}
    assert changed and all(".attentions." in k for k in changed)
    old_text = {k: v.half().float() for k, v in grown["text_encoder"].state_dict().items()}
    assert all(torch.equal(v.float(), old_text[k]) for k, v in after.text_encoder.state_dict().items())


def test_open_prompts_name_no_colour_and_a_set_shares_one_prompt():
    from concord.micro.data import generate_view_sets, open_prompt, prompt_for
    from concord.micro.train import TrainConfig, _step_prompts

    b = generate_view_sets(4, 3, seed=5, index=0, split="test")
    tok = build_tokenizer(16)
    for spec in b.specs:
        text = open_prompt(spec)
        assert not set(text.split()) & set(COLOUR_NAMES), text
        assert parse_prompt(text) == (spec.shape, spec.pattern, -1, -1)
        assert parse_prompt(spec.prompt) == (spec.shape, spec.pattern, spec.colour1, spec.colour2)
        assert tok.unk_token_id not in tokenize(tok, [text])[0].tolist()  # every word is in the vocabulary
    assert prompt_for("sphere", "plain", -1) == "a sphere" and prompt_for("box", "dots", -1) == "a dots box"

    def prompts(share, step=0, drop=0.0):
        return _step_prompts(TrainConfig(out="-", open_share=share, text_drop=drop, seed=3), step, b, 3)

    assert prompts(0.0) == b.prompts
    assert prompts(1.0) == [open_prompt(s) for s in b.specs]
    # a share: drawn per object (the 3 views of a set share one prompt), the same on every call for the same step
    seen = set()
    for step in range(20):
        ps = prompts(0.5, step, drop=0.3)
        assert ps == prompts(0.5, step, drop=0.3)
        for obj in range(4):
            group = ps[obj * 3:(obj + 1) * 3]
            assert len(set(group)) == 1
            full = b.prompts[obj * 3]
            kind = "dropped" if group[0] == "" else "full" if group[0] == full else "open"
            assert kind != "open" or group[0] == open_prompt(b.specs[obj * 3])
            seen.add(kind)
    assert seen == {"dropped", "full", "open"}


def test_a_view_set_trains_at_one_noise_level_when_asked():
    from concord.micro.train import _step_timesteps

    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    shared = _step_timesteps(gen(), 12, 3, True, 1000)
    assert shared.shape == (12,) and all(len(set(shared[i:i + 3].tolist())) == 1 for i in range(0, 12, 3))
    assert len(set(shared.tolist())) > 1  # the sets differ from each other
    independent = _step_timesteps(gen(), 12, 3, False, 1000)
    assert torch.equal(independent, torch.randint(0, 1000, (12,), generator=gen()))  # the earlier runs' draw, unchanged
    assert torch.equal(_step_timesteps(gen(), 12, 1, True, 1000), independent)  # single images: one t each


def test_view_set_steps_get_correspondence_weighting_from_the_object_coordinates():
    """`_step_bias`: a seeded strength per multi-view step from --correspondence (0 = plain attention: None); the
    token points of each set are its own renders' object coordinates, on every attention grid of the latent."""
    from concord.geometry.sync import token_grid
    from concord.micro.data import generate_view_sets
    from concord.micro.train import TrainConfig, _parse_strengths, _step_bias

    cfg = TrainConfig(out="unused", seed=5, views=3, correspondence=(0.0, 4.0))
    data = generate_view_sets(2, 3, seed=5, index=0, height=32, width=32)
    drawn = {}
    for step in range(12):
        b = _step_bias(cfg, step, data, 3, (16, 16))
        drawn[step] = None if b is None else b.strength
        again = _step_bias(cfg, step, data, 3, (16, 16))
        assert (again is None) == (b is None) and (b is None or again.strength == b.strength)  # seeded per step
    assert set(drawn.values()) == {None, 4.0}
    step = next(k for k, v in drawn.items() if v == 4.0)
    bias = _step_bias(cfg, step, data, 3, (16, 16))
    assert bias.token_counts == (1, 4, 16, 64, 256)
    pts, fg = token_grid(data.coords, data.mask, (8, 8))
    expected = torch.as_tensor(pts.reshape(2, 3 * 64, 3))
    assert torch.equal(bias._tensors(64, "cpu")[0], expected)  # set s's views, in the processor's token order
    single = generate_batch(4, 5, index=0, height=32, width=32)
    assert _step_bias(cfg, step, single, 1, (16, 16)) is None
    assert _step_bias(TrainConfig(out="unused", views=3), step, data, 3, (16, 16)) is None
    assert _parse_strengths("0, 4,8") == (0.0, 4.0, 8.0) and _parse_strengths("") == ()
    with pytest.raises(Exception, match="comma-separated"):
        _parse_strengths("strong")


def test_edge_weights_mark_the_outline_on_both_sides_and_nothing_else():
    from concord.micro.data import generate_batch
    from concord.micro.train import edge_weights

    mask = np.zeros((2, 8, 8), bool)
    mask[0, 2:5, 3:6] = True  # a 3x3 square; image 1 is all background
    w = edge_weights(mask, 4.0)
    assert w.dtype == np.float32 and w.shape == mask.shape
    assert (w[1] == 1).all()
    ring = np.zeros((8, 8), bool)
    ring[1:6, 2:7] = True
    ring[3, 4] = False  # the square's centre pixel sees only object
    assert np.array_equal(w[0] == 4.0, ring)
    assert set(np.unique(w[0])) == {1.0, 4.0}
    # on real data: every outline pixel touches the other side, and the outline is a small share of the picture
    b = generate_batch(8, 0, index=0, height=64, width=64, split="test")
    we = edge_weights(b.mask, 3.0) == 3.0
    assert 0 < we.mean() < 0.15
    assert (we & b.mask).any() and (we & ~b.mask).any()


def test_self_correction_starts_higher_and_a_shared_set_starts_together():
    from concord.micro.train import _higher_timesteps, _step_timesteps

    g = torch.Generator().manual_seed(3)
    for shared in (False, True):
        t = _step_timesteps(g, 60, 6, shared, 1000)
        hi = _higher_timesteps(g, t, 6, shared, 1000)
        assert hi.dtype == t.dtype and hi.shape == t.shape
        assert bool((hi >= t).all()) and bool((hi <= 999).all()) and bool((hi > t).any())
        per_set = hi.view(10, 6)
        assert bool((per_set == per_set[:, :1]).all()) == shared
    top = torch.full((4,), 999)
    assert torch.equal(_higher_timesteps(g, top, 1, False, 1000), top)  # nothing above the top


def test_latent_layout_puts_each_pixel_where_the_codec_puts_its_colours():
    from concord.micro.model import micro_codec
    from concord.micro.train import latent_layout

    rng = np.random.default_rng(3)
    per_pixel = rng.random((2, 8, 6)).astype(np.float32)
    lay = latent_layout(per_pixel)
    # an image whose three channels all hold the map encodes to 2 map - 1 in every one of the pixel's latents
    enc = micro_codec().encode(torch.from_numpy(per_pixel)[:, None].expand(-1, 3, -1, -1))
    assert lay.shape == enc.shape == (2, 12, 4, 3)
    torch.testing.assert_close(lay, (enc + 1) / 2, rtol=0, atol=1e-6)
    # a mask selects exactly the latents of its pixels
    mask = rng.random((2, 8, 6)) < 0.3
    sel = latent_layout(mask) > 0.5
    img = torch.zeros(2, 3, 8, 6)
    img[torch.from_numpy(mask)[:, None].expand(-1, 3, -1, -1)] = 1.0
    assert torch.equal(sel, micro_codec().encode(img) > 0)
    assert int(sel.sum()) == 3 * int(mask.sum())


def test_own_trajectory_input_takes_every_pixel_back_to_the_clean_image():
    from concord.micro.model import build_scheduler
    from concord.micro.train import own_trajectory_input, self_correction_weight

    abar_all = build_scheduler().alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 12, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    eps_hi, eps_lo = torch.randn(2, *x0.shape, generator=g, dtype=torch.float64)
    t_lo = torch.tensor([0, 40, 300, 700])
    t_hi = torch.tensor([900, 41, 999, 701])
    a_lo, a_hi = abar_all[t_lo].view(-1, 1, 1, 1), abar_all[t_hi].view(-1, 1, 1, 1)
    x_hi = a_hi.sqrt() * x0 + (1 - a_hi).sqrt() * eps_hi
    own = torch.rand(x0.shape, generator=g) < 0.5
    v_fwd = a_lo.sqrt() * eps_lo - (1 - a_lo).sqrt() * x0
    # a model that knows the answer at t_hi: its DDIM step is the forward process at t_lo with the same noise
    v_true_hi = a_hi.sqrt() * eps_hi - (1 - a_hi).sqrt() * x0
    x_in, v = own_trajectory_input(x_hi, x0, v_true_hi, a_hi, a_lo, eps_lo, own)
    x_want = torch.where(own, a_lo.sqrt() * x0 + (1 - a_lo).sqrt() * eps_hi, a_lo.sqrt() * x0 + (1 - a_lo).sqrt() * eps_lo)
    assert torch.allclose(x_in, x_want, atol=1e-9)
    assert torch.allclose(v, torch.where(own, a_lo.sqrt() * eps_hi - (1 - a_lo).sqrt() * x0, v_fwd), atol=1e-7)
    # any model: the target's x0 is the clean one on every pixel, and the forward-process pixels are untouched
    v_hat = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_in, v = own_trajectory_input(x_hi, x0, v_hat, a_hi, a_lo, eps_lo, own)
    assert torch.allclose(a_lo.sqrt() * x_in - (1 - a_lo).sqrt() * v, x0, atol=1e-7)
    assert torch.equal(x_in[~own], (a_lo.sqrt() * x0 + (1 - a_lo).sqrt() * eps_lo)[~own])
    assert not torch.allclose(x_in[own], (a_lo.sqrt() * x0 + (1 - a_lo).sqrt() * eps_lo)[own])
    # the weight turns the v error into the x0 error weighted min(SNR, cap)
    w = self_correction_weight(a_lo, 5.0)
    snr = a_lo / (1 - a_lo)
    err_x0 = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    err_v = err_x0 / (1 - a_lo).sqrt()  # x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v_hat
    assert torch.allclose(w * err_v**2, snr.clamp(max=5.0) * err_x0**2, rtol=1e-9)
    assert snr[0].item() > 5.0 and snr[3].item() < 5.0  # both sides of the cap are exercised


def test_colour_pair_agreement_counts_views_on_the_most_common_pair():
    from concord.micro.evaluate import colour_pair_agreement

    mask = np.zeros((4, 8, 8), bool)
    mask[:, 2:6, 2:6] = True
    views = np.tile(np.asarray(BACKGROUND, np.float32), (4, 8, 8, 1))
    pal = [np.asarray(COLOURS[name], np.float32) / 255.0 for name in COLOUR_NAMES]
    pairs = [(0, 1), (0, 1), (0, 1), (2, 3)]
    for v, (a, b) in enumerate(pairs):  # left half one colour, right half the other
        views[v, 2:6, 2:4] = pal[a]
        views[v, 2:6, 4:6] = pal[b]
    assert colour_pair_agreement(views, mask) == 0.75
    assert colour_pair_agreement((views * 255).round().astype(np.uint8), mask) == 0.75
    views[1, 2:6, 4:6] = pal[4]
    views[2, 2:6, 4:6] = pal[5]
    assert colour_pair_agreement(views, mask) == 0.25  # every view its own pair


# --------------------------------------------------------------------------------------------------------------
# The pixel head (MicroPixelHead, refine_prediction, --train-only head)


def _head_pipe(seed: int = 0, trained_head: bool = True) -> MicroPipeline:
    """A test-size model with a pixel head; `trained_head` gives its last layer random (non-zero) weights, as a
    trained head has."""
    pipe = build_pipeline("test-head", seed=seed)
    if trained_head:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for prm in pipe.head.conv_out.parameters():
                prm.copy_(0.2 * torch.randn(prm.shape, generator=g))
    return pipe


def test_an_untrained_pixel_head_changes_nothing():
    with_head = _head_pipe(trained_head=False)
    without = MicroPipeline(unet=with_head.unet, text_encoder=with_head.text_encoder, tokenizer=with_head.tokenizer,
                            scheduler=with_head.scheduler)
    b = generate_batch(2, seed=0, index=0)
    kw = dict(prompt=b.prompts, depth=b.depth, num_inference_steps=3)
    a = with_head(generator=torch.Generator().manual_seed(0), **kw).images
    c = without(generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(a, c)
    trained = _head_pipe(trained_head=True)
    d = trained(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(d - a).max() > 0.01  # a trained head does act


def test_refined_v_moves_the_x0_estimate_by_exactly_the_heads_correction_at_the_silhouette():
    from concord.micro.model import refine_prediction, silhouette_tokens

    pipe = _head_pipe()
    g = torch.Generator().manual_seed(1)
    v, x_t = torch.randn(3, 12, 8, 8, generator=g), torch.randn(3, 12, 8, 8, generator=g)
    cond = micro_conditioning(generate_batch(3, seed=1, index=0, height=16, width=16).depth)
    abar = pipe.scheduler.alphas_cumprod[torch.tensor([5, 400, 990])]
    v2 = refine_prediction(pipe.head, v, x_t, cond, abar)
    s = (1 - abar).sqrt().view(-1, 1, 1, 1)
    # x0 as the model's own scheduler reads it off a v prediction (DDIM, clipping off so nothing is cut)
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": False})
    sched.set_timesteps(1000)

    def x0_of(out):
        return torch.cat([sched.step(out[i : i + 1], int(k), x_t[i : i + 1]).pred_original_sample
                          for i, k in enumerate([5, 400, 990])])

    x0, x0_2 = x0_of(v), x0_of(v2)
    with torch.no_grad():
        r = pipe.head(torch.nn.functional.pixel_shuffle(x0, 2), torch.nn.functional.pixel_shuffle(cond, 2), s.view(-1))
    g = silhouette_tokens(cond)
    torch.testing.assert_close(x0_2 - x0, g * torch.nn.functional.pixel_unshuffle(r, 2), rtol=0, atol=1e-5)
    assert g.any() and (~g).any()
    moved = (x0_2 - x0).abs().amax(1, keepdim=True) > 0
    assert moved.any() and not (moved & ~g).any()  # the head acts on silhouette tokens only
    assert refine_prediction(None, v, x_t, cond, abar) is v


def test_a_model_with_a_pixel_head_saves_loads_and_samples_alike_everywhere(tmp_path):
    pipe = _head_pipe()
    pipe.save_pretrained(tmp_path / "m")
    loaded = MicroPipeline.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.head, type(pipe.head)) and loaded.head.dtype == torch.float32
    for k, v in pipe.head.state_dict().items():  # fp16 on disk
        assert torch.equal(loaded.head.state_dict()[k], v.half().float()), k
    # the multi-view sampler's denoiser predicts what the pipeline's own step uses
    parts = micro_parts(loaded)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 12, 16, 16, generator=g)
    depth = generate_batch(2, seed=2, index=0, height=32, width=32).depth
    from concord.pipelines.depth_image import depth_to_control

    control = torch.from_numpy(np.stack([depth_to_control(d) for d in depth]))[:, None]
    cond = parts.denoiser.prepare_control(control, (16, 16))
    emb = parts.encode_text(["a red sphere", "a checker box"])
    t = torch.tensor(600)
    with torch.no_grad():
        a = parts.denoiser.predict(x_t, t, emb, cond)
        b = loaded.predict_v(torch.cat([x_t, cond], 1), t, emb)
        plain = loaded.unet(torch.cat([x_t, cond], 1), t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - plain).abs().max() > 1e-3  # the head is in the path
    with torch.no_grad():  # a float timestep (Euler-type schedulers) reads the same abar where it is a whole number
        c = loaded.predict_v(torch.cat([x_t, cond], 1), torch.tensor(600.0), emb)
    torch.testing.assert_close(c, b, rtol=0, atol=0)
    # a model saved without a head (every micro model before the head) still loads, with head None
    build_pipeline("test", seed=0).save_pretrained(tmp_path / "old")
    assert MicroPipeline.from_pretrained(tmp_path / "old").head is None


def test_training_only_the_head_leaves_the_networks_as_they_were_and_resumes_exactly(tmp_path):
    from concord.micro.train import LOSS_LOG, MODEL_DIR, TrainConfig, TrainError, train

    build_pipeline("test", seed=3).save_pretrained(tmp_path / "base")
    base = MicroPipeline.from_pretrained(tmp_path / "base")
    common = dict(preset="test-head", batch=4, size=32, log_every=1, warmup_steps=1, lr=1e-2, seed=1, minutes=5,
                  threads=0, init_from=str(tmp_path / "base"), train_only="head", loss_weight_cap=6.0,
                  weight_decay=0.0)
    summary = train(TrainConfig(out=str(tmp_path / "whole"), steps=4, **common), progress=False)
    assert "--train-only head" in summary["command"] and "--loss-weight-cap 6" in summary["command"]
    assert "--weight-decay 0" in summary["command"]
    after = MicroPipeline.from_pretrained(tmp_path / "whole" / MODEL_DIR)
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in after.unet.state_dict().items())
    assert all(torch.equal(v, base.text_encoder.state_dict()[k]) for k, v in after.text_encoder.state_dict().items())
    assert after.head.conv_out.weight.abs().max() > 0  # the head left zero: it trained
    train(TrainConfig(out=str(tmp_path / "split"), steps=2, **common), progress=False)
    with pytest.raises(TrainError, match="loss_weight_cap=6.0"):
        train(TrainConfig(out=str(tmp_path / "split"), steps=4, resume=True, **{**common, "loss_weight_cap": None}),
              progress=False)
    train(TrainConfig(out=str(tmp_path / "split"), steps=4, resume=True, **common), progress=False)
    assert _read_log(tmp_path / "whole" / LOSS_LOG) == _read_log(tmp_path / "split" / LOSS_LOG)
    # a head needs a trained model under it; a preset without a head cannot train one, nor start from a model that has one
    with pytest.raises(TrainError, match="needs --init-from"):
        train(TrainConfig(out=str(tmp_path / "z"), steps=1, **{**common, "init_from": None}), progress=False)
    with pytest.raises(TrainError, match="no pixel head"):
        train(TrainConfig(out=str(tmp_path / "x"), steps=1, **{**common, "preset": "test"}), progress=False)
    with pytest.raises(TrainError, match="has a pixel head"):
        train(TrainConfig(out=str(tmp_path / "y"), steps=1, **{**common, "preset": "test", "train_only": "all",
                                                               "init_from": str(tmp_path / "whole" / MODEL_DIR)}),
              progress=False)


def test_capped_loss_weight_caps_the_x0_weight_and_leaves_noisy_samples_alone():
    from concord.micro.train import capped_loss_weight

    abar = build_components("test")["scheduler"].alphas_cumprod[torch.tensor([0, 100, 500, 999])]
    w = capped_loss_weight(abar, 6.0)
    snr = abar / (1 - abar)
    x0_weight = w * (snr + 1)  # the v loss's weight on the x0 error is SNR + 1
    torch.testing.assert_close(x0_weight, torch.minimum(snr + 1, torch.tensor(6.0)), rtol=1e-5, atol=1e-6)
    assert w[-1] == 1.0 and w[0] < 1e-3


def test_silhouette_tokens_are_the_ones_holding_object_and_background_pixels():
    from concord.micro.model import silhouette_tokens

    b = generate_batch(4, seed=5, index=0, height=32, width=32)
    g = silhouette_tokens(micro_conditioning(b.depth))[:, 0].numpy()
    blocks = b.mask.reshape(4, 16, 2, 16, 2)
    want = blocks.any((2, 4)) & ~blocks.all((2, 4))
    np.testing.assert_array_equal(g, want)
    assert want.any()
