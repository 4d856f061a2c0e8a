"""Faults outside a job's own code fail that job, clearly, and the worker goes on; a dead worker is reported.

The faults are injected by patching the calls the worker makes (`os.replace`, `Path.mkdir`, the job.json
writer) so that they raise for one chosen job, like a full disk or a read-only data dir would. Patching is used
instead of `chmod`: the tests run as root, and root writes into a read-only folder anyway, so a permission-based
fault would not fire. After each fault a normal job runs to completion on the same manager.

Most tests drive `JobManager` with a small executor (the worker's own logic is what is under test); the last
ones go through the real app with the `tiny` model.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from concord.api.schemas import JobState
from concord.jobs import manager as M
from concord.jobs.manager import JobManager, NotAccepting, StorageError
from tests.api.helpers import job_files, wait_for
from tests.api.manager_helpers import submit, wait_finished, write_one_file
from tests.harness import HANG_GUARD_S


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "data", write_one_file, max_queue=4)
    m.start()
    yield m
    m.stop()


def assert_normal_job_completes(m: JobManager) -> None:
    jid = submit(m)
    st = wait_finished(m, jid)
    assert st.state == JobState.done, st
    assert st.files == ["out.txt"]
    assert (m.result_dir(jid) / "out.txt").read_text() == jid
    assert m.worker_problem is None


def assert_failed_cleanly(m: JobManager, jid: str, *needles: str) -> None:
    st = wait_finished(m, jid)
    assert st.state == JobState.failed, st
    for needle in needles:
        assert needle in st.error.error, st.error
    assert str(m.data_dir) in st.error.hint and "disk space" in st.error.hint
    assert not m.result_dir(jid).exists() and not (m.job_dir(jid) / M.PARTIAL_DIR).exists()
    assert st.files == []


def test_final_rename_failing_fails_that_job_and_the_next_job_completes(manager, monkeypatch):
    doomed: set[str] = set()
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if Path(src).name == M.PARTIAL_DIR and Path(src).parent.name in doomed:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(M.os, "replace", replace)
    gate = threading.Event()
    manager._executor = lambda job, ctx: (gate.wait(HANG_GUARD_S), write_one_file(job, ctx))
    jid = submit(manager)
    doomed.add(jid)
    gate.set()
    assert_failed_cleanly(manager, jid, "could not write the job's results to", "No space left on device")
    assert manager.status(jid).error.error.startswith(f"could not write the job's results to {manager.result_dir(jid)}")
    # the failure is on disk too: a restart reports it failed, not interrupted
    assert M.JobStatus.model_validate_json((manager.job_dir(jid) / "job.json").read_text()).state == JobState.failed
    assert_normal_job_completes(manager)


def test_result_folder_that_cannot_be_created_fails_that_job(manager, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name == M.PARTIAL_DIR and not getattr(mkdir, "used", False):
            mkdir.used = True
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    jid = submit(manager)
    assert_failed_cleanly(manager, jid, "could not create the job's result folder", "PermissionError")
    assert_normal_job_completes(manager)


def test_job_json_unwritable_keeps_the_in_memory_state_truthful(manager, monkeypatch):
    """Every write of this job's job.json fails after submit (the failed state included): memory says failed."""
    doomed: set[str] = set()
    real_write = M._write_json_atomic

    def write(path, data):
        if path.parent.name in doomed:
            raise OSError(30, "Read-only file system")
        return real_write(path, data)

    monkeypatch.setattr(M, "_write_json_atomic", write)
    gate = threading.Event()
    calls = []
    manager._executor = lambda job, ctx: (gate.wait(HANG_GUARD_S), calls.append(job.id), write_one_file(job, ctx))
    first = submit(manager)  # holds the worker until the second job is doomed
    second = submit(manager)
    doomed.add(second)
    gate.set()
    assert wait_finished(manager, first).state == JobState.done
    assert_failed_cleanly(manager, second, "could not record the job's state in", "Read-only file system")
    assert second not in calls  # the job never ran: its state could not be recorded
    # on disk it is still "queued": a restart would report it interrupted, never done
    on_disk = M.JobStatus.model_validate_json((manager.job_dir(second) / "job.json").read_text())
    assert on_disk.state == JobState.queued
    assert_normal_job_completes(manager)


def test_done_that_cannot_be_recorded_is_a_failure_without_a_result(manager, monkeypatch):
    real_write = M._write_json_atomic

    def write(path, data):
        if data["state"] == "done" and not getattr(write, "used", False):
            write.used = True
            raise OSError(5, "Input/output error")
        return real_write(path, data)

    monkeypatch.setattr(M, "_write_json_atomic", write)
    jid = submit(manager)
    assert_failed_cleanly(manager, jid, "could not record the finished job in", "Input/output error")
    assert_normal_job_completes(manager)


