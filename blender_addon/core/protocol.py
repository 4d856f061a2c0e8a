"""A stdlib mirror of the server's protocol (server/concord/api/schemas.py is the source of truth).

The add-on cannot import pydantic or the server package, so the few facts it relies on are restated here, and
tests/core/test_protocol_mirror.py fails when they drift from the server's schemas or docs/openapi.json.
"""

PROTOCOL_VERSION = 2

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED_STATES = ("done", "failed", "cancelled")

# Fields the add-on reads from each response.
HEALTH_FIELDS = (
    "protocol_version",
    "server_version",
    "model",
    "model_kind",
    "recommended",
    "device",
    "dtype",
    "queue_length",
    "queue_capacity",
    "busy",
    "job_kinds",
    "status",
    "worker_alive",
    "problem",
)
JOB_STATUS_FIELDS = (
    "id",
    "kind",
    "state",
    "stage",
    "step",
    "total",
    "message",
    "error",
    "created_at",
    "started_at",
    "finished_at",
    "files",
)
ERROR_FIELDS = ("error", "field", "hint")
# `recommended` in the health answer (and in each /v1/models entry): the model's recommended settings.
RECOMMENDED_FIELDS = (
    "view_size", "steps", "guidance", "texture_size", "native_size", "max_view_size", "attention_correspondence"
)
# Job parameters the server fills from its model's recommended settings when a request leaves them out.
MODEL_DEFAULT_PARAMS = {
    "depth_image": ("steps", "guidance"),
    "texture": ("steps", "guidance", "texture_size"),
    "stylize": ("steps", "guidance"),
}

# Job kinds the add-on submits, with the parameters it may send.
JOB_PARAMS = {
    "depth_image": ("prompt", "negative_prompt", "seed", "steps", "guidance", "conditioning_scale"),
    # TextureParams' top-level fields; `consistency` and `bake` are objects (see core/packing.texture_params)
    "texture": (
        "prompt", "negative_prompt", "seed", "steps", "guidance", "conditioning_scale", "texture_size",
        "consistency", "bake",
    ),
    # StylizeParams' fields; the add-on sends one request per chunk of a sequence (core/stylize.chunk_params)
    "stylize": (
        "prompt", "negative_prompt", "seed", "strength", "steps", "guidance", "conditioning_scale", "keyframes",
        "keyframe_list", "noise", "noise_strength", "blending", "chunk_frames", "first_frame", "motion_source",
        "resume", "sequence", "sequence_frames",
    ),
}
