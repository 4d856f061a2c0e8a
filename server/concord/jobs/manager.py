"""The job queue: explicit state, one worker thread that owns the device, results on disk before "done".

- `Job` is a record with a `JobState`; every state change is written to `<data_dir>/jobs/<id>/job.json`
  (atomically: a temp file then `os.replace`).
- The queue is bounded: `submit` raises `QueueFull` (the API answers 429) instead of growing without limit. The
  capacity counts the jobs waiting in state `queued` and nothing else: a queued job that is cancelled leaves the
  queue at once, so its slot is free for the next submit. `submit` while the manager stops, or after its worker
  died, raises `NotAccepting` (the API answers 503) instead of queueing a job that would never run.
- One worker thread runs jobs one at a time. A job writes into `result.partial/`; only after the pipeline
  returned and every file is closed is the folder renamed to `result/` and the state set to done. A job that
  fails or is cancelled never has a `result/` folder.
- A fault outside the job's own code (creating its result folder, writing `job.json`, the final rename) fails
  that job with an error naming the folder and the cause, and the worker goes on with the next job. If writing
  the failed state to disk fails too, the in-memory state still says failed. Should the worker thread end
  anyway (a `BaseException`, a bug), `worker_problem` says why, the jobs it would have run are failed, new
  jobs are refused, and /v1/health reports `degraded`.
- Every read of a job's status is a snapshot taken under the manager's lock, and progress updates
  (stage, step, total, message) happen under the same lock: a reader never sees half of an update.
- On start, jobs left queued or running by a previous process are marked failed ("interrupted"); finished jobs
  keep serving their results: nothing finished is ever lost.
- The in-memory index is bounded (`max_history` finished jobs); older jobs are read back from disk on demand.

No HTTP here and no model code: the API layer calls `submit/status/cancel`, the executor callable runs a job.
"""

from __future__ import annotations

import collections
import json
import logging
import os
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
STORAGE_HINT = "check free disk space and the permissions of the data dir ({data_dir})"


class QueueFull(RuntimeError):
    pass


class NotAccepting(RuntimeError):
    """The manager takes no new jobs: it is stopping, or its worker died. `hint` says what to do."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


class StorageError(OSError):
    """A job could not be stored in the data dir; the message names the folder, `hint` says what to check."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


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
        """The record as the protocol sends it. Call it under the manager's lock (`JobManager.status` does)."""
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


