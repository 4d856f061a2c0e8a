"""The job routes through the real app (TestClient runs the lifespan): submit, poll, results, cancel, limits."""

from __future__ import annotations

import io
import json
import threading
import zipfile

import numpy as np
from PIL import Image

from tests.api.helpers import job_files, sphere_depth, wait_for
from tests.harness import StepGate


def test_health_reports_model_device_and_queue(client):
    h = client.get("/v1/health").json()
    assert h["protocol_version"] == 2
    assert h["model"] == "tiny" and h["device"] == "cpu" and h["dtype"] == "float32"
    assert h["queue_length"] == 0 and h["busy"] is False
    assert "depth_image" in h["job_kinds"]


def test_models_lists_presets_and_offline_availability(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["tiny"]["available_offline"] and models["tiny"]["loaded"]
    for name in ("sd15-depth", "sd2-depth", "sdxl-depth"):
        m = models[name]
        assert not m["available_offline"] and not m["loaded"]
        # the reason names what is missing and how to get it
        assert all(src in m["reason"] for src in m["sources"])
        assert "hf download" in m["reason"]


def test_depth_image_round_trip(client):
    r = client.post("/v1/jobs", files=job_files(params={"prompt": "a red ball", "steps": 3, "seed": 7}))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["kind"] == "depth_image"
    st = wait_for(client, job["id"])
    assert st["state"] == "done", st
    assert set(st["files"]) == {"image.png", "control.png", "result.json"}
    zf = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/result").content))
    assert sorted(zf.namelist()) == sorted(st["files"])
    img = np.asarray(Image.open(io.BytesIO(zf.read("image.png"))))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    meta = json.loads(client.get(f"/v1/jobs/{job['id']}/result/result.json").content)
    assert meta["seed"] == 7 and meta["steps"] == 3
    # the conditioning the model saw: background black, the object lit
    control = np.asarray(Image.open(io.BytesIO(zf.read("control.png"))).convert("L"))
    depth = sphere_depth()
    assert (control[depth == 0] == 0).all() and (control[depth > 0] > 0).all()


def test_same_seed_same_image_and_depth_changes_it(client):
    def run(depth, seed=3):
        r = client.post("/v1/jobs", files=job_files(params={"prompt": "a ball", "steps": 2, "seed": seed}, arrays={"depth": depth}))
        jid = r.json()["id"]
        assert wait_for(client, jid)["state"] == "done"
        return np.asarray(Image.open(io.BytesIO(client.get(f"/v1/jobs/{jid}/result/image.png").content)), dtype=np.int16)

    a, b = run(sphere_depth()), run(sphere_depth())
    assert np.array_equal(a, b)
    c = run(sphere_depth(radius=0.4))
    assert np.abs(a - c).mean() > 0.1  # the depth reaches the model through the ControlNet
    d = run(sphere_depth(), seed=4)
    assert np.abs(a - d).mean() > 0.5


def test_result_before_done_is_409_and_unknown_job_404(client, tiny_model):
    with StepGate(tiny_model.pipe.unet) as gate:
        jid = client.post("/v1/jobs", files=job_files(params={"prompt": "x", "steps": 2})).json()["id"]
        gate.wait_reached()  # the job is running and cannot finish until released
        early = client.get(f"/v1/jobs/{jid}/result")
        assert early.status_code == 409
        assert early.json()["field"] == "id" and early.json()["hint"]
        assert client.get(f"/v1/jobs/{jid}/result/image.png").status_code == 409
        client.post(f"/v1/jobs/{jid}/cancel")
    assert wait_for(client, jid)["state"] == "cancelled"
    for path in ("/v1/jobs/" + "0" * 32, "/v1/jobs/not-an-id", "/v1/jobs/../../etc/result"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert set(r.json()) == {"error", "field", "hint"}


def test_cancel_running_job_stops_within_one_step(client, tiny_model):
    # The gate holds the 3rd denoiser call: cancel arrives while exactly that step is in flight.
    with StepGate(tiny_model.pipe.unet, at_call=3) as gate:
        jid = client.post("/v1/jobs", files=job_files(params={"prompt": "x", "steps": 50})).json()["id"]
        gate.wait_reached()
        st = client.post(f"/v1/jobs/{jid}/cancel").json()
        assert st["state"] == "running" and st["message"] == "cancelling"
        gate.release()
        st = wait_for(client, jid)
        # the step in flight finishes; no step starts after the one that saw the cancel
        assert gate.calls == 3, gate.calls
    assert st["state"] == "cancelled"
    assert st["files"] == []
    assert client.get(f"/v1/jobs/{jid}/result").status_code == 409


def test_cancel_queued_job_and_queue_full_429(make_client, tiny_model):
    client = make_client(max_queue=1)
    with StepGate(tiny_model.pipe.unet) as gate:
        first = client.post("/v1/jobs", files=job_files(params={"prompt": "x", "steps": 2})).json()["id"]
        gate.wait_reached()  # the first job runs (and holds the worker) until released
        second = client.post("/v1/jobs", files=job_files()).json()["id"]
        third = client.post("/v1/jobs", files=job_files())
        assert third.status_code == 429
        assert third.headers.get("retry-after") and third.json()["hint"]
        assert client.get("/v1/health").json()["queue_length"] == 1
        st = client.post(f"/v1/jobs/{second}/cancel").json()
        assert st["state"] == "cancelled"
        client.post(f"/v1/jobs/{first}/cancel")
    assert wait_for(client, first)["state"] == "cancelled"
    # the worker skips the cancelled queued job and takes new work
    again = client.post("/v1/jobs", files=job_files()).json()["id"]
    assert wait_for(client, again)["state"] == "done"
    assert client.get(f"/v1/jobs/{second}").json()["state"] == "cancelled"


def test_finished_jobs_survive_a_restart_and_unfinished_ones_report_interrupted(make_client, tmp_path):
    data = tmp_path / "persist"
    c1 = make_client(data_dir=data)
    done_id = c1.post("/v1/jobs", files=job_files()).json()["id"]
    assert wait_for(c1, done_id)["state"] == "done"
    image = c1.get(f"/v1/jobs/{done_id}/result/image.png").content
    c1.__exit__(None, None, None)
    # simulate a crash mid-job: a record left "running" with a half-written result folder
    crashed = "f" * 32
    (data / "jobs" / crashed / "result.partial").mkdir(parents=True)
    (data / "jobs" / crashed / "result.partial" / "image.png").write_bytes(b"half")
    record = json.loads((data / "jobs" / done_id / "job.json").read_text())
    record.update(id=crashed, state="running", stage="denoising", files=[], finished_at=None)
    (data / "jobs" / crashed / "job.json").write_text(json.dumps(record))

    c2 = make_client(data_dir=data)
    assert c2.get(f"/v1/jobs/{done_id}").json()["state"] == "done"
    assert c2.get(f"/v1/jobs/{done_id}/result/image.png").content == image
    st = c2.get(f"/v1/jobs/{crashed}").json()
    assert st["state"] == "failed" and st["error"]["hint"]
    assert not (data / "jobs" / crashed / "result.partial").exists()
    assert c2.get(f"/v1/jobs/{crashed}/result").status_code == 409


def test_token_required_on_every_route_when_set(make_client):
    client = make_client(token="s3cret")
    for method, path in [("get", "/v1/health"), ("get", "/v1/models"), ("get", "/v1/jobs"), ("post", "/v1/jobs")]:
        r = getattr(client, method)(path)
        assert r.status_code == 401, path
        assert r.json()["field"] == "Authorization"
    assert client.get("/v1/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = client.post("/v1/jobs", files=job_files(), headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 202


def test_too_large_request_is_413_with_and_without_content_length(make_client):
    client = make_client(max_upload_mb=1)
    big = np.ones((1024, 1024), np.float32)  # 4 MiB
    r = client.post("/v1/jobs", files=job_files(arrays={"depth": big}))
    assert r.status_code == 413 and r.json()["hint"]

    def chunks():
        for _ in range(3):
            yield b"x" * (600 * 1024)

    r = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert client.get("/v1/health").status_code == 200


def test_concurrent_status_reads_while_job_runs(client):
    jid = client.post("/v1/jobs", files=job_files(params={"prompt": "x", "steps": 30})).json()["id"]
    errors = []

    def poll():
        for _ in range(30):
            r = client.get(f"/v1/jobs/{jid}")
            if r.status_code != 200:
                errors.append(r.status_code)

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert wait_for(client, jid)["state"] == "done"
