"""The job queue: explicit state, one worker thread that owns the device, results on disk before "done".

- `Job` is a record with a `JobState`; every state change is written to `<data_dir>/jobs/<id>/job.json`
  (atomically: a temp file then `os.replace`).
- The queue is bounded: `submit` raises `QueueFull` (the API answers 429) instead of growing without limit.
- One worker thread runs jobs one at a time. A job writes into `result.partial/`; only after the pipeline
  returned and every file is closed is the folder renamed to `result/` and the state set to done. A job that
  fails or is cancelled never has a `result/` folder.
- On start, jobs left queued or running by a previous process are marked failed ("interrupted"); finished jobs
  keep serving their results: nothing finished is ever lost.
- The in-memory index is bounded (`max_history` finished jobs); older jobs are read back from disk on demand.

No HTTP here and no model code: the API layer calls `submit/get/cancel`, the executor callable runs a job.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from concord.api.schemas import FINISHED_STATES, ErrorBody, JobState, JobStatus
from concord.jobs.context import JobCancelled, JobContext, JobInputError

log = logging.getLogger(__name__)

RESULT_DIR = "result"
PARTIAL_DIR = "result.partial"


class QueueFull(RuntimeError):
    pass


class JobNotFound(KeyError):
    pass


@dataclass
class Job:
    id: str
    kind: str
    state: JobState
    created_at: float
    params: Any = None  # validated pydantic params (memory only)
    arrays: dict | None = None  # validated arrays (memory only, dropped once the job ends)
    stage: str = "queued"
    step: int = 0
    total: int = 0
    message: str = ""
    error: ErrorBody | None = None
    started_at: float | None = None
    finished_at: float | None = None
    files: list[str] = field(default_factory=list)
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)

    def status(self) -> JobStatus:
        return JobStatus(
            id=self.id,
            kind=self.kind,
            state=self.state,
            stage=self.stage,
            step=self.step,
            total=self.total,
            message=self.message,
            error=self.error,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            files=list(self.files),
        )


Executor = Callable[[Job, JobContext], None]


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class JobManager:
    def __init__(
        self,
        data_dir: Path,
        executor: Executor,
        max_queue: int = 8,
        max_history: int = 500,
        on_error: Callable[[BaseException], ErrorBody] | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.max_queue = max_queue
        self.max_history = max_history
        self._executor = executor
        self._on_error = on_error or _default_error
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._recover()

    # ----------------------------------------------------------------------------------------------- state on disk
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def result_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / RESULT_DIR

    def _persist(self, job: Job) -> None:
        record = job.status().model_dump(mode="json")
        _write_json_atomic(self.job_dir(job.id) / "job.json", record)

    def _load_record(self, job_id: str) -> Job | None:
        path = self.job_dir(job_id) / "job.json"
        try:
            st = JobStatus.model_validate_json(path.read_text())
        except (OSError, ValueError):
            return None
        return Job(
            id=st.id,
            kind=st.kind,
            state=st.state,
            created_at=st.created_at,
            stage=st.stage,
            step=st.step,
            total=st.total,
            message=st.message,
            error=st.error,
            started_at=st.started_at,
            finished_at=st.finished_at,
            files=st.files,
        )

    def _recover(self) -> None:
        """Adopt jobs from a previous run: unfinished ones failed (interrupted), finished ones kept."""
        records = []
        for d in self.jobs_dir.iterdir():
            if not d.is_dir():
                continue
            job = self._load_record(d.name)
            if job is None:
                continue
            if job.state not in FINISHED_STATES:
                job.state = JobState.failed
                job.stage = "interrupted"
                job.finished_at = time.time()
                job.error = ErrorBody(
                    error="the server stopped before this job finished",
                    hint="submit the job again",
                )
                shutil.rmtree(d / PARTIAL_DIR, ignore_errors=True)
                self._persist(job)
            records.append(job)
        records.sort(key=lambda j: j.created_at)
        for job in records[-self.max_history :]:
            self._jobs[job.id] = job

    # ------------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="concord-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what runs, mark queued jobs failed (interrupted), and join the worker."""
        self._stopping.set()
        with self._lock:
            if self._running is not None:
                self._running.cancel_event.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.state == JobState.queued:
                self._finish(job, JobState.failed, error=ErrorBody(error="the server shut down before this job ran", hint="submit the job again"))
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ----------------------------------------------------------------------------------------------- public API
    def submit(self, kind: str, params: Any, arrays: dict) -> Job:
        with self._lock:
            if self._queue.full():
                raise QueueFull(f"{self.max_queue} jobs are already waiting")
            job = Job(id=uuid.uuid4().hex, kind=kind, state=JobState.queued, created_at=time.time(), params=params, arrays=arrays)
            self.job_dir(job.id).mkdir(parents=True)
            (self.job_dir(job.id) / "request.json").write_text(
                json.dumps({"kind": kind, "params": params.model_dump(mode="json")}, indent=2)
            )
            self._persist(job)
            self._jobs[job.id] = job
            self._queue.put_nowait(job)
            self._trim_history()
            return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None and _safe_id(job_id):
            job = self._load_record(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job.state == JobState.queued:
                self._finish(job, JobState.cancelled, message="cancelled before it started")
            elif job.state == JobState.running:
                job.cancel_event.set()
                job.message = "cancelling"
        return job

    @property
    def queue_length(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.state == JobState.queued)

    @property
    def busy(self) -> bool:
        return self._running is not None

    # ------------------------------------------------------------------------------------------------- worker
    def _trim_history(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINISHED_STATES]
        excess = len(self._jobs) - self.max_history
        if excess > 0:
            for job in sorted(finished, key=lambda j: j.created_at)[:excess]:
                del self._jobs[job.id]

    def _finish(self, job: Job, state: JobState, message: str = "", error: ErrorBody | None = None) -> None:
        with self._lock:
            job.state = state
            job.stage = state.value
            job.finished_at = time.time()
            job.message = message or job.message
            job.error = error
            job.arrays = None
            self._persist(job)

    def _progress(self, job: Job, stage: str, step: int, total: int, message: str) -> None:
        job.stage, job.step, job.total = stage, step, total
        if message:
            job.message = message

    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self._queue.get()
            if job is None:
                break
            with self._lock:
                if job.state != JobState.queued:
                    continue  # cancelled while waiting
                job.state = JobState.running
                job.stage = "starting"
                job.started_at = time.time()
                self._running = job
                self._persist(job)
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job) -> None:
        jdir = self.job_dir(job.id)
        partial = jdir / PARTIAL_DIR
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        ctx = JobContext(partial, lambda *a: self._progress(job, *a), job.cancel_event)
        try:
            self._executor(job, ctx)
            ctx.raise_if_cancelled()
        except JobCancelled:
            shutil.rmtree(partial, ignore_errors=True)
            self._finish(job, JobState.cancelled, message="cancelled")
            return
        except Exception as exc:  # the job failed; the server keeps serving
            shutil.rmtree(partial, ignore_errors=True)
            if job.cancel_event.is_set():
                self._finish(job, JobState.cancelled, message="cancelled")
                return
            if not isinstance(exc, JobInputError):
                log.exception("job %s (%s) failed", job.id, job.kind)
            self._finish(job, JobState.failed, message="failed", error=self._on_error(exc))
            return
        # Results are complete and closed: make them visible atomically, then say done.
        files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
        os.replace(partial, jdir / RESULT_DIR)
        job.files = files
        self._finish(job, JobState.done, message=f"{len(files)} files")


def _safe_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def _default_error(exc: BaseException) -> ErrorBody:
    if isinstance(exc, JobInputError):
        return ErrorBody(error=str(exc), field=exc.field, hint=exc.hint)
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return ErrorBody(
            error="the GPU ran out of memory",
            hint="lower the view resolution or number of views, close other GPU programs, or use a smaller model",
        )
    return ErrorBody(error=f"the job failed: {name}: {exc}", hint="see the server log for details")
