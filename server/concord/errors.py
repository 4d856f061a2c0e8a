"""Errors that more than one layer raises or catches, kept in a module that imports nothing of Concord.

`JobInputError` is raised by pipelines (a job's inputs are wrong in a way only the sampler could see), by the
model registry (a loaded model that cannot run a job) and caught by the job manager, the HTTP API and the CLI.
Living here, it lets `concord.pipelines` and `concord.models` raise it without importing the job system
(ARCHITECTURE rule 12: generic layers know no concrete model, and nothing imports in a circle).

What this module must never do: import anything (of Concord or a third party) or hold logic beyond the errors.
"""

from __future__ import annotations

__all__ = ["JobInputError", "ContractError"]


class ContractError(ValueError):
    """Arrays break a written array contract (the ViewSet's, the FrameSet's). `field` names the offending array;
    `hint` says how to fix it."""

    def __init__(self, message: str, field: str, hint: str = ""):
        super().__init__(f"{field}: {message}" + (f" ({hint})" if hint else ""))
        self.message = message
        self.field = field
        self.hint = hint


class JobInputError(ValueError):
    """The job's inputs are wrong in a way only the pipeline could see; the message tells the user what to do.

    `field` names the request field at fault (e.g. "arrays.depth", "params.consistency.grid_rows", "model"),
    `hint` what to change."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.field = field
        self.hint = hint
