"""Helpers for tests that drive `JobManager` directly with a small executor (the worker logic under test)."""

from __future__ import annotations

import threading

from concord.api.schemas import JobState, JobStatus
from concord.jobs.context import JobContext
from concord.jobs.manager import JobManager
from tests.harness import HANG_GUARD_S


class Params:
    """Stands in for a pydantic params model: the manager only calls `model_dump`."""

    def model_dump(self, mode: str = "python") -> dict:
        return {"prompt": "x"}


def write_one_file(job, ctx: JobContext) -> None:
    ctx.stage("writing", 1)
    (ctx.out_dir / "out.txt").write_text(job.id)
    ctx.advance(1)


def wait_finished(manager: JobManager, job_id: str) -> JobStatus:
    """The job's status once it is done, failed or cancelled. The bound only guards against a hang."""
    pause = threading.Event()
    for _ in range(int(HANG_GUARD_S / 0.005)):
        st = manager.status(job_id)
        if st.state in (JobState.done, JobState.failed, JobState.cancelled):
            return st
        pause.wait(0.005)
    raise AssertionError(f"job {job_id} never finished: {manager.status(job_id)}")


def submit(m: JobManager) -> str:
    return m.submit("depth_image", Params(), {}).id