def test_submit_that_cannot_be_stored_is_refused_and_leaves_nothing(manager, monkeypatch):
    real_write_text = Path.write_text

    def write_text(self, *a, **k):
        if self.name == "request.json":
            raise OSError(28, "No space left on device")
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(StorageError) as e:
        submit(manager)
    assert "could not store the job in" in str(e.value) and "No space left" in str(e.value)
    assert "disk space" in e.value.hint
    assert list(manager.jobs_dir.iterdir()) == [] and manager.queue_length == 0
    monkeypatch.undo()
    assert_normal_job_completes(manager)


class Fatal(BaseException):
    """Not an Exception: what a bug or an interpreter-level exit looks like to the worker."""


def test_a_dead_worker_fails_its_jobs_and_refuses_new_ones(tmp_path):
    gate = threading.Event()

    def executor(job, ctx):
        gate.wait(HANG_GUARD_S)
        raise Fatal("boom")

    m = JobManager(tmp_path / "data", executor, max_queue=4)
    m.start()
    try:
        running, queued = submit(m), submit(m)
        gate.set()
        for jid in (running, queued):
            st = wait_finished(m, jid)
            assert st.state == JobState.failed and "the job worker stopped (Fatal: boom)" in st.error.error
            assert "restart" in st.error.hint
        assert "Fatal: boom" in m.worker_problem
        with pytest.raises(NotAccepting) as e:
            submit(m)
        assert "cannot run jobs" in str(e.value) and "restart" in e.value.hint
    finally:
        m.stop()


# --------------------------------------------------------------------------------------------- through the app


def test_fault_through_the_app_then_a_normal_job_completes(client, monkeypatch):
    calls = {"n": 0}
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if Path(src).name == M.PARTIAL_DIR:
            calls["n"] += 1
            if calls["n"] == 1:
                raise PermissionError(13, "Permission denied")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(M.os, "replace", replace)
    first = client.post("/v1/jobs", files=job_files()).json()["id"]
    st = wait_for(client, first)
    assert st["state"] == "failed"
    assert st["error"]["error"].startswith("could not write the job's results to") and "PermissionError" in st["error"]["error"]
    assert "disk space" in st["error"]["hint"]
    assert client.get(f"/v1/jobs/{first}/result").status_code == 409
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["worker_alive"] is True and health["problem"] is None
    second = client.post("/v1/jobs", files=job_files()).json()["id"]
    assert wait_for(client, second)["state"] == "done"
    assert client.get(f"/v1/jobs/{second}/result/image.png").status_code == 200


@contextmanager
def fatal_denoiser(model):
    """The model's UNet raises `Fatal` (not an Exception) on every call while the block runs."""
    unet = model.pipe.unet
    had_own_forward, original = "forward" in vars(unet), unet.forward

    def fatal(*a, **k):
        raise Fatal("the device went away")

    unet.forward = fatal
    try:
        yield
    finally:
        if had_own_forward:
            unet.forward = original
        else:
            del unet.forward


def test_dead_worker_through_the_app_health_says_degraded_and_jobs_get_503(client, tiny_model):
    with fatal_denoiser(tiny_model):
        jid = client.post("/v1/jobs", files=job_files()).json()["id"]
        st = wait_for(client, jid)
    assert st["state"] == "failed" and "the job worker stopped" in st["error"]["error"]
    health = client.get("/v1/health").json()
    assert health["status"] == "degraded" and health["worker_alive"] is False
    assert "the device went away" in health["problem"]
    r = client.post("/v1/jobs", files=job_files())
    assert r.status_code == 503
    assert "cannot run jobs" in r.json()["error"] and "restart" in r.json()["hint"]


def test_add_on_client_reports_a_degraded_server(tiny_model, tmp_path):
    """The add-on's health check (Check Server, and the first step of every job) turns a degraded server into a
    clear error instead of sending work that would be refused."""
    from blender_addon.core.client import ConcordClient, ServerError
    from tests.harness import InProcessServer

    with InProcessServer(tiny_model, tmp_path / "data") as srv:
        client = ConcordClient(srv.url)
        assert client.health()["status"] == "ok"
        with fatal_denoiser(tiny_model):
            depth = np.zeros((64, 64), np.float32)
            depth[16:48, 16:48] = 2.0
            jid = client.submit("depth_image", {"prompt": "x", "steps": 2}, {"depth": depth})
            with pytest.raises(ServerError):
                client.wait(jid, poll=0.01)
        with pytest.raises(ServerError, match="cannot run jobs now") as info:
            client.health()
        assert "restart" in info.value.hint
