"""The real `concord serve` process on a free loopback port, driven by the add-on's stdlib client."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blender_addon.core.client import ConcordClient, JobCancelledError, ServerError
from concord.serve_process import ServerProcess, free_port
from tests.api.helpers import sphere_depth


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("serve"), token="t0k") as srv:
        yield srv


def test_job_round_trip_through_a_real_server(server, tmp_path):
    client = ConcordClient(server.url, token="t0k")
    health = client.health()
    assert health["model"] == "tiny" and health["protocol_version"] == 2
    seen = []
    job_id = client.submit("depth_image", {"prompt": "a blue ball", "steps": 4, "seed": 1}, {"depth": sphere_depth(64)})
    final = client.wait(job_id, on_progress=seen.append, poll=0.02)
    assert final["state"] == "done"
    paths = client.download_result(job_id, tmp_path / "result")
    assert {p.name for p in paths} == {"image.png", "control.png", "result.json"}
    assert np.asarray(Image.open(tmp_path / "result" / "image.png")).shape == (64, 64, 3)
    assert seen and seen[-1].state == "done"


def test_client_errors_are_clear(server):
    with pytest.raises(ServerError) as e:
        ConcordClient(server.url).health()
    assert e.value.status == 401 and "token" in str(e.value)
    client = ConcordClient(server.url, token="t0k")
    with pytest.raises(ServerError) as e:
        client.submit("depth_image", {"prompt": "x", "steps": 0}, {"depth": sphere_depth(64)})
    assert e.value.status == 422 and e.value.field == "params.steps"
    with pytest.raises(ServerError) as e:
        ConcordClient(f"http://127.0.0.1:{free_port()}").health()
    assert "connection refused" in str(e.value) and "concord serve" in str(e.value)


def test_cancel_through_the_client(server):
    client = ConcordClient(server.url, token="t0k")
    job_id = client.submit("depth_image", {"prompt": "x", "steps": 200}, {"depth": sphere_depth(64)})
    with pytest.raises(JobCancelledError):
        client.wait(job_id, poll=0.02, should_cancel=lambda: True)
    assert client.status(job_id)["state"] == "cancelled"


def _serve(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "concord.cli", "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_binding_a_public_address_needs_a_token(tmp_path):
    r = _serve("--host", "0.0.0.0", "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert "needs a token" in r.stderr and "Traceback" not in r.stderr


def test_a_real_preset_offline_fails_at_start_naming_the_model(tmp_path):
    r = _serve("--model", "sd15-depth", "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    for needle in ("sd15-depth", "stable-diffusion-v1-5/stable-diffusion-v1-5", "lllyasviel/control_v11f1p_sd15_depth", "hf download"):
        assert needle in r.stderr, r.stderr
    assert "serving on" not in r.stdout  # never half-started
