"""The queue tells the truth: a cancelled queued job frees its slot at once, nothing is queued while the server
stops, and a status read never mixes two progress updates.

Jobs are held with events (a gated executor, or `StepGate` on the real model), never with sleeps.
"""

from __future__ import annotations

import threading

import pytest

from concord.api.schemas import JobState
from concord.jobs.manager import JobManager, NotAccepting, QueueFull
from tests.api.helpers import job_files, wait_for
from tests.api.manager_helpers import submit, wait_finished, write_one_file
from tests.harness import HANG_GUARD_S, StepGate


class Gated:
    """An executor whose jobs each wait for `release` (or cancel) after announcing themselves in `started`."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, job, ctx) -> None:
        self.started.set()
        self.release.wait(HANG_GUARD_S)
        ctx.raise_if_cancelled()
        write_one_file(job, ctx)


def test_cancelled_queued_job_frees_its_slot_at_once(tmp_path):
    gate = Gated()
    m = JobManager(tmp_path / "data", gate, max_queue=2)
    m.start()
    try:
        running = submit(m)
        assert gate.started.wait(HANG_GUARD_S)
        a, b = submit(m), submit(m)
        assert m.queue_length == 2
        with pytest.raises(QueueFull):
            submit(m)
        assert m.cancel(a).state == JobState.cancelled
        assert m.queue_length == 1  # the slot is free now, while the worker is still busy with `running`
        c = submit(m)  # accepted: the queue had room
        assert m.queue_length == 2
        with pytest.raises(QueueFull):
            submit(m)
        gate.release.set()
        for jid in (running, b, c):
            assert wait_finished(m, jid).state == JobState.done
        assert m.status(a).state == JobState.cancelled and m.status(a).files == []
    finally:
        m.stop()


def test_submit_while_stopping_is_refused_and_queued_jobs_are_failed(tmp_path):
    gate = Gated()
    m = JobManager(tmp_path / "data", gate, max_queue=4)
    m.start()
    running = submit(m)
    assert gate.started.wait(HANG_GUARD_S)
    queued = submit(m)
    stopper = threading.Thread(target=m.stop)
    stopper.start()  # stop fails the queued job at once, then waits for the running one
    st = wait_finished(m, queued)
    assert st.state == JobState.failed and "shut down" in st.error.error and st.error.hint
    with pytest.raises(NotAccepting) as e:
        submit(m)
    assert "shutting down" in str(e.value) and e.value.hint
    assert m.queue_length == 0
    gate.release.set()
    stopper.join(HANG_GUARD_S)
    assert not stopper.is_alive()
    assert m.status(running).state == JobState.cancelled  # stop cancels what runs
    assert len(list(m.jobs_dir.iterdir())) == 2  # the refused job left nothing behind


class PausingMessage(str):
    """A progress message whose truth test pauses the update that carries it, halfway through."""

    def __new__(cls, text: str, reached: threading.Event, go: threading.Event):
        obj = super().__new__(cls, text)
        obj.reached, obj.go = reached, go
        return obj

    def __bool__(self) -> bool:
        self.reached.set()
        self.go.wait(HANG_GUARD_S)
        return True


def test_status_never_mixes_two_progress_updates(tmp_path):
    """While an update (stage, step, total, message) is half applied, no status can be read; after it, the status
    shows all of the new values."""
    reached, go, read = threading.Event(), threading.Event(), threading.Event()

    def executor(job, ctx):
        ctx.stage("one", 10, "first")
        ctx.advance(1, "step 1")
        ctx.stage("two", 20, PausingMessage("second", reached, go))
        read.wait(HANG_GUARD_S)

    m = JobManager(tmp_path / "data", executor)
    m.start()
    try:
        jid = submit(m)
        assert reached.wait(HANG_GUARD_S)  # the worker is inside the update to ("two", 0, 20, "second")
        snapshots = []
        reader = threading.Thread(target=lambda: snapshots.append(m.status(jid)))
        # The update holds the manager's lock: the reader cannot take a snapshot until the update is complete.
        assert not m._lock.acquire(blocking=False)
        reader.start()
        go.set()
        reader.join(HANG_GUARD_S)
        (st,) = snapshots
        assert (st.stage, st.step, st.total, st.message) == ("two", 0, 20, "second")
        read.set()
        assert wait_finished(m, jid).state == JobState.done
    finally:
        go.set()
        read.set()
        m.stop()


def test_cancel_queued_job_then_submit_through_the_app_is_202_not_429(make_client, tiny_model):
    client = make_client(max_queue=1)
    with StepGate(tiny_model.pipe.unet) as gate:
        first = client.post("/v1/jobs", files=job_files()).json()["id"]
        gate.wait_reached()  # the first job holds the worker until released
        second = client.post("/v1/jobs", files=job_files()).json()["id"]
        assert client.post("/v1/jobs", files=job_files()).status_code == 429
        assert client.post(f"/v1/jobs/{second}/cancel").json()["state"] == "cancelled"
        health = client.get("/v1/health").json()
        assert health["queue_length"] == 0 and health["busy"] is True
        third = client.post("/v1/jobs", files=job_files())  # room in the queue, so no 429
        assert third.status_code == 202, third.text
        assert client.get("/v1/health").json()["queue_length"] == 1
    assert wait_for(client, first)["state"] == "done"
    assert wait_for(client, third.json()["id"])["state"] == "done"
    assert client.get(f"/v1/jobs/{second}").json()["state"] == "cancelled"
