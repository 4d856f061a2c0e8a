"""The add-on's worker thread (blender_addon/core/jobs.py) against a real `concord serve --model tiny`.

No bpy: the worker's contract is that it posts Progress messages and exactly ONE final message (Done,
Failed or Cancelled) as the last one, that Done means every file is on disk, and that cancel reaches the
server. The depth_image job kind exercises the same plumbing as texture.
"""

from __future__ import annotations

import queue

import numpy as np
import pytest

from blender_addon.core import jobs
from blender_addon.core.client import ConcordClient
from concord.serve_process import ServerProcess
from tests.harness import InProcessServer, StepGate, worker_messages


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


def _all(worker) -> list:
    return worker_messages(worker)


def _final_state(client, job_id) -> str:
    """The job's state once the server has finished with it (the worker may report Cancelled first: it does not
    wait for a slow server to confirm, see jobs.CANCEL_GRACE_S)."""
    try:
        return client.wait(job_id, poll=0.01)["state"]
    except jobs.JobCancelledError:
        return "cancelled"


def test_done_after_progress_files_on_disk(server, tmp_path):
    w = _worker(server.url, tmp_path).start()
    msgs = _all(w)
    final = msgs[-1]
    assert isinstance(final, jobs.Done), final
    assert sum(isinstance(m, jobs.FINAL) for m in msgs) == 1
    stages = [m.stage for m in msgs if isinstance(m, jobs.Progress)]
    assert stages[0] == "connecting" and "uploading" in stages and stages[-1] == "downloading"
    assert (final.out_dir / "image.png").is_file() and all(p.is_file() for p in final.files)
    assert {"upload_s", "server_s", "download_s"} <= set(final.timings)


class _SubmitsThenWaitsForDone(ConcordClient):
    """A client whose submit returns only once the job is done on the server: the worker's first status
    read then already says "done", the case where a fast job finishes between two polls."""

    def submit(self, kind, params, arrays=None):
        job_id = super().submit(kind, params, arrays)
        ConcordClient(self.url).wait(job_id, poll=0.01)
        return job_id


def test_done_job_reports_complete_progress_even_if_it_finished_between_polls(server, tmp_path):
    w = jobs.JobWorker(lambda: _SubmitsThenWaitsForDone(server.url, None, 10.0), "depth_image",
                       {"prompt": "a cube", "steps": 2}, _depth(), tmp_path / "out", poll=0.05)
    msgs = _all(w.start())
    assert isinstance(msgs[-1], jobs.Done), msgs[-1]
    server_progress = [m for m in msgs if isinstance(m, jobs.Progress) and m.stage not in ("connecting", "uploading", "downloading")]
    assert len(server_progress) == 1, server_progress  # the job was done at the first read
    last = server_progress[-1]
    assert last.total > 0 and last.step == last.total and last.fraction == 1.0, last


def test_run_blocking_returns_final(server, tmp_path):
    seen = []
    final = jobs.run_blocking(_worker(server.url, tmp_path), on_message=seen.append)
    assert isinstance(final, jobs.Done) and seen[-1] is final


def test_cancel_reaches_server(tiny_model, tmp_path):
    # The real app on a loopback port in this process, so the test can hold the job mid-run: cancel then
    # arrives while the job is certainly running, however fast or slow the machine is.
    with InProcessServer(tiny_model, tmp_path / "data") as srv, StepGate(tiny_model.pipe.unet) as gate:
        w = _worker(srv.url, tmp_path, {"prompt": "slow", "steps": 5}).start()
        gate.wait_reached()
        w.cancel()
        # the worker turns the cancel into POST /cancel; the job stops once the gated step returns
        client = ConcordClient(srv.url)
        while client.status(w.job_id)["message"] != "cancelling":
            w.join(0.01)
        gate.release()
        msgs = _all(w)
        assert isinstance(msgs[-1], jobs.Cancelled), msgs[-1]
        assert _final_state(client, w.job_id) == "cancelled"
        assert gate.calls == 1, "no step starts after the cancel"
    assert not (tmp_path / "out").exists(), "nothing is downloaded for a cancelled job"


def test_cancel_before_submit_sends_nothing(server, tmp_path):
    before = len(ConcordClient(server.url)._json("GET", "/v1/jobs")["jobs"])
    w = _worker(server.url, tmp_path)
    w.cancel()
    msgs = _all(w.start())
    assert isinstance(msgs[-1], jobs.Cancelled)
    assert len(ConcordClient(server.url)._json("GET", "/v1/jobs")["jobs"]) == before


def test_server_down_is_failed(tmp_path, free_port):
    msgs = _all(_worker(f"http://127.0.0.1:{free_port}", tmp_path).start())
    assert isinstance(msgs[-1], jobs.Failed)
    assert "connection refused" in msgs[-1].message and "concord serve" in msgs[-1].hint


def test_rejected_job_is_failed_with_reason(server, tmp_path):
    msgs = _all(_worker(server.url, tmp_path, {"prompt": "x", "steps": 0}).start())
    assert isinstance(msgs[-1], jobs.Failed)
    assert "steps" in str(msgs[-1])


def test_messages_queue_is_fifo_and_drain_never_blocks():
    q = queue.SimpleQueue()
    assert jobs.drain(q) == []
    items = [jobs.Progress("a", 1, 2), jobs.Progress("b"), jobs.Failed("x", "y")]
    for m in items:
        q.put(m)
    assert jobs.drain(q) == items
    assert jobs.Progress("d", 1, 4).fraction == 0.25 and jobs.Progress("d").fraction == 0.0
    assert str(jobs.Failed("down", "start it")) == "down (start it)"
