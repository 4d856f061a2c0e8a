"""A server job run on a worker thread, talking to Blender's main thread through typed messages.

Blender's data may only be touched on the main thread, and a network wait on the main thread freezes the UI
(ARCHITECTURE.md rule 5). So :class:`JobWorker` does every network call (health check, upload, polling,
download) on its own thread and posts :class:`Progress`, :class:`Done`, :class:`Failed` or
:class:`Cancelled` into a ``queue.SimpleQueue``; the main thread drains it (a modal operator's timer, or a
loop in blocking mode) and is the only one that changes the scene. Exactly one final message (Done, Failed
or Cancelled) is posted, always last.

Cancel wins at once, whatever the server does: each network call runs on a helper thread and the worker waits
on a condition that both the call's answer and ``cancel()`` notify, so a server that accepted the connection
but never answers cannot hold a cancel until the client's timeout. Once the job is on the server, a cancel
becomes ``POST /v1/jobs/{id}/cancel`` and the worker waits for the server to say cancelled (a server that does
not answer that request within ``CANCEL_GRACE_S`` is given up on: the job ends cancelled, with a note).
``run_blocking`` cancels the job on any exit other than its final message (Ctrl+C, an error in a callback).

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

from .client import ConcordClient, JobCancelledError, ServerError, _failed, progress_of


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

# After a cancel, how long the worker waits for a server that does not answer the cancel request before it
# reports the job cancelled anyway (the request is still delivered if the server answers later).
CANCEL_GRACE_S = 1.0
# How long ``run_blocking`` waits, after an interrupt, for the worker to tell the server (a bound, not a delay:
# it returns as soon as the cancel is delivered or given up, within about CANCEL_GRACE_S).
INTERRUPT_SETTLE_S = 10.0


class _CancelWon(Exception):
    """The user cancelled while a call still waited for the server's answer (the call is abandoned)."""


