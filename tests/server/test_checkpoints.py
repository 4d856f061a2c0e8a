"""A user's own checkpoint loads: every layout users have, through the registry, then one small job on it.

The checkpoints are random-weight stand-ins written by `concord.models.synthetic` from the real configurations:
at the "small" size here (every width / 8: the same files, tensor names and layout as the real models, 1/64 of the
parameters) and at the real size in `bench/checkpoints.py`. The real sizes are checked here too, on PyTorch's
meta device (shapes without memory): the real configurations' tensors convert to the original single-file layout
and back through diffusers' own converters, and are told apart by family.

Each test gets its own empty Hugging Face cache (`hub_cache`); the suite runs with HF_HUB_OFFLINE=1
(tests/conftest.py), so nothing here can reach the network, exactly as on a user's offline machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from concord.models import single_file, synthetic
from concord.models.registry import KIND_RECOMMENDED, ModelUnavailable, load_model, offline_status, recommended_for

PRESET = {"sd15": "sd15-depth", "sd2-depth": "sd2-depth", "sdxl": "sdxl-depth"}
KIND = {"sd15": "controlnet", "sd2-depth": "depth2img", "sdxl": "sdxl-controlnet"}


@pytest.fixture(scope="module")
def sd15():
    return synthetic.build("sd15", "small", seed=0)


@pytest.fixture(scope="module")
def sd2():
    return synthetic.build("sd2-depth", "small", seed=1)


@pytest.fixture(scope="module")
def sdxl():
    return synthetic.build("sdxl", "small", seed=2)


@pytest.fixture
def ckpts(sd15, sd2, sdxl):
    return {"sd15": sd15, "sd2-depth": sd2, "sdxl": sdxl}


@pytest.fixture(scope="module")
def written(tmp_path_factory, sd15, sd2, sdxl):
    """Single files and configuration folders shared by the tests below, which only read them."""
    root = tmp_path_factory.mktemp("checkpoints")
    return SimpleNamespace(
        sd15_file=synthetic.write_single_file(sd15, root / "my-finetune.safetensors"),
        sd2_file=synthetic.write_single_file(sd2, root / "sd2.safetensors"),
        sdxl_file=synthetic.write_single_file(sdxl, root / "xl.safetensors"),
        sd15_config=synthetic.write_config_folder(sd15, root / "sd15-config", with_controlnet=True),
        sdxl_config=synthetic.write_config_folder(sdxl, root / "sdxl-config", with_controlnet=True),
        sd15_configs_only=synthetic.write_config_folder(sd15, root / "sd15-configs-only"),
        sdxl_configs_only=synthetic.write_config_folder(sdxl, root / "sdxl-configs-only"),
    )


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test, where HF_HOME=<tmp>/hf would put it."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "the suite must run with HF_HUB_OFFLINE=1"
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def run_depth_job(model, out_dir: Path) -> np.ndarray:
    """The depth_image job at 64x64, one step; returns the picture it wrote."""
    from concord.api.schemas import DepthImageParams
    from concord.jobs.context import JobContext
    from concord.pipelines import depth_image

    depth = np.zeros((64, 64), np.float32)
    depth[16:48, 16:48] = np.linspace(2.0, 3.0, 32, dtype=np.float32)[None]
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = []
    ctx = JobContext(out_dir, lambda stage, step, total, msg: steps.append(step), threading.Event())
    depth_image.run(model, DepthImageParams(prompt="a red box", steps=1, guidance=3.0), {"depth": depth}, ctx)
    img = np.asarray(Image.open(out_dir / "image.png"))
    assert img.shape == (64, 64, 3) and max(steps) == 1
    # NaNs would come out as one flat colour; random weights give a varied picture.
    assert img.reshape(-1, 3).std(0).min() > 0
    return img


def assert_same_weights(module, reference: dict) -> None:
    """The module holds exactly `reference`'s tensors (transformers' optional `text_model.` level aside)."""
    got = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}
    ref = {k.removeprefix("text_model."): v for k, v in reference.items()}
    assert set(got) == set(ref)
    different = [k for k in ref if not torch.equal(got[k].float(), ref[k].float())]
    assert not different, different[:5]


# ---------------------------------------------------------------------------------------------------------------
# The converter to the original single-file layout, checked against diffusers' own converters
# ---------------------------------------------------------------------------------------------------------------


def _diffusers_reads_back(ckpt, original: dict) -> dict[str, dict]:
    """What diffusers' single-file converters make of `original`, per component (diffusers' names)."""
    from diffusers.loaders import single_file_utils as U

    out = {
        "unet": U.convert_ldm_unet_checkpoint(original, ckpt.configs["unet"]),
        "vae": U.convert_ldm_vae_checkpoint(original, ckpt.configs["vae"]),
    }
    if ckpt.family == "sd15":
        out["text_encoder"] = U.convert_ldm_clip_checkpoint(original)
    elif ckpt.family == "sd2-depth":
        out["text_encoder"] = U.convert_open_clip_checkpoint(ckpt.models["text_encoder"], original, "cond_stage_model.model.")
    else:
        out["text_encoder"] = U.convert_ldm_clip_checkpoint(original)
        out["text_encoder_2"] = U.convert_open_clip_checkpoint(
            ckpt.models["text_encoder_2"], original, "conditioner.embedders.1.model."
        )
    for name in ("text_encoder", "text_encoder_2"):
        if name in out:
            out[name] = {k.removeprefix("text_model."): v for k, v in out[name].items() if not k.endswith("position_ids")}
    return out


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_original_layout_round_trips_exactly_through_diffusers(ckpts, family):
    ckpt = ckpts[family]
    back = _diffusers_reads_back(ckpt, synthetic.to_original_layout(ckpt))
    for name, converted in back.items():
        ref = {k.removeprefix("text_model."): v for k, v in ckpt.state_dict(name).items()}
        assert set(converted) == set(ref), (name, sorted(set(converted) ^ set(ref))[:5])
        assert all(torch.equal(converted[k], ref[k]) for k in ref), name


@pytest.mark.parametrize(
    "family, label, context, in_ch",
    [("sd15", "sd1", 768, 4), ("sd2-depth", "sd2", 1024, 5), ("sdxl", "sdxl", 2048, 4)],
)
def test_real_configs_convert_and_are_told_apart(family, label, context, in_ch):
    ckpt = synthetic.build(family, "real", device="meta")  # shapes only, no memory
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in ckpt.models.items()}
    # The published UNet sizes (SD 2 depth: SD 2's 865,910,724 plus the depth channel's 320x3x3 input weights).
    expected_unet = {"sd15": 859_520_964, "sd2-depth": 865_910_724 + 320 * 9, "sdxl": 2_567_463_684}[family]
    assert n_params["unet"] == expected_unet
    original = synthetic.to_original_layout(ckpt)
    back = _diffusers_reads_back(ckpt, original)
    for name, converted in back.items():
        ref = {k.removeprefix("text_model."): v for k, v in ckpt.state_dict(name).items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref.items()}, name
    info = single_file.inspect_shapes(Path(f"{family}.safetensors"), {k: tuple(v.shape) for k, v in original.items()})
    assert (info.family, info.context_dim, info.in_channels) == (label, context, in_ch)
    assert single_file.family_of_context_dim(context) == single_file.LABELS[label]
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type(original) == {"sd15": "v1", "sd2-depth": "v2", "sdxl": "xl_base"}[family]


# ---------------------------------------------------------------------------------------------------------------
# Layout (a): the Hugging Face cache, loaded by preset name with the Hub offline
# ---------------------------------------------------------------------------------------------------------------


def test_hub_cache_tree_is_the_one_huggingface_hub_reads(sd15, hub_cache):
    from huggingface_hub import scan_cache_dir, snapshot_download

    snaps = synthetic.write_hub_cache(sd15, hub_cache)
    info = scan_cache_dir(hub_cache)
    assert not info.warnings
    assert {r.repo_id for r in info.repos} == set(snaps)
    for repo_id, snap in snaps.items():
        assert Path(snapshot_download(repo_id, local_files_only=True)) == snap
        repo_dir = snap.parent.parent
        assert (repo_dir / "refs" / "main").read_text() == snap.name
        for f in (p for p in snap.rglob("*") if not p.is_dir()):
            target = os.readlink(f)
            assert not os.path.isabs(target) and Path(os.path.normpath(f.parent / target)).parent == repo_dir / "blobs"
            data = f.read_bytes()
            if f.suffix == ".safetensors":  # LFS files: the blob is named by the sha256 of the content
                assert Path(target).name == hashlib.sha256(data).hexdigest()
            else:  # others by their git blob id
                assert Path(target).name == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_preset_loads_from_the_hub_cache_offline_and_runs_a_job(ckpts, family, hub_cache, tmp_path):
    ckpt = ckpts[family]
    preset = PRESET[family]
    assert offline_status(preset)[0] is False
    synthetic.write_hub_cache(ckpt, hub_cache)
    assert offline_status(preset) == (True, None)
    model = load_model(preset, "cpu")
    assert model.kind == KIND[family]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        if name in ckpt.models:
            assert_same_weights(getattr(model.pipe, name), synthetic.hub_state_dict(name, ckpt.models[name]))
    if family == "sd2-depth":  # jobs bring their own depth: the estimator is not loaded
        assert model.pipe.depth_estimator is None
    run_depth_job(model, tmp_path / "job")


def test_incomplete_hub_snapshot_names_the_missing_file(sd2, hub_cache):
    snaps = synthetic.write_hub_cache(sd2, hub_cache, skip=("depth_estimator", "feature_extractor"))
    snap = snaps["stabilityai/stable-diffusion-2-depth"]
    # The depth estimator is never loaded: a download without it is complete for Concord.
    assert offline_status("sd2-depth") == (True, None)
    # A blob removed from under its snapshot link (a cleaned cache, an interrupted copy).
    link = snap / "unet" / "diffusion_pytorch_model.safetensors"
    (link.parent / os.readlink(link)).unlink()
    ok, reason = offline_status("sd2-depth")
    assert not ok
    assert "unet/diffusion_pytorch_model.safetensors" in reason and "hf download stabilityai/stable-diffusion-2-depth" in reason
    with pytest.raises(ModelUnavailable) as e:
        load_model("sd2-depth", "cpu")
    assert "sd2-depth" in str(e.value) and "unet/diffusion_pytorch_model.safetensors" in str(e.value)
    # A component folder that never arrived.
    link.unlink()
    for f in (snap / "text_encoder").iterdir():
        f.unlink()
    (snap / "text_encoder").rmdir()
    reason = offline_status("sd2-depth")[1]
    assert "text_encoder/ (the whole folder)" in reason and "unet/diffusion_pytorch_model.safetensors" in reason


# ---------------------------------------------------------------------------------------------------------------
# Layout (b): a diffusers folder
# ---------------------------------------------------------------------------------------------------------------


# SDXL's folder loads through the same `DiffusionPipeline.from_pretrained` call; bench/checkpoints.py loads it.
@pytest.mark.parametrize("family", ["sd15", "sd2-depth"])
def test_diffusers_folder_loads_and_runs_a_job(ckpts, family, hub_cache, tmp_path):
    ckpt = ckpts[family]
    folder = synthetic.write_diffusers_folder(ckpt, tmp_path / "my-model")
    assert offline_status(str(folder)) == (True, None)
    model = load_model(str(folder), "cpu")
    assert model.kind == KIND[family]
    assert_same_weights(model.pipe.unet, ckpt.state_dict("unet"))
    run_depth_job(model, tmp_path / "job")
    # A folder missing a part says which.
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelUnavailable, match="vae/diffusion_pytorch_model.safetensors"):
        load_model(str(folder), "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Layout (c): one file in the original layout, with and without a local configuration
# ---------------------------------------------------------------------------------------------------------------


def test_single_file_with_cached_configs_loads_the_same_weights(sd15, written, hub_cache, tmp_path):
    path = written.sd15_file
    synthetic.write_hub_cache(sd15, hub_cache)
    assert offline_status(str(path)) == (True, None)
    model = load_model(str(path), "cpu")
    assert model.kind == "controlnet"
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        assert_same_weights(getattr(model.pipe, name), sd15.state_dict(name))
    run_depth_job(model, tmp_path / "job")


def test_single_file_with_a_local_config_and_an_empty_cache(sd15, written, hub_cache, tmp_path):
    config = written.sd15_config
    assert not any(p.suffix == ".safetensors" for p in config.rglob("*") if "controlnet" not in p.parts)
    model = load_model(str(written.sd15_file), "cpu", config=str(config))
    assert model.kind == "controlnet"
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        assert_same_weights(getattr(model.pipe, name), sd15.state_dict(name))
    run_depth_job(model, tmp_path / "job")


def test_sdxl_single_file_loads_with_the_sdxl_controlnet(sdxl, written, hub_cache, tmp_path):
    # Configurations from a local folder, the depth ControlNet from the cache (the sdxl-depth preset's).
    synthetic.write_hub_repo(hub_cache, synthetic.REPOS["sdxl"]["controlnet"], synthetic.controlnet_repo_files(sdxl))
    model = load_model(str(written.sdxl_file), "cpu", config=str(written.sdxl_configs_only))
    assert model.kind == "sdxl-controlnet"
    # Run at SDXL's settings, known before loading too (`concord texture` reads them first).
    assert model.settings == recommended_for(str(written.sdxl_file)) == KIND_RECOMMENDED["sdxl-controlnet"]
    assert recommended_for(str(written.sd15_file)) == KIND_RECOMMENDED["controlnet"]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        assert_same_weights(getattr(model.pipe, name), sdxl.state_dict(name))
    # The job path is the sdxl-depth preset's (run in test_preset_loads_from_the_hub_cache_offline_and_runs_a_job).


def test_single_file_offline_without_configs_says_what_to_pass(written, hub_cache, tmp_path):
    for path, family, label in ((written.sd15_file, "sd15", "Stable Diffusion 1.x"), (written.sdxl_file, "sdxl", "SDXL")):
        base = synthetic.REPOS[family]["base"]
        with pytest.raises(ModelUnavailable) as e:
            load_model(str(path), "cpu")
        msg = str(e.value)
        assert path.name in msg and label in msg
        assert "--config DIR" in msg and f"hf download {base}" in msg and "--include" in msg
    # Configs present but not the ControlNet: named, with how to get it.
    with pytest.raises(ModelUnavailable) as e:
        load_model(str(written.sd15_file), "cpu", config=str(written.sd15_configs_only))
    assert "hf download lllyasviel/control_v11f1p_sd15_depth" in str(e.value) and "controlnet/" in str(e.value)
    # A --config folder that is not one.
    with pytest.raises(ModelUnavailable, match="no model_index.json"):
        load_model(str(written.sd15_file), "cpu", config=str(tmp_path))
    # --config means nothing for presets and folders.
    with pytest.raises(ModelUnavailable, match="single-file"):
        load_model("tiny", "cpu", config=str(written.sd15_config))


def test_ckpt_file_is_read_without_running_code_and_loads(sd15, written, tmp_path):
    path = tmp_path / "old-style.ckpt"
    torch.save({"state_dict": synthetic.to_original_layout(sd15), "global_step": 470000}, path)
    info = single_file.inspect(path)
    assert info.family == "sd1" and info.in_channels == 4 and info.has_vae and info.has_text_encoder
    assert offline_status(str(path), str(written.sd15_config)) == (True, None)
    model = load_model(str(path), "cpu", config=str(written.sd15_config))
    assert_same_weights(model.pipe.unet, sd15.state_dict("unet"))
    # A pickle that needs code to load is refused, not run.
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": SimpleNamespace(a=1)}, evil)
    reason = offline_status(str(evil))[1]
    assert "evil.ckpt" in reason and "without running code" in reason and ".safetensors" in reason


# ---------------------------------------------------------------------------------------------------------------
# Wrong layouts and other families: what each message says
# ---------------------------------------------------------------------------------------------------------------


def _save(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_files_that_are_not_a_model_say_what_they_are(sd15, tmp_path):
    cases = {
        "lora.safetensors": (
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 40),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(40, 4)},
            "is a LoRA",
        ),
        "noise.safetensors": ({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, "is not a Stable Diffusion checkpoint"),
        "unet.safetensors": (sd15.state_dict("unet"), "UNet in diffusers' layout"),
        "vae.safetensors": (synthetic.vae_to_original(sd15.state_dict("vae"), prefix=""), "only a VAE"),
        "controlnet.safetensors": (sd15.state_dict("controlnet"), "is a ControlNet"),
        "embedding.safetensors": ({"emb_params": torch.zeros(2, 768)}, "textual-inversion embedding"),
    }
    for name, (tensors, phrase) in cases.items():
        path = _save(tmp_path / name, tensors)
        ok, reason = offline_status(str(path))
        assert not ok and str(path) in reason and phrase in reason, (name, reason)
        with pytest.raises(ModelUnavailable, match=phrase):
            load_model(str(path), "cpu")
    truncated = tmp_path / "half-downloaded.safetensors"
    truncated.write_bytes((tmp_path / "unet.safetensors").read_bytes()[:1000])
    reason = offline_status(str(truncated))[1]
    assert "half-downloaded.safetensors" in reason and "download it again" in reason
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a checkpoint file" in offline_status(str(tmp_path / "notes.txt"))[1]


def test_folders_that_are_not_a_pipeline_say_what_to_pass(sd15, written, hub_cache, tmp_path):
    folder = written.sd15_config  # a pipeline folder (weights or not does not matter here)
    reason = offline_status(str(folder / "unet"))[1]
    assert "single UNet2DConditionModel" in reason and str(folder) in reason
    assert "is not a base model" in offline_status(str(folder / "controlnet"))[1]
    repo_id = synthetic.REPOS["sd15"]["controlnet"]
    snap = synthetic.write_hub_repo(hub_cache, repo_id, synthetic.controlnet_repo_files(sd15))
    assert "--model sd15-depth" in offline_status(str(snap.parent.parent))[1]
    holder = tmp_path / "downloads"
    holder.mkdir()
    shutil.copy(written.sd15_file, holder / "model.safetensors")
    assert f"--model {holder / 'model.safetensors'}" in offline_status(str(holder))[1]
    collection = tmp_path / "models"
    collection.mkdir()
    shutil.copytree(written.sd15_configs_only, collection / "my-pipeline")
    assert f"pass --model {collection / 'my-pipeline'}" in offline_status(str(collection))[1]
    (tmp_path / "empty").mkdir()
    reason = offline_status(str(tmp_path / "empty"))[1]
    assert "no model_index.json" in reason and "save_pretrained" in reason


def test_checkpoints_of_another_family_are_named_with_what_to_use(sd15, sd2, sdxl, written, hub_cache, tmp_path):
    # SD 2 depth in one file: the family, and the preset to use instead.
    reason = offline_status(str(written.sd2_file))[1]
    assert "Stable Diffusion 2.x depth checkpoint" in reason and "--model sd2-depth" in reason
    # SD 2 without the depth channel (a plain 2.x model).
    plain = synthetic.to_original_layout(sd2, extras=False)
    w = plain["model.diffusion_model.input_blocks.0.0.weight"]
    plain["model.diffusion_model.input_blocks.0.0.weight"] = w[:, :4].contiguous()
    reason = offline_status(str(_save(tmp_path / "sd21.safetensors", plain)))[1]
    assert "Stable Diffusion 2.x text-to-image" in reason and "no depth ControlNet" in reason
    # An inpainting model (9 input channels).
    inpaint = synthetic.to_original_layout(sd15, extras=False)
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, 3, 3)
    reason = offline_status(str(_save(tmp_path / "inpaint.safetensors", inpaint)))[1]
    assert "inpainting checkpoint" in reason and "text-to-image version" in reason
    # An SDXL file with SD 1.5's configuration, and the reverse.
    reason = offline_status(str(written.sdxl_file), str(written.sd15_config))[1]
    assert "xl.safetensors is an SDXL text-to-image checkpoint" in reason and "of the file's own family (SDXL)" in reason
    reason = offline_status(str(written.sd15_file), str(written.sdxl_config))[1]
    assert "Stable Diffusion 1.x" in reason and str(written.sdxl_config) in reason
    # The right configuration with the other family's ControlNet.
    mixed = tmp_path / "mixed"
    shutil.copytree(written.sd15_configs_only, mixed)
    synthetic.write_files(mixed / "controlnet", synthetic.controlnet_repo_files(sdxl))
    reason = offline_status(str(written.sd15_file), str(mixed))[1]
    assert "ControlNet" in reason and "works only with its own family" in reason
    # A cached configuration that is not this model's (the real SDXL's, against the small file).
    snap = synthetic.write_hub_repo(
        hub_cache,
        synthetic.REPOS["sdxl"]["base"],
        {"model_index.json": synthetic.json_bytes(sdxl.configs["model_index"]),
         "unet/config.json": synthetic.json_bytes(synthetic.real_configs("sdxl")["unet"])},
    )
    assert snap.is_dir()
    reason = offline_status(str(written.sdxl_file))[1]
    assert "describes SDXL" in reason and "pass --config DIR" in reason
