"""Models declare their recommended settings, the protocol reports them, and a job that sets none uses them.

Issue 9 ("Defaults that fit the model"): each registry model declares view size, steps, guidance, texture size and
limits (`concord.models.recommended`); `/v1/health`, `/v1/models` and `concord models -v` report them; a job whose
request leaves `steps` / `guidance` / `texture_size` out runs at the loaded model's values, and its metrics.json
says which values were used and where each came from. Model: `tiny` (CPU), with its declared settings swapped
for distinctive ones where a test must tell "the model's" apart from any constant.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest

from blender_addon.core import protocol
from blender_addon.core.client import encode_arrays
from concord.api import schemas
from concord.api.app import ServerSettings, create_app
from concord.cli import main as cli_main
from concord.jobs.context import JobContext
from concord.models import registry
from concord.models.recommended import CONSISTENCY_SETTINGS, JOB_SETTINGS, RecommendedSettings
from concord.pipelines import texture as T
from concord.pipelines.kinds import JOB_KINDS

ROOT = Path(__file__).resolve().parents[2]
BOX = ROOT / "tests" / "fixtures" / "meshes" / "boxtextured" / "BoxTextured.glb"

# Distinct from every preset's values and from the old hard-coded defaults (30 steps, 7.5, 1024).
ODD = RecommendedSettings(view_size=64, steps=3, guidance=1.5, texture_size=128, native_size=64, max_view_size=128,
                          attention_correspondence=2.5)


@pytest.fixture(scope="module")
def arrays64():
    from concord.geometry.mesh import load_mesh
    from concord.geometry.render import render_views
    from concord.geometry.rigs import parse_rig

    mesh = load_mesh(BOX, unwrap="always")
    c, r = mesh.bounding_sphere()
    cams = parse_rig("zero123pp").with_frame(mesh.up, mesh.front).cameras(c, r, 64, 64)
    return render_views(mesh, [(k.K, k.world_to_camera) for k in cams], 64, 64).validate().to_npz_dict()


@pytest.fixture
def odd_model(tiny_model):
    """The tiny model, declaring ODD as its recommended settings."""
    return dataclasses.replace(tiny_model, recommended=ODD)


@pytest.fixture
def make_app_client(tmp_path):
    from fastapi.testclient import TestClient

    clients = []

    def make(model):
        c = TestClient(create_app(ServerSettings(data_dir=tmp_path / f"data{len(clients)}"), model=model))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _submit(client, kind: str, params: dict, arrays: dict) -> str:
    files = {
        "request": (None, json.dumps({"kind": kind, "params": params})),
        "arrays": ("arrays.npz", encode_arrays(arrays), "application/octet-stream"),
    }
    r = client.post("/v1/jobs", files=files)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait_done(client, jid: str, bound_s: float = 300.0) -> dict:
    """Wait for the job to finish (the bound only guards against a hang; the outcome never depends on speed)."""
    end = time.monotonic() + bound_s
    while time.monotonic() < end:
        st = client.get(f"/v1/jobs/{jid}").json()
        if st["state"] in ("done", "failed", "cancelled"):
            assert st["state"] == "done", st
            return st
        time.sleep(0.05)
    raise AssertionError(f"job {jid} did not finish: {st}")


def _result_json(client, jid: str, name: str) -> dict:
    zf = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{jid}/result").content))
    return json.loads(zf.read(name))


# ----------------------------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("name", list(registry.PRESETS))
def test_every_preset_declares_settings_within_the_protocols_bounds(name):
    rec = registry.PRESETS[name].recommended
    assert isinstance(rec, RecommendedSettings), f"{name} declares no recommended settings"
    assert registry.recommended_for(name) == rec
    # each value is one the protocol accepts, and the view size one the texture job's array contract accepts
    schemas.TextureParams(prompt="x", steps=rec.steps, guidance=rec.guidance, texture_size=rec.texture_size)
    dims = T.ARRAYS.dims["H"]
    assert rec.view_size % dims.multiple_of == 0 and dims.low <= rec.view_size <= dims.high
    assert rec.native_size <= rec.max_view_size <= dims.high and rec.view_size <= rec.max_view_size


def test_native_sizes_are_the_models_own(tiny_model):
    """native_size = the UNet's sample size in pixels (latent size x the codec's downscale)."""
    pipe = tiny_model.pipe
    assert registry.PRESETS["tiny"].recommended.native_size == pipe.unet.config.sample_size * pipe.vae_scale_factor
    from concord.micro.model import FACTOR  # micro's codec: pixel_unshuffle by FACTOR

    micro_unet = json.loads((registry._shipped_weights("micro") / "unet" / "config.json").read_text())
    assert registry.PRESETS["micro"].recommended.native_size == micro_unet["sample_size"] * FACTOR


def test_micro_recommends_what_its_quality_was_measured_at():
    """docs/micro-model.md's quality figures (bench/results/micro_eval.json) were measured at micro's recommended
    steps and guidance: the recommendation is the setting the model card backs."""
    rows = json.loads((ROOT / "bench" / "results" / "micro_eval.json").read_text())["rows"]
    colour = [r for r in rows if r["metric"] in ("plain_colour_accuracy", "pair_colour_accuracy")]
    assert colour and all(r["pass"] for r in colour)
    rec = registry.PRESETS["micro"].recommended
    assert {(r["steps"], r["guidance"]) for r in colour} == {(rec.steps, rec.guidance)}


def test_micro_recommends_a_correspondence_strength_it_was_trained_with():
    """Correspondence-weighted attention works at the strengths a model learned to read (docs/texturing.md): micro's
    recommended strength is one drawn by its last training stage that trained the UNet (training.json beside the
    weights; a later `--train-only head` stage leaves the UNet as it was), and a model trained without it
    recommends 0."""
    training = json.loads((registry._shipped_weights("micro") / "training.json").read_text())
    rec = registry.PRESETS["micro"].recommended.attention_correspondence
    unet_stages = [st for st in training["stages"] if st.get("train_only", "all") != "head"]
    assert unet_stages and rec in unet_stages[-1].get("correspondence", [0.0])
    assert registry.PRESETS["tiny"].recommended.attention_correspondence == 0.0


def test_folders_and_single_files_get_their_kinds_settings(tmp_path, tiny_model):
    tiny_model.pipe.save_pretrained(tmp_path / "sd-like")
    assert registry.recommended_for(str(tmp_path / "sd-like")) == registry.KIND_RECOMMENDED["controlnet"]
    assert registry.recommended_for(str(registry._shipped_weights("micro"))) == registry.KIND_RECOMMENDED["micro"]
    assert registry.recommended_for(str(tmp_path / "model.safetensors")) == registry.KIND_RECOMMENDED["controlnet"]
    loaded = registry.load_model(str(tmp_path / "sd-like"), "cpu")
    assert loaded.settings == registry.KIND_RECOMMENDED["controlnet"]
    assert registry.load_model("tiny", "cpu").settings == registry.PRESETS["tiny"].recommended


def test_protocol_mirrors_the_settings():
    fields = tuple(f.name for f in dataclasses.fields(RecommendedSettings))
    assert tuple(schemas.RecommendedSettings.model_fields) == fields == protocol.RECOMMENDED_FIELDS
    assert protocol.MODEL_DEFAULT_PARAMS == {k: tuple(v) for k, v in JOB_SETTINGS.items()}
    for kind, names in JOB_SETTINGS.items():
        model = JOB_KINDS[kind].params_model
        for name in names:
            assert name in fields
            assert model.model_fields[name].default is None, f"{kind}.{name} must default to the model's"
    for kind, names in CONSISTENCY_SETTINGS.items():
        options = JOB_KINDS[kind].params_model.model_fields["consistency"].annotation
        for name in names:
            assert name in fields
            assert options.model_fields[name].default is None, f"{kind}.consistency.{name} must default to the model's"


# ----------------------------------------------------------------------------------------------- the protocol


def test_health_and_models_report_recommended_settings(make_app_client, odd_model, tmp_path):
    c = make_app_client(odd_model)
    assert c.get("/v1/health").json()["recommended"] == dataclasses.asdict(ODD)
    models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    for name, preset in registry.PRESETS.items():
        assert models[name]["recommended"] == dataclasses.asdict(preset.recommended)

    # a loaded local folder is listed too, with its kind's settings
    folder = dataclasses.replace(odd_model, name=str(tmp_path / "my-model"), recommended=None)
    models = {m["name"]: m for m in make_app_client(folder).get("/v1/models").json()["models"]}
    assert models[folder.name]["loaded"] and models[folder.name]["recommended"] == dataclasses.asdict(
        registry.KIND_RECOMMENDED["controlnet"]
    )


def test_a_texture_job_with_no_sampler_settings_uses_the_models(make_app_client, odd_model, arrays64):
    c = make_app_client(odd_model)
    jid = _submit(c, "texture", {"prompt": "a crate"}, arrays64)
    _wait_done(c, jid)
    m = _result_json(c, jid, "metrics.json")
    assert m["settings"] == {
        "steps": {"value": ODD.steps, "source": "model"},
        "guidance": {"value": ODD.guidance, "source": "model"},
        "texture_size": {"value": ODD.texture_size, "source": "model"},
        "consistency.attention_correspondence": {"value": ODD.attention_correspondence, "source": "model"},
    }
    assert m["params"]["steps"] == ODD.steps and m["texture_size"] == ODD.texture_size
    assert m["attention_correspondence"] == ODD.attention_correspondence  # what ran
    assert m["recommended"] == dataclasses.asdict(ODD)
    from PIL import Image

    png = c.get(f"/v1/jobs/{jid}/result/texture.png").content
    assert Image.open(io.BytesIO(png)).size == (ODD.texture_size, ODD.texture_size)

    # what the request sets is kept, and recorded as the user's
    jid = _submit(c, "texture", {"prompt": "a crate", "steps": 2, "texture_size": 64}, arrays64)
    _wait_done(c, jid)
    m = _result_json(c, jid, "metrics.json")
    assert m["settings"]["steps"] == {"value": 2, "source": "user"}
    assert m["settings"]["texture_size"] == {"value": 64, "source": "user"}
    assert m["settings"]["guidance"] == {"value": ODD.guidance, "source": "model"}

    # a consistency option the model recommends is the user's when the request sets it
    jid = _submit(c, "texture", {"prompt": "a crate", "steps": 1, "consistency": {"attention_correspondence": 0}}, arrays64)
    _wait_done(c, jid)
    m = _result_json(c, jid, "metrics.json")
    assert m["settings"]["consistency.attention_correspondence"] == {"value": 0.0, "source": "user"}
    assert m["attention_correspondence"] == 0.0


def test_a_depth_image_job_with_no_sampler_settings_uses_the_models(make_app_client, odd_model):
    import numpy as np

    depth = np.zeros((64, 64), np.float32)
    depth[16:48, 16:48] = 3.0
    c = make_app_client(odd_model)
    jid = _submit(c, "depth_image", {"prompt": "a red box"}, {"depth": depth})
    _wait_done(c, jid)
    r = _result_json(c, jid, "result.json")
    assert r["steps"] == ODD.steps and r["guidance"] == ODD.guidance
    assert r["settings"]["steps"]["source"] == r["settings"]["guidance"]["source"] == "model"


def test_the_denoiser_runs_the_models_number_of_steps(odd_model, arrays64, tmp_path):
    """Progress is reported per denoising step: with no steps in the request, the stage counts the model's."""
    from concord.api.arrays import validate_arrays

    events = []
    ctx = JobContext(tmp_path, lambda stage, step, total, msg: events.append((stage, step, total)), threading.Event())
    arrays = validate_arrays(arrays64, T.ARRAYS)
    T.run(odd_model, schemas.TextureParams(prompt="a crate"), arrays, ctx)
    denoising = [(step, total) for stage, step, total in events if stage == "denoising"]
    assert {total for _, total in denoising} == {ODD.steps}
    assert [step for step, _ in denoising] == list(range(ODD.steps + 1))  # 0 on entering, then one per step


