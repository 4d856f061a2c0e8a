"""The Concord protocol: every request and response the server speaks, as pydantic models.

This module is the protocol's single source of truth. `docs/openapi.json` is exported from the app built on it
(`concord openapi`), the add-on's stdlib mirror (`blender_addon/core/protocol.py`) is checked against it by a
test, and `PROTOCOL_VERSION` changes whenever a client written for the old version could misread the new one.

Wire format of `POST /v1/jobs` (see docs/protocol.md): `multipart/form-data` with
  - part `request`: JSON text, one `JobRequest` (`{"kind": ..., "params": {...}}`);
  - part `arrays` (optional for kinds that take none): an `.npz` file (`numpy.savez`, no pickles) whose member
    names and shapes the job kind fixes (`JOB_KINDS[kind].arrays`).

This module must never import torch, diffusers or anything that touches a device: clients and docs use it.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1


class _Strict(BaseModel):
    """Unknown fields are an error, not silently ignored: a typo in a parameter must not pass unnoticed."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------------------------
# Errors


class ErrorBody(_Strict):
    """Every 4xx/5xx answer has this body: what went wrong, where, and what to do about it."""

    error: str = Field(description="What went wrong, in a sentence a user can read.")
    field: str | None = Field(
        default=None, description="The request field at fault, dotted (`params.steps`, `arrays.depth`), if any."
    )
    hint: str | None = Field(default=None, description="What to do about it.")


# ---------------------------------------------------------------------------------------------------------------
# Server


class HealthResponse(_Strict):
    protocol_version: int = Field(description="Clients refuse a server whose protocol version they do not know.")
    server_version: str
    model: str = Field(description="Name of the loaded model (a preset name, folder or file).")
    model_kind: str = Field(description="How the model is conditioned: controlnet, depth2img, ...")
    device: str
    dtype: str
    queue_length: int = Field(description="Jobs waiting, not counting the running one.")
    queue_capacity: int
    busy: bool = Field(description="A job is running now.")
    job_kinds: list[str]


class ModelInfo(_Strict):
    name: str
    description: str
    kind: str
    sources: list[str] = Field(description="Hugging Face Hub ids (or paths) the model is loaded from.")
    loaded: bool = Field(description="This is the model the server runs now.")
    available_offline: bool = Field(description="Every source is on this machine, so it loads without a network.")
    reason: str | None = Field(default=None, description="Why it is not available offline, and how to get it.")


class ModelsResponse(_Strict):
    models: list[ModelInfo]


# ---------------------------------------------------------------------------------------------------------------
# Jobs


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


FINISHED_STATES = (JobState.done, JobState.failed, JobState.cancelled)


class DepthImageParams(_Strict):
    """One image from a depth map, prompt and seed (job kind `depth_image`).

    Arrays: `depth` float32 (H, W), planar camera z in scene units, > 0 on the object and exactly 0 on the
    background (the ViewSet contract, `concord.geometry.viewset`); H and W multiples of 8, 32..2048.
    """

    prompt: str = Field(max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    steps: int = Field(default=20, ge=1, le=200)
    guidance: float = Field(default=7.5, ge=0.0, le=50.0, description="Classifier-free guidance scale; <=1 is off.")
    conditioning_scale: float = Field(
        default=1.0, ge=0.0, le=4.0, description="Strength of the depth conditioning (ControlNet scale)."
    )


class DepthImageJob(_Strict):
    kind: Literal["depth_image"]
    params: DepthImageParams


JobRequest = Annotated[Union[DepthImageJob], Field(discriminator="kind")]


class JobCreated(_Strict):
    id: str
    kind: str
    state: JobState


class JobStatus(_Strict):
    id: str
    kind: str
    state: JobState
    stage: str = Field(description="What the job is doing now: queued, loading, encoding, denoising, decoding, ...")
    step: int = Field(description="Steps finished in the current stage.")
    total: int = Field(description="Steps in the current stage (0 when it has none).")
    message: str = ""
    error: ErrorBody | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    files: list[str] = Field(default_factory=list, description="Result files, once the job is done.")


class JobList(_Strict):
    jobs: list[JobStatus]
