"""Model registry: the tiny preset, local folders, single files, and the errors users see offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from concord.models import registry, tiny
from concord.models.registry import ModelUnavailable, load_model, offline_status


def test_tiny_is_deterministic_and_has_every_component():
    a, b = tiny.build_components(seed=0), tiny.build_components(seed=0)
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    c = tiny.build_components(seed=1)
    assert not torch.equal(a["unet"].conv_in.weight, c["unet"].conv_in.weight)


def test_tiny_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_components()
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_is_built_in_code_and_round_trips_words():
    tok = tiny.build_tokenizer()
    ids = tok("a red box")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aredbox"


def test_load_tiny_on_cpu(tiny_model):
    assert tiny_model.kind == "controlnet" and tiny_model.device == "cpu" and tiny_model.dtype == "float32"
    assert next(tiny_model.pipe.unet.parameters()).dtype == torch.float32


def test_local_diffusers_folder_loads_and_generates(tmp_path):
    pipe = tiny.build_pipeline()
    pipe.save_pretrained(tmp_path / "my-model")
    assert offline_status(str(tmp_path / "my-model")) == (True, None)
    model = load_model(str(tmp_path / "my-model"), "cpu")
    assert model.kind == "controlnet"
    for name in ("unet", "controlnet"):
        sa, sb = getattr(pipe, name).state_dict(), getattr(model.pipe, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    from PIL import Image

    out = model.pipe("a ball", image=Image.new("RGB", (32, 32)), num_inference_steps=1, height=32, width=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_folder_without_depth_conditioning_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ModelUnavailable, match="no depth conditioning"):
        load_model(str(tmp_path / "m"), "cpu")
    (tmp_path / "empty").mkdir()
    ok, reason = offline_status(str(tmp_path / "empty"))
    assert not ok and "model_index.json" in reason


def test_single_file_that_is_not_a_checkpoint_says_so(tmp_path):
    # Real single files without their configs or ControlNet: tests/server/test_checkpoints.py.
    ckpt = tmp_path / "dreamy.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(ModelUnavailable) as e:
        load_model(str(ckpt), "cpu")
    assert "dreamy.safetensors" in str(e.value) and "not a readable .safetensors file" in str(e.value)


@pytest.mark.parametrize("name", ["sd15-depth", "sd2-depth", "sdxl-depth"])
def test_real_presets_offline_explain_how_to_get_them(name):
    preset = registry.PRESETS[name]
    with pytest.raises(ModelUnavailable) as e:
        load_model(name, "cpu")
    msg = str(e.value)
    assert name in msg and preset.base in msg and "hf download" in msg
    if preset.controlnet:
        assert preset.controlnet in msg


def test_unknown_name_and_device_errors():
    with pytest.raises(ModelUnavailable, match="neither a preset"):
        load_model("no-such-model", "cpu")
    with pytest.raises(ModelUnavailable, match="unknown device"):
        load_model("tiny", "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelUnavailable, match="no CUDA"):
            load_model("tiny", "cuda")


def test_micro_is_the_shipped_default_and_runs_the_depth_image_job(tmp_path):
    import threading

    from concord.api.schemas import DepthImageParams
    from concord.jobs.context import JobContext
    from concord.pipelines import depth_image

    assert registry.DEFAULT_MODEL == "micro"
    assert offline_status("micro") == (True, None)
    model = load_model("micro", "cpu")
    assert model.kind == "micro" and model.dtype == "float32"
    depth = np.zeros((64, 64), np.float32)
    depth[16:48, 16:48] = 3.0
    steps = []
    ctx = JobContext(tmp_path, lambda stage, step, total, msg: steps.append(step), threading.Event())
    depth_image.run(model, DepthImageParams(prompt="a red box", steps=4, guidance=3.0), {"depth": depth}, ctx)
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "image.png"))
    assert img.shape == (64, 64, 3) and max(steps) == 4


def test_micro_weights_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_shipped_weights", lambda name: tmp_path / name)
    ok, reason = offline_status("micro")
    assert not ok and "train-micro" in reason
    with pytest.raises(ModelUnavailable, match="micro"):
        load_model("micro", "cpu")