def test_views_larger_than_the_model_is_meant_for_are_flagged(tiny_model, arrays64, tmp_path):
    from concord.api.arrays import validate_arrays

    small = dataclasses.replace(tiny_model, recommended=dataclasses.replace(ODD, max_view_size=56, native_size=56))
    ctx = JobContext(tmp_path, lambda *a: None, threading.Event())
    m = T.run(small, schemas.TextureParams(prompt="x", steps=1), validate_arrays(arrays64, T.ARRAYS), ctx)
    assert len(m["warnings"]) == 1 and "64 px" in m["warnings"][0] and "56 px" in m["warnings"][0]
    ctx = JobContext(tmp_path / "b", lambda *a: None, threading.Event())
    (tmp_path / "b").mkdir()
    m = T.run(tiny_model, schemas.TextureParams(prompt="x", steps=1), validate_arrays(arrays64, T.ARRAYS), ctx)
    assert m["warnings"] == []


# ----------------------------------------------------------------------------------------------- the CLI


def test_concord_models_verbose_lists_each_models_settings(capsys):
    assert cli_main(["models", "-v"]) == 0
    out = capsys.readouterr().out
    for preset in registry.PRESETS.values():
        assert preset.recommended.describe() in out


def _check_cli_used_the_models(out: Path, rec: RecommendedSettings, stdout: str, model: str) -> None:
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"] == {
        "steps": {"value": rec.steps, "source": "model"},
        "guidance": {"value": rec.guidance, "source": "model"},
        "texture_size": {"value": rec.texture_size, "source": "model"},
        "view_size": {"value": rec.view_size, "source": "model"},
        "consistency.attention_correspondence": {"value": rec.attention_correspondence, "source": "model"},
    }
    assert m["view_size"] == [rec.view_size, rec.view_size] and m["texture_size"] == rec.texture_size
    assert f"steps {rec.steps} (model {model}'s)" in stdout and f"view size {rec.view_size} (model {model}'s)" in stdout


