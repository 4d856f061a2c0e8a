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

PROTOCOL_VERSION = 2  # 2: sampler settings a job leaves out are the model's recommended ones


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


class RecommendedSettings(_Strict):
    """What a model is best run at (mirrors `concord.models.recommended.RecommendedSettings`). Jobs that leave
    `steps`, `guidance` or `texture_size` out get these; clients render views at `view_size` unless told otherwise."""

    view_size: int = Field(description="Pixels per side of each view (the longest side of non-square views).")
    steps: int = Field(description="Denoising steps.")
    guidance: float = Field(description="Classifier-free guidance scale (<= 1: off).")
    texture_size: int = Field(description="Texture width = height for a `texture` job.")
    native_size: int = Field(description="The image size the model was trained at.")
    max_view_size: int = Field(
        description="The largest view size the model is meant for: larger views run, but slowly and off its training "
        "distribution."
    )
    attention_correspondence: float = Field(
        default=0.0,
        description="Strength of correspondence-weighted shared attention in `texture` jobs that leave it out (0: plain).",
    )


class HealthResponse(_Strict):
    protocol_version: int = Field(description="Clients refuse a server whose protocol version they do not know.")
    server_version: str
    model: str = Field(description="Name of the loaded model (a preset name, folder or file).")
    model_kind: str = Field(description="How the model is conditioned: controlnet, depth2img, ...")
    recommended: RecommendedSettings = Field(description="The loaded model's recommended settings.")
    device: str
    dtype: str
    queue_length: int = Field(description="Jobs waiting, not counting the running one.")
    queue_capacity: int
    busy: bool = Field(description="A job is running now.")
    job_kinds: list[str]
    status: Literal["ok", "degraded"] = Field(
        description="`ok` when jobs can run; `degraded` when they cannot (the job worker stopped): `problem` says why."
    )
    worker_alive: bool = Field(description="The job worker is running and takes jobs.")
    problem: str | None = Field(default=None, description="Why the server is degraded, and what to do (null when ok).")


class ModelInfo(_Strict):
    name: str
    description: str
    kind: str
    sources: list[str] = Field(description="Hugging Face Hub ids (or paths) the model is loaded from.")
    loaded: bool = Field(description="This is the model the server runs now.")
    available_offline: bool = Field(description="Every source is on this machine, so it loads without a network.")
    reason: str | None = Field(default=None, description="Why it is not available offline, and how to get it.")
    recommended: RecommendedSettings = Field(description="What the model is best run at, and its limits.")


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
    steps: int | None = Field(default=None, ge=1, le=200, description="Denoising steps; omitted: the model's recommended.")
    guidance: float | None = Field(
        default=None, ge=0.0, le=50.0, description="Classifier-free guidance scale; <=1 is off; omitted: the model's."
    )
    conditioning_scale: float = Field(
        default=1.0, ge=0.0, le=4.0, description="Strength of the depth conditioning (ControlNet scale)."
    )


class DepthImageJob(_Strict):
    kind: Literal["depth_image"]
    params: DepthImageParams


class ConsistencyOptions(_Strict):
    """How the views of a `texture` job are made to agree. Every switch combines with every other."""

    grid: bool = Field(default=False, description="Tile the views into one image (Zero123++-style grid stacking).")
    grid_rows: int | None = Field(
        default=None, ge=1, le=8, description="Grid rows; default 3x2 for six views, else near square; rows x cols >= views."
    )
    grid_cols: int | None = Field(default=None, ge=1, le=8, description="Grid columns; rows x cols must hold every view.")
    shared_attention: Literal["off", "all", "reference"] = Field(
        default="all", description="Extended self-attention across views: off, every view, or the reference views."
    )
    reference_views: list[int] = Field(
        default_factory=lambda: [0],
        max_length=16,
        description="Indices of the reference views, each in 0..V-1 (V: views sent); at least one for 'reference'.",
    )
    attention_chunk: int | None = Field(default=None, ge=1, description="Query chunk for shared attention (memory bound).")
    attention_correspondence: float | None = Field(
        default=None,
        ge=0.0,
        le=16.0,
        description="Shared attention's logit bonus on other views' tokens that show the same surface point "
        "(0: plain shared attention; not applied on a grid); omitted: the model's.",
    )
    uv_sync: bool = Field(default=True, description="Average the views' clean-latent predictions in UV space each step.")
    sync_start: float = Field(default=0.0, ge=0.0, le=1.0, description="Fraction of the steps where UV sync starts (<= sync_end).")
    sync_end: float = Field(default=1.0, ge=0.0, le=1.0, description="Fraction of the steps where UV sync stops.")
    uv_noise: bool = Field(default=True, description="Initial noise drawn on the surface, shared by the views that see it.")
    loss_guidance: bool = Field(default=False, description="SyncDiffusion-style gradient guidance (expensive).")
    loss_guidance_scale: float = Field(default=20.0, ge=0.0, le=10000.0)
    loss_guidance_until: float = Field(default=0.3, ge=0.0, le=1.0, description="Fraction of the steps it applies to.")


