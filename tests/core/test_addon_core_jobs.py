"""The add-on's worker thread (blender_addon/core/jobs.py) against a real `concord serve --model tiny`.

No bpy: the worker's contract is that it posts Progress messages and exactly ONE final message (Done,
Failed or Cancelled) as the last one, that Done means every file is on disk, and that cancel reaches the
server. The depth_image job kind exercises the same plumbing as texture.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from blender_addon.core import jobs
from blender_addon.core.client import ConcordClient
from concord.serve_process import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("data"), model="tiny") as s:
        yield s


def _depth(n=64):
    d = np.zeros((n, n), np.float32)
    d[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 2.0
    return {"depth": d}


def _worker(url, tmp_path, params=None, arrays=None, token=None):
    params = params or {"prompt": "a cube", "steps": 2}
    return jobs.JobWorker(lambda: ConcordClient(url, token, 10.0), "depth_image", params, arrays or _depth(), tmp_path / "out", poll=0.05)


def _all(worker, timeout=120.0):
    msgs, t0 = [], time.monotonic()
    while time.monotonic() - t0 < timeout:
        msgs += worker.drain()
        if msgs and isinstance(msgs[-1], jobs.FINAL):
            worker.join(5)
            time.sleep(0.1)
            assert worker.drain() == [], "nothing may follow the final message"
            return msgs
        time.sleep(0.02)
    raise AssertionError(f"no final message in {timeout} s: {msgs}")


def test_done_after_progress_files_on_disk(server, tmp_path):
    w = _worker(server.url, tmp_path).start()
    msgs = _all(w)
    final = msgs[-1]
    assert isinstance(final, jobs.Done), final
    assert sum(isinstance(m, jobs.FINAL) for m in msgs) == 1
    stages = [m.stage for m in msgs if isinstance(m, jobs.Progress)]
    assert stages[0] == "connecting" and "uploading" in stages and stages[-1] == "downloading"
    assert any(m.total > 0 and m.step == m.total for m in msgs if isinstance(m, jobs.Progress))
    assert (final.out_dir / "image.png").is_file() and all(p.is_file() for p in final.files)
    assert {"upload_s", "server_s", "download_s"} <= set(final.timings)


def test_run_blocking_returns_final(server, tmp_path):
    seen = []
    final = jobs.run_blocking(_worker(server.url, tmp_path), on_message=seen.append)
    assert isinstance(final, jobs.Done) and seen[-1] is final


def test_cancel_reaches_server(server, tmp_path):
    w = _worker(server.url, tmp_path, {"prompt": "slow", "steps": 200}, _depth(256)).start()
    client = ConcordClient(server.url)
    t0 = time.monotonic()
    while w.job_id is None or client.status(w.job_id)["step"] < 1:
        assert time.monotonic() - t0 < 60
        time.sleep(0.02)
    w.cancel()
    msgs = _all(w, 60)
    assert isinstance(msgs[-1], jobs.Cancelled), msgs[-1]
    assert client.status(w.job_id)["state"] == "cancelled"
    assert not (tmp_path / "out").exists(), "nothing is downloaded for a cancelled job"


def test_cancel_before_submit_sends_nothing(server, tmp_path):
    before = len(ConcordClient(server.url)._json("GET", "/v1/jobs")["jobs"])
    w = _worker(server.url, tmp_path)
    w.cancel()
    msgs = _all(w.start())
    assert isinstance(msgs[-1], jobs.Cancelled)
    assert len(ConcordClient(server.url)._json("GET", "/v1/jobs")["jobs"]) == before


def test_server_down_is_failed(tmp_path, free_port):
    msgs = _all(_worker(f"http://127.0.0.1:{free_port}", tmp_path).start(), 30)
    assert isinstance(msgs[-1], jobs.Failed)
    assert "connection refused" in msgs[-1].message and "concord serve" in msgs[-1].hint


def test_rejected_job_is_failed_with_reason(server, tmp_path):
    msgs = _all(_worker(server.url, tmp_path, {"prompt": "x", "steps": 0}).start())
    assert isinstance(msgs[-1], jobs.Failed)
    assert "steps" in str(msgs[-1])


def test_messages_queue_is_fifo_and_drain_never_blocks():
    import queue

    q = queue.SimpleQueue()
    assert jobs.drain(q) == []
    items = [jobs.Progress("a", 1, 2), jobs.Progress("b"), jobs.Failed("x", "y")]
    for m in items:
        q.put(m)
    assert jobs.drain(q) == items
    assert jobs.Progress("d", 1, 4).fraction == 0.25 and jobs.Progress("d").fraction == 0.0
    assert str(jobs.Failed("down", "start it")) == "down (start it)"
