"""The `stylize` job over HTTP: the real app with the tiny model; frames, metrics, the mask, and malformed requests
answered 4xx with the field named."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from concord.pipelines.stylize import frame_name
from tests.api.helpers import job_files, wait_for
from concord.micro.animation import spinning_frames




def test_stylize_job_over_http_writes_every_frame_and_keeps_the_unmasked_input(client):
    fs, prompt = spinning_frames(3)
    mask = fs.depth > 0
    arrays = {"image": fs.image, "depth": fs.depth, "motion": fs.motion, "mask": mask}
    r = client.post("/v1/jobs", files=job_files("stylize", {"prompt": prompt, "steps": 2, "first_frame": 10}, arrays))
    assert r.status_code == 202, r.text
    st = wait_for(client, r.json()["id"])
    assert st["state"] == "done", st
    assert {f"frames/{frame_name(10 + i)}" for i in range(3)} <= set(st["files"]) and "metrics.json" in st["files"]
    zf = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{st['id']}/result").content))
    out = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(f"frames/{frame_name(10 + i)}")))) for i in range(3)])
    assert np.array_equal(out[~mask], fs.image[~mask])  # outside the mask the input is kept exactly
    m = json.loads(zf.read("metrics.json"))
    assert m["frames"] == 3 and len(m["warping_error"]["per_frame"]) == 3 and m["settings"]["steps"]["source"] == "user"


@pytest.mark.parametrize("arrays,field", [
    (lambda fs: {"image": fs.image, "depth": fs.depth[:, :32]}, "arrays.depth"),
    (lambda fs: {"image": fs.image, "depth": np.where(fs.depth > 0, np.nan, 0).astype(np.float32)}, "arrays.depth"),
    (lambda fs: {"image": fs.image, "depth": fs.depth}, "arrays.motion"),  # warped noise without motion
])
def test_malformed_stylize_requests_are_4xx_naming_the_field(client, arrays, field):
    fs, prompt = spinning_frames(2)
    r = client.post("/v1/jobs", files=job_files("stylize", {"prompt": prompt, "steps": 2}, arrays(fs)))
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text, r.text


def test_a_sequence_streams_in_requests_and_the_server_keeps_only_its_state(client, tmp_path):
    fs, prompt = spinning_frames(4)
    ids = []
    for a, b in [(0, 2), (2, 4)]:
        arrays = {"image": fs.image[a:b], "depth": fs.depth[a:b], "motion": fs.motion[a:b]}
        params = {"prompt": prompt, "steps": 2, "sequence": "shot-A", "first_frame": a, "sequence_frames": 4}
        r = client.post("/v1/jobs", files=job_files("stylize", params, arrays))
        assert r.status_code == 202, r.text
        st = wait_for(client, r.json()["id"])
        assert st["state"] == "done", st
        assert sorted(f for f in st["files"] if f.startswith("frames/")) == [f"frames/{frame_name(i)}" for i in range(a, b)]
        ids.append(st["id"])
    bad = client.post("/v1/jobs", files=job_files("stylize", {"prompt": prompt, "steps": 2, "sequence": "bad name!"},
                                                  {"image": fs.image, "depth": fs.depth, "motion": fs.motion}))
    assert bad.status_code == 422 and "sequence" in bad.text


def test_a_finished_request_whose_result_was_missed_can_be_repeated(client):
    fs, prompt = spinning_frames(4)
    params = {"prompt": prompt, "steps": 2, "sequence": "shot-B", "first_frame": 0, "sequence_frames": 4}
    arrays = {"image": fs.image[:2], "depth": fs.depth[:2], "motion": fs.motion[:2]}
    first = wait_for(client, client.post("/v1/jobs", files=job_files("stylize", params, arrays)).json()["id"])
    assert first["state"] == "done", first
    # the client lost that result: the same request again with resume gives the same frames, nothing recomputed
    again = wait_for(client, client.post("/v1/jobs", files=job_files("stylize", {**params, "resume": True}, arrays)).json()["id"])
    assert again["state"] == "done", again
    zf = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{again['id']}/result").content))
    assert json.loads(zf.read("metrics.json"))["denoiser_calls"] == 0
    zf1 = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{first['id']}/result").content))
    assert zf.read(f"frames/{frame_name(1)}") == zf1.read(f"frames/{frame_name(1)}")