def test_concord_texture_with_no_options_uses_the_models_settings(tmp_path, capsys):
    rec = registry.PRESETS["tiny"].recommended
    out = tmp_path / "local"
    rc = cli_main(
        ["texture", str(BOX), "--prompt", "a crate", "--unwrap", "--model", "tiny", "--device", "cpu", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_cli_used_the_models(out, rec, captured.out, "tiny")

    # what the user sets wins, and is recorded as set
    out = tmp_path / "set"
    rc = cli_main(["texture", str(BOX), "--prompt", "a crate", "--unwrap", "--model", "tiny", "--device", "cpu",
                   "--steps", "2", "--view-size", "72", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["steps"] == {"value": 2, "source": "user"}
    assert m["settings"]["view_size"] == {"value": 72, "source": "user"} and m["view_size"] == [72, 72]
    assert m["settings"]["guidance"] == {"value": rec.guidance, "source": "model"}


def test_concord_texture_on_a_server_uses_the_servers_model(tmp_path, capsys):
    from concord.serve_process import ServerProcess

    out = tmp_path / "remote"
    with ServerProcess(tmp_path / "data", model="tiny") as server:
        rc = cli_main(
            ["texture", str(BOX), "--prompt", "a crate", "--unwrap", "--server", server.url, "--out", str(out)]
        )
        captured = capsys.readouterr()
        assert rc == 0, captured.err + server.output()
    _check_cli_used_the_models(out, registry.PRESETS["tiny"].recommended, captured.out, "tiny")