class BakeOptions(_Strict):
    cos_power: float = Field(default=4.0, ge=0.0, le=32.0, description="Weight views by cos(theta)^g.")
    padding: int = Field(default=4, ge=0, le=64, description="Texels of padding around UV islands.")


class TextureParams(_Strict):
    """Texture a mesh from a prompt (job kind `texture`).

    Arrays: a ViewSet (`concord.geometry.viewset`): `depth` (V,H,W), `mask` (V,H,W), `uv` (V,H,W,2), `normal`
    (V,H,W,3), `intrinsics` (V,3,3), `world_to_camera` (V,4,4); H and W are the view resolution.
    """

    prompt: str = Field(max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    steps: int | None = Field(default=None, ge=1, le=200, description="Denoising steps; omitted: the model's recommended.")
    guidance: float | None = Field(
        default=None, ge=0.0, le=50.0, description="Classifier-free guidance scale; <=1 is off; omitted: the model's."
    )
    conditioning_scale: float = Field(default=1.0, ge=0.0, le=4.0)
    texture_size: int | None = Field(
        default=None, ge=64, le=8192, description="Texture width = height; omitted: the model's recommended."
    )
    consistency: ConsistencyOptions = Field(default_factory=ConsistencyOptions)
    bake: BakeOptions = Field(default_factory=BakeOptions)


class TextureJob(_Strict):
    kind: Literal["texture"]
    params: TextureParams


class LatentBlending(_Strict):
    """Rerender-A-Video / FRESCO-style latent blending: the previous stylized frame's clean-latent prediction,
    carried along the motion vectors, blended into the current one on non-occluded pixels for the early steps."""

    weight: float = Field(default=0.0, ge=0.0, le=1.0, description="Share of the warped previous x0 (0 = off).")
    until: float = Field(default=0.5, ge=0.0, le=1.0, description="Fraction of the steps it applies to.")


class StylizeParams(_Strict):
    """Stylize an animation render, frames consistent with each other (job kind `stylize`).

    Arrays: a FrameSet (`concord.frames.frameset`): `image` (N,H,W,3) sRGB, `depth` (N,H,W) planar z (0 on the
    background; required by depth-conditioned models), `motion` (N,H,W,2) pixels to the previous frame (x right,
    y down; required by warped noise, `first+previous` attention and latent blending), optional `mask` (N,H,W).
    """

    prompt: str = Field(max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    strength: float = Field(
        default=0.7, gt=0.0, le=1.0,
        description="img2img strength: the share of the denoising schedule run from the noised input frame (1 = ignore its colours).",
    )
    steps: int | None = Field(default=None, ge=1, le=200, description="Denoising steps; omitted: the model's recommended.")
    guidance: float | None = Field(
        default=None, ge=0.0, le=50.0, description="Classifier-free guidance scale; <=1 is off; omitted: the model's."
    )
    conditioning_scale: float = Field(default=1.0, ge=0.0, le=4.0)
    keyframes: Literal["none", "first", "middle", "first+previous", "explicit"] = Field(
        default="first+previous",
        description="Cross-frame attention: none, first (Text2Video-Zero), middle (FateZero), first+previous "
        "(Pix2Video), or the frames in keyframe_list.",
    )
    keyframe_list: list[int] = Field(
        default_factory=list, max_length=16, description="Frame indices (0-based, in this request) for keyframes='explicit'."
    )
    noise: Literal["iid", "shared", "mixed", "progressive", "warped"] = Field(
        default="warped", description="Initial noise across frames (MATH.md section 1)."
    )
    noise_strength: float | None = Field(
        default=None, ge=0.0, le=100.0,
        description="r for warped (0..1, default 1), a for mixed/progressive (default 1); ignored otherwise.",
    )
    blending: LatentBlending = Field(default_factory=LatentBlending)
    chunk_frames: int = Field(default=8, ge=1, le=64, description="Frames denoised together (memory vs speed).")
    first_frame: int = Field(default=0, ge=0, le=10**7, description="Number of the first frame (output file names).")
    motion_source: str = Field(
        default="renderer", max_length=64, description="Where `motion` came from (reported): renderer or optical_flow:dis."
    )
    resume: bool = Field(
        default=False,
        description="Continue an interrupted run of the same inputs in the same output folder: finished frames are kept.",
    )
    sequence: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Name of a sequence sent in several requests: the server keeps the keyframes' attention record, "
        "the previous frame's and the noise between them. The first request starts it at first_frame 0 (and holds "
        "its keyframes); each next one starts at the frame after the previous one's last (first_frame).",
    )
    sequence_frames: int | None = Field(
        default=None, ge=1, le=10**7, description="Frames in the whole sequence (for keyframes 'middle'); default: this request's."
    )


class StylizeJob(_Strict):
    kind: Literal["stylize"]
    params: StylizeParams


JobRequest = Annotated[Union[DepthImageJob, TextureJob, StylizeJob], Field(discriminator="kind")]


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