class _NoAnswer(Exception):
    """After a cancel, the server did not answer the cancel request within the grace period."""


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
        cancel_grace: float = CANCEL_GRACE_S,
    ):
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self._client_factory = client_factory
        self._kind, self._params, self._arrays = kind, params, arrays
        self._out_dir = Path(out_dir)
        self._poll = poll
        self._cancel_grace = cancel_grace
        self._cancel = threading.Event()
        self._cv = threading.Condition()  # notified by cancel() and by every call that gets its answer
        self.cancel_settled = threading.Event()  # the server was told (or nothing needs telling, or it did not answer)
        self._thread = threading.Thread(target=self._run, name="concord-job", daemon=True)
        self.job_id: str | None = None
        self.finished = False

    # ------------------------------------------------------------------ main thread API
    def start(self) -> "JobWorker":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop: before submission nothing is sent; after it, the server is told to cancel.

        Event-driven: a call still waiting for the server's answer is abandoned at once (see ``_call``)."""
        with self._cv:
            self._cancel.set()
            self._cv.notify_all()

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
        phase = "before the job was sent (the server had not answered yet)"
        try:
            client = self._client_factory()
            self._post(Progress("connecting", message=client.url))
            self._call(client.health)
            if self._cancel.is_set():
                self._post(Cancelled("cancelled before the job was sent"))
                return
            self._post(Progress("uploading"))
            phase = "while sending the job (if the server takes it after all, it is told to cancel it)"
            t = time.perf_counter()
            self.job_id = self._call(
                client.submit, self._kind, self._params, self._arrays, on_late=lambda job_id: self._cancel_late(client, job_id)
            )
            timings["upload_s"] = time.perf_counter() - t
            self._arrays = None  # the arrays may be large: let them go
            t = time.perf_counter()
            self._follow(client)
            timings["server_s"] = time.perf_counter() - t
            if self._cancel.is_set():  # cancelled in the instant the job finished: the scene stays unchanged
                raise JobCancelledError("cancelled; the job had just finished on the server, its results were not downloaded")
            self._post(Progress("downloading"))
            phase = "while downloading the results; nothing was applied (they stay on the server)"
            t = time.perf_counter()
            files = self._call(client.download_result, self.job_id, self._out_dir)
            timings["download_s"] = time.perf_counter() - t
            self._post(Done(self.job_id, self._out_dir, tuple(files), time.perf_counter() - t0, timings))
        except _CancelWon:
            self._post(Cancelled(f"cancelled {phase}", job_id=self.job_id))
        except JobCancelledError as exc:
            self._post(Cancelled(str(exc.args[0]) if exc.args else "the job was cancelled", job_id=self.job_id))
        except ServerError as exc:
            self._post(Failed(str(exc.args[0]) if exc.args else "server error", exc.hint, self.job_id))
        except Exception as exc:  # a bug or an OS error: still one final message, never a silent thread death
            self._post(Failed(f"unexpected error: {type(exc).__name__}: {exc}", traceback.format_exc(limit=3), self.job_id))
        finally:
            self.finished = True
            self.cancel_settled.set()

    def _call(self, fn, *args, after_cancel: bool = False, on_late: Callable | None = None):
        """Run one blocking client call on a helper thread and return its answer (or raise its error), unless the
        user cancels first: whichever comes first wins, so a server that accepted the connection but never answers
        cannot hold a cancel until the client's timeout.

        * Before a cancel, a cancel wins at once (``_CancelWon``). The helper thread is left to end at the client's
          own timeout; if it gets an answer after all, ``on_late(answer)`` runs on it (a job that the server
          accepted after the user cancelled is cancelled there).
        * ``after_cancel`` (telling the server to stop): the call gets ``cancel_grace`` seconds, then
          ``_NoAnswer``; the helper thread still delivers the request if the server answers later.

        Waiting is on a condition notified by ``cancel()`` and by the helper thread: no polling."""
        if not after_cancel and self._cancel.is_set():
            raise _CancelWon()
        box: dict = {}

        def work():
            try:
                value = fn(*args)
            except BaseException as exc:  # handed to the waiting worker (or dropped if it gave up)
                with self._cv:
                    box["error"] = exc
                    self._cv.notify_all()
                return
            with self._cv:
                box["value"] = value
                late = box.get("abandoned", False)
                self._cv.notify_all()
            if late and on_late is not None:
                try:
                    on_late(value)
                except Exception:
                    pass  # best effort: the user already has their answer (cancelled)

        threading.Thread(target=work, name="concord-call", daemon=True).start()
        deadline = time.monotonic() + self._cancel_grace
        with self._cv:
            while "value" not in box and "error" not in box:
                if after_cancel:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        box["abandoned"] = True
                        raise _NoAnswer()
                    self._cv.wait(remaining)
                elif self._cancel.is_set():
                    box["abandoned"] = True
                    raise _CancelWon()
                else:
                    self._cv.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _post_status(self, st: dict) -> None:
        p = progress_of(st)
        self._post(Progress(p.stage, p.step, p.total, p.message))

    def _follow(self, client: ConcordClient) -> None:
        """Poll the submitted job until the server says done (returns), failed (ServerError) or cancelled
        (JobCancelledError). A cancel, even while a poll waits for a server that does not answer, goes to
        ``_cancel_on_server``. Between polls the worker waits on the condition, so a cancel is seen at once."""
        while True:
            try:
                st = self._call(client.status, self.job_id)
            except _CancelWon:
                self._cancel_on_server(client)  # always raises
            self._post_status(st)
            if st["state"] == "done":
                return
            if st["state"] == "failed":
                err = st.get("error") or {}
                raise ServerError(_failed(err.get("error")), hint=err.get("hint"), field=err.get("field"))
            if st["state"] == "cancelled":
                raise JobCancelledError("the job was cancelled on the server")
            with self._cv:
                if not self._cancel.is_set():
                    self._cv.wait(self._poll)
            if self._cancel.is_set():
                self._cancel_on_server(client)

    def _cancel_on_server(self, client: ConcordClient) -> None:
        """Tell the server to cancel the job and follow it until it says so; always raises JobCancelledError.

        A server that does not answer the cancel within ``cancel_grace`` seconds does not hold the user: the job
        ends as cancelled with a note (the request is still delivered if the server answers later)."""
        try:
            self._call(client.cancel, self.job_id, after_cancel=True)
        except _NoAnswer:
            self.cancel_settled.set()
            raise JobCancelledError(
                f"cancelled; the server did not answer the cancel within {self._cancel_grace:g} s, "
                "so the job may still be running there"
            ) from None
        except ServerError as exc:
            self.cancel_settled.set()
            raise JobCancelledError(f"cancelled; telling the server failed: {exc}") from None
        self.cancel_settled.set()
        while True:  # the server answers: it stops the job at its next step
            st = client.status(self.job_id)
            self._post_status(st)
            if st["state"] in ("cancelled", "failed"):
                raise JobCancelledError("the job was cancelled")
            if st["state"] == "done":
                raise JobCancelledError("cancelled; the job had just finished on the server, its results were not downloaded")
            time.sleep(self._poll)

    def _cancel_late(self, client: ConcordClient, job_id: str) -> None:
        """The server accepted a job after the user had cancelled its submission: cancel it there too."""
        self.job_id = self.job_id or job_id
        client.cancel(job_id)


def drain(q: queue.SimpleQueue) -> list[Message]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def run_blocking(worker: JobWorker, on_message: Callable[[Message], None] | None = None, poll: float = 0.05) -> Message:
    """Start (if needed) and follow a worker on the calling thread until its final message, which is returned.

    For scripts and background mode, where no event loop runs timers. Any exit other than the final message
    (Ctrl+C while waiting, an exception from ``on_message``) cancels the job on the server before it propagates."""
    if not worker.is_alive() and not worker.finished:
        worker.start()
    try:
        while True:
            for msg in worker.drain():
                if on_message:
                    on_message(msg)
                if isinstance(msg, FINAL):
                    worker.join(5.0)
                    return msg
            time.sleep(poll)
    except BaseException:
        # Ctrl+C (KeyboardInterrupt) or an error in on_message: the job must not go on running on the server.
        # Cancel, wait until the server was told (or the worker gave up on a silent server), and re-raise.
        worker.cancel()
        worker.cancel_settled.wait(INTERRUPT_SETTLE_S)
        raise
