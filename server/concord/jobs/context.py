"""What a running job sees of the job system: where to write, how to report progress, whether to stop.

Pipelines get a `JobContext`; they never touch the queue or the job record. Cancellation reaches a diffusers
sampler through its own hook: `diffusers_callback()` is passed as `callback_on_step_end`, reports each finished
step and sets `pipe._interrupt` once cancel was asked, so no further denoiser call is made (ARCHITECTURE.md
rule 9). After the pipeline returns, `raise_if_cancelled()` turns the interruption into `JobCancelled` so no
result of a cancelled job is ever written.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

# `JobInputError` lives in the neutral `concord.errors` (pipelines and the model registry raise it too); it is
# re-exported here because the job system's callers have always imported it from this module.
from concord.errors import JobInputError

__all__ = ["JobCancelled", "JobContext", "JobInputError", "ProgressFn"]

ProgressFn = Callable[[str, int, int, str], None]  # stage, step, total, message


class JobCancelled(Exception):
    """Raised inside a job when the user cancelled it."""


class JobContext:
    def __init__(self, out_dir: Path, on_progress: ProgressFn, cancel_event: threading.Event,
                 work_root: Path | None = None):
        self.out_dir = Path(out_dir)
        # Where a job may keep work that outlives a failed or cancelled run (the stylize job's resumable frames).
        self.work_root = Path(work_root) if work_root is not None else None
        self._on_progress = on_progress
        self._cancel = cancel_event
        self._stage = "starting"
        self._total = 0

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled()

    def stage(self, name: str, total: int = 0, message: str = "") -> None:
        """Enter a stage; raises JobCancelled first if the user cancelled (stages are safe stopping points)."""
        self.raise_if_cancelled()
        self._stage, self._total = name, total
        self._on_progress(name, 0, total, message)

    def advance(self, step: int, message: str = "") -> None:
        self._on_progress(self._stage, step, self._total, message)

    def diffusers_callback(self, offset: int = 0):
        """A `callback_on_step_end` for diffusers pipelines: progress per step and cancel within one step."""

        def callback(pipe, step_index, timestep, callback_kwargs):
            self.advance(offset + step_index + 1)
            if self._cancel.is_set():
                pipe._interrupt = True
            return callback_kwargs

        return callback
