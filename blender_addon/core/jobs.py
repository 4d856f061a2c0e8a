"""A server job run on a worker thread, talking to Blender's main thread through typed messages.

Blender's data may only be touched on the main thread, and a network wait on the main thread freezes the UI
(ARCHITECTURE.md rule 5). So :class:`JobWorker` does every network call (health check, upload, polling,
download) on its own thread and posts :class:`Progress`, :class:`Done`, :class:`Failed` or
:class:`Cancelled` into a ``queue.SimpleQueue``; the main thread drains it (a modal operator's timer, or a
loop in blocking mode) and is the only one that changes the scene. Exactly one final message (Done, Failed
or Cancelled) is posted, always last. Cancel is an event the worker checks; while the job runs on the server,
the client's ``wait`` turns it into ``POST /v1/jobs/{id}/cancel`` and waits for the server to say cancelled.

Layer rule: plain Python (threading, queue) + the stdlib client. No bpy, no torch, no server package.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .client import ConcordClient, JobCancelledError, ServerError


@dataclass(frozen=True)
class Progress:
    """The job moved on: ``stage`` (connecting, uploading, queued, denoising, ..., downloading), step/total."""

    stage: str
    step: int = 0
    total: int = 0
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, max(0.0, self.step / self.total)) if self.total > 0 else 0.0


@dataclass(frozen=True)
class Done:
    """The job finished and every result file is on disk in ``out_dir``."""

    job_id: str
    out_dir: Path
    files: tuple[Path, ...]
    seconds: float
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    """The job could not run or failed; ``message`` (and ``hint``) are for the user."""

    message: str
    hint: str | None = None
    job_id: str | None = None

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


@dataclass(frozen=True)
class Cancelled:
    message: str = "cancelled"
    job_id: str | None = None


Message = Progress | Done | Failed | Cancelled
FINAL = (Done, Failed, Cancelled)


class JobWorker:
    """Submit one job, follow it and download its results, on a daemon thread.

    ``client_factory`` builds the client on the worker thread (its settings were read on the main thread).
    """

    def __init__(
        self,
        client_factory: Callable[[], ConcordClient],
        kind: str,
        params: dict,
        arrays: dict | None,
        out_dir: Path,
        poll: float = 0.2,
    ):
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self._client_factory = client_factory
        self._kind, self._params, self._arrays = kind, params, arrays
        self._out_dir = Path(out_dir)
        self._poll = poll
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="concord-job", daemon=True)
        self.job_id: str | None = None
        self.finished = False

    # ------------------------------------------------------------------ main thread API
    def start(self) -> "JobWorker":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop: before submission nothing is sent; after it, the server is told to cancel."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def drain(self) -> list[Message]:
        """Every message posted so far, oldest first (never blocks)."""
        return drain(self.messages)

    # ------------------------------------------------------------------ worker thread
    def _post(self, msg: Message) -> None:
        self.messages.put(msg)

    def _run(self) -> None:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            client = self._client_factory()
            self._post(Progress("connecting", message=client.url))
            client.health()
            if self._cancel.is_set():
                self._post(Cancelled("cancelled before the job was sent"))
                return
            self._post(Progress("uploading"))
            t = time.perf_counter()
            self.job_id = client.submit(self._kind, self._params, self._arrays)
            timings["upload_s"] = time.perf_counter() - t
            self._arrays = None  # the arrays may be large: let them go
            t = time.perf_counter()
            client.wait(
                self.job_id,
                on_progress=lambda p: self._post(Progress(p.stage, p.step, p.total, p.message)),
                poll=self._poll,
                should_cancel=self._cancel.is_set,
            )
            timings["server_s"] = time.perf_counter() - t
            self._post(Progress("downloading"))
            t = time.perf_counter()
            files = client.download_result(self.job_id, self._out_dir)
            timings["download_s"] = time.perf_counter() - t
            self._post(Done(self.job_id, self._out_dir, tuple(files), time.perf_counter() - t0, timings))
        except JobCancelledError:
            self._post(Cancelled("the job was cancelled", job_id=self.job_id))
        except ServerError as exc:
            self._post(Failed(str(exc.args[0]) if exc.args else "server error", exc.hint, self.job_id))
        except Exception as exc:  # a bug or an OS error: still one final message, never a silent thread death
            self._post(Failed(f"unexpected error: {type(exc).__name__}: {exc}", traceback.format_exc(limit=3), self.job_id))
        finally:
            self.finished = True


def drain(q: queue.SimpleQueue) -> list[Message]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def run_blocking(worker: JobWorker, on_message: Callable[[Message], None] | None = None, poll: float = 0.05) -> Message:
    """Start (if needed) and follow a worker on the calling thread until its final message, which is returned.

    For scripts and background mode, where no event loop runs timers."""
    if not worker.is_alive() and not worker.finished:
        worker.start()
    while True:
        for msg in worker.drain():
            if on_message:
                on_message(msg)
            if isinstance(msg, FINAL):
                worker.join(5.0)
                return msg
        time.sleep(poll)
