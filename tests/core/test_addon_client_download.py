"""The add-on client's download: results appear in their folder only once complete (a partial folder renamed
into place, as the server does with its own results), and the loopback test the add-on's online-access rule
relies on.

Against the real app on a loopback port (in this process) with the tiny model; the faults are injected into
the client's own steps (a truncated archive, a disk write that fails half way).
"""

from __future__ import annotations

import numpy as np
import pytest

from blender_addon.core.client import ConcordClient, ServerError, is_loopback_url
from tests.harness import InProcessServer


@pytest.fixture(scope="module")
def finished_job(tiny_model, tmp_path_factory):
    with InProcessServer(tiny_model, tmp_path_factory.mktemp("data")) as srv:
        client = ConcordClient(srv.url)
        depth = np.zeros((64, 64), np.float32)
        depth[16:48, 16:48] = 2.0
        job_id = client.submit("depth_image", {"prompt": "a cube", "steps": 2}, {"depth": depth})
        assert client.wait(job_id, poll=0.02)["state"] == "done"
        yield client, job_id


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_complete_download_lands_in_place(finished_job, tmp_path):
    client, job_id = finished_job
    out = tmp_path / "result"
    paths = client.download_result(job_id, out)
    assert sorted(p.name for p in paths) == ["control.png", "image.png", "result.json"]
    assert all(p.is_file() and p.parent == out.resolve() for p in paths)
    assert _leftovers(tmp_path) == ["result"], "no partial folder is left beside the result"


def test_truncated_archive_leaves_nothing_that_looks_finished(finished_job, tmp_path, monkeypatch):
    client, job_id = finished_job
    whole = client.result_zip(job_id)
    monkeypatch.setattr(client, "result_zip", lambda _id: whole[: len(whole) // 2])
    with pytest.raises(ServerError, match="damaged") as info:
        client.download_result(job_id, tmp_path / "result")
    assert info.value.hint
    assert _leftovers(tmp_path) == []


def test_disk_error_half_way_leaves_nothing_that_looks_finished(finished_job, tmp_path, monkeypatch):
    client, job_id = finished_job
    from pathlib import Path

    real_write = Path.write_bytes
    written = []

    def failing_write(self, data):
        if written:
            raise OSError(28, "No space left on device")
        written.append(self)
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError, match="No space"):
        client.download_result(job_id, tmp_path / "result")
    assert len(written) == 1, "the fault struck after the first file"
    assert _leftovers(tmp_path) == []


def test_refuses_a_folder_that_already_has_files(finished_job, tmp_path):
    client, job_id = finished_job
    out = tmp_path / "result"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ServerError, match="already has files"):
        client.download_result(job_id, out)
    assert _leftovers(out) == ["mine.txt"]
    (out / "mine.txt").unlink()  # an empty existing folder is fine
    assert len(client.download_result(job_id, out)) == 3


@pytest.mark.parametrize(
    "url, loopback",
    [
        ("http://127.0.0.1:8765", True),
        ("http://127.5.6.7", True),
        ("http://localhost:8765/", True),
        ("http://LOCALHOST", True),
        ("http://[::1]:8765", True),
        ("https://192.168.1.20:8765", False),
        ("http://10.0.0.2", False),
        ("http://example.com", False),
        ("http://127.0.0.1.example.com", False),
        ("http://[::2]", False),
        ("not a url", False),
        ("", False),
    ],
)
def test_is_loopback_url(url, loopback):
    assert is_loopback_url(url) is loopback