class _StepFailed(Exception):
    """A step outside the job's own code failed; `what` says which, in words for the user."""

    def __init__(self, what: str, cause: BaseException, hint: str | None = None):
        super().__init__(what)
        self.what = what
        self.cause = cause
        self.hint = hint


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
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)  # the worker waits here for a queued job or stop
        self._queue: collections.deque[Job] = collections.deque()  # jobs in state queued, in arrival order
        self._jobs: dict[str, Job] = {}
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._worker_problem: str | None = None
        self._recover()

    # ----------------------------------------------------------------------------------------------- state on disk
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def result_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / RESULT_DIR

    def _persist(self, job: Job) -> None:
        with self._lock:
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
        """Refuse new jobs, cancel what runs, mark queued jobs failed (interrupted), and join the worker."""
        with self._wake:
            self._stopping = True
            if self._running is not None:
                self._running.cancel_event.set()
            waiting = list(self._queue)
            self._queue.clear()
            for job in waiting:
                shut = ErrorBody(error="the server shut down before this job ran", hint="submit the job again")
                self._finish(job, JobState.failed, error=shut)
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ----------------------------------------------------------------------------------------------- public API
    def submit(self, kind: str, params: Any, arrays: dict) -> Job:
        """Queue a job. Raises `NotAccepting` (stopping, or no worker), `QueueFull`, or `StorageError`."""
        with self._wake:
            self._check_accepting()
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} jobs are already waiting")
            job = Job(id=uuid.uuid4().hex, kind=kind, state=JobState.queued, created_at=time.time(), params=params, arrays=arrays)
            jdir = self.job_dir(job.id)
            try:
                jdir.mkdir(parents=True)
                (jdir / "request.json").write_text(json.dumps({"kind": kind, "params": params.model_dump(mode="json")}, indent=2))
                self._persist(job)
            except Exception as exc:
                shutil.rmtree(jdir, ignore_errors=True)
                raise StorageError(
                    f"could not store the job in {jdir}: {type(exc).__name__}: {exc}",
                    STORAGE_HINT.format(data_dir=self.data_dir),
                ) from exc
            self._jobs[job.id] = job
            self._queue.append(job)
            self._trim_history()
            self._wake.notify()
            return job

    def _check_accepting(self) -> None:
        if self._stopping:
            raise NotAccepting("the server is shutting down and takes no new jobs", "submit the job again once the server is back")
        problem = self.worker_problem
        if problem is not None:
            raise NotAccepting(f"the server cannot run jobs: {problem}", "restart `concord serve`; the server log has the details")

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None and _safe_id(job_id):
            job = self._load_record(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def status(self, job_id: str) -> JobStatus:
        """A consistent snapshot of one job (raises `JobNotFound`)."""
        job = self.get(job_id)
        with self._lock:
            return job.status()

    def statuses(self) -> list[JobStatus]:
        """Consistent snapshots of the jobs in memory, oldest first."""
        with self._lock:
            return [j.status() for j in sorted(self._jobs.values(), key=lambda j: j.created_at)]

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job: a queued one leaves the queue at once (its slot is free), a running one is asked to stop.
        Returns the job's status after the request."""
        job = self.get(job_id)
        with self._wake:
            if job.state == JobState.queued:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                self._finish(job, JobState.cancelled, message="cancelled before it started")
            elif job.state == JobState.running:
                job.cancel_event.set()
                job.message = "cancelling"
            return job.status()

    @property
    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None

    @property
    def worker_problem(self) -> str | None:
        """None while the worker can run jobs; else why it cannot (it died, or was never started)."""
        with self._lock:
            if self._worker_problem is not None:
                return self._worker_problem
            if self._stopping:
                return None
            if self._thread is None:
                return "the job worker is not running"
            if not self._thread.is_alive():
                return "the job worker stopped unexpectedly"
            return None

    # ------------------------------------------------------------------------------------------------- worker
    def _trim_history(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINISHED_STATES]
        excess = len(self._jobs) - self.max_history
        if excess > 0:
            for job in sorted(finished, key=lambda j: j.created_at)[:excess]:
                del self._jobs[job.id]

    def _finish(self, job: Job, state: JobState, message: str = "", error: ErrorBody | None = None) -> BaseException | None:
        """Record the final state: on disk first (so whoever sees it in memory finds it on disk too), then in memory
        even if the write failed (the state in memory stays truthful). Returns the write's exception (logged)."""
        with self._lock:
            final = {
                "state": state,
                "stage": state.value,
                "finished_at": time.time(),
                "message": message or job.message,
                "error": error,
            }
            record = job.status().model_copy(update=final)
        failed = None
        try:
            _write_json_atomic(self.job_dir(job.id) / "job.json", record.model_dump(mode="json"))
        except Exception as exc:
            log.error("could not write %s: %s: %s", self.job_dir(job.id) / "job.json", type(exc).__name__, exc)
            failed = exc
        with self._lock:
            for name, value in final.items():
                setattr(job, name, value)
            job.arrays = None
        return failed

    def _progress(self, job: Job, stage: str, step: int, total: int, message: str) -> None:
        with self._lock:
            job.stage, job.step, job.total = stage, step, total
            if message:
                job.message = message

    def _work(self) -> None:
        job: Job | None = None
        try:
            while True:
                with self._wake:
                    while not self._queue and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        return
                    job = self._queue.popleft()
                    job.state = JobState.running
                    job.stage = "starting"
                    job.started_at = time.time()
                    self._running = job
                try:
                    self._run(job)
                except _StepFailed as exc:
                    self._fail_step(job, exc)
                except Exception as exc:  # a bug around the job (not in it): fail this job, keep the worker
                    bug = _StepFailed("the server failed while handling this job", exc, "see the server log for details")
                    self._fail_step(job, bug)
                with self._lock:
                    self._running = None
                job = None
        except BaseException as exc:  # a bug or an interpreter-level exit: say so instead of dying silently
            self._worker_died(exc, job)

    def _run(self, job: Job) -> None:
        jdir = self.job_dir(job.id)
        partial = jdir / PARTIAL_DIR
        with _step(f"could not record the job's state in {jdir / 'job.json'}"):
            self._persist(job)
        with _step(f"could not create the job's result folder {partial}"):
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        ctx = JobContext(partial, lambda *a: self._progress(job, *a), job.cancel_event, work_root=self.data_dir / "work")
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
        result = jdir / RESULT_DIR
        with _step(f"could not write the job's results to {result}"):
            files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
            os.replace(partial, result)
        # "done" goes to disk first: a job is never reported done unless a restart would report it done too.
        now, message = time.time(), f"{len(files)} files"
        with self._lock:
            done = {"state": JobState.done, "stage": JobState.done.value, "files": files, "finished_at": now, "message": message}
            record = job.status().model_copy(update=done)
        with _step(f"could not record the finished job in {jdir / 'job.json'}"):
            try:
                _write_json_atomic(jdir / "job.json", record.model_dump(mode="json"))
            except BaseException:
                shutil.rmtree(result, ignore_errors=True)  # failed jobs have no result
                raise
        with self._lock:
            job.files, job.state, job.stage, job.finished_at, job.message = files, JobState.done, JobState.done.value, now, message
            job.arrays = None

    def _fail_step(self, job: Job, exc: _StepFailed) -> None:
        log.error("job %s: %s", job.id, exc.what, exc_info=exc.cause)
        shutil.rmtree(self.job_dir(job.id) / PARTIAL_DIR, ignore_errors=True)
        error = ErrorBody(
            error=f"{exc.what}: {type(exc.cause).__name__}: {exc.cause}",
            hint=exc.hint or STORAGE_HINT.format(data_dir=self.data_dir),
        )
        self._finish(job, JobState.failed, message="failed", error=error)

    def _worker_died(self, exc: BaseException, current: Job | None) -> None:
        log.critical("the job worker stopped: %s: %s", type(exc).__name__, exc, exc_info=exc)
        reason = f"the job worker stopped ({type(exc).__name__}: {exc})"
        with self._wake:
            self._worker_problem = reason
            lost = ([current] if current is not None else []) + list(self._queue)
            self._queue.clear()
            self._running = None
            for job in lost:
                if job.state not in FINISHED_STATES:
                    hint = "restart `concord serve`, then submit the job again; the server log has the details"
                    self._finish(job, JobState.failed, message="failed", error=ErrorBody(error=reason, hint=hint))


class _step:
    """`with _step("could not ..."):` turns any exception of the block into `_StepFailed` with that wording."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if exc is not None and isinstance(exc, Exception) and not isinstance(exc, _StepFailed):
            raise _StepFailed(self.what, exc) from exc
        return False


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
