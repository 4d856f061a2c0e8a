"""The add-on's stdlib protocol mirror and docs/openapi.json agree with the server's pydantic schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

from blender_addon.core import protocol
from concord.api import schemas
from concord.cli import openapi_document
from concord.pipelines.kinds import JOB_KINDS

ROOT = Path(__file__).resolve().parents[2]


def test_protocol_version_and_states_match():
    assert protocol.PROTOCOL_VERSION == schemas.PROTOCOL_VERSION
    assert protocol.JOB_STATES == tuple(s.value for s in schemas.JobState)
    assert protocol.FINISHED_STATES == tuple(s.value for s in schemas.FINISHED_STATES)


def test_response_fields_match():
    assert protocol.HEALTH_FIELDS == tuple(schemas.HealthResponse.model_fields)
    assert protocol.JOB_STATUS_FIELDS == tuple(schemas.JobStatus.model_fields)
    assert protocol.ERROR_FIELDS == tuple(schemas.ErrorBody.model_fields)


def test_job_kinds_and_params_match():
    inner = get_args(schemas.JobRequest)[0]
    union_members = get_args(inner) or (inner,)  # a one-member Union collapses to the member
    union_kinds = {get_args(m.model_fields["kind"].annotation)[0]: m for m in union_members}
    assert set(union_kinds) == set(JOB_KINDS)
    for name, model in union_kinds.items():
        assert model.model_fields["params"].annotation is JOB_KINDS[name].params_model
    for name, fields in protocol.JOB_PARAMS.items():
        assert name in JOB_KINDS
        assert set(fields) == set(JOB_KINDS[name].params_model.model_fields), name


def test_exported_openapi_is_current():
    exported = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert exported == openapi_document(), "docs/openapi.json is stale: run `concord openapi --out docs/openapi.json`"


def test_stylize_requests_the_addon_builds_are_valid_and_its_limits_match():
    """Every request of a sequence the add-on sends (core/stylize.py) validates against StylizeParams, and the limits
    the add-on checks before uploading are the server's."""
    from typing import get_args as args

    from blender_addon.core import stylize as addon
    from concord.pipelines import stylize as server

    fields = schemas.StylizeParams.model_fields
    assert set(addon.KEYFRAME_MODES) <= set(args(fields["keyframes"].annotation))
    assert set(addon.NOISE_MODES) <= set(args(fields["noise"].annotation))
    pattern = next(m.pattern for m in fields["sequence"].metadata if getattr(m, "pattern", None))
    assert addon.SEQUENCE_NAME.pattern == pattern
    le = lambda name: next(m.le for m in fields[name].metadata if hasattr(m, "le"))  # noqa: E731
    assert addon.MAX_CHUNK_FRAMES == le("chunk_frames")
    assert addon.MAX_FRAMES_PER_REQUEST == server.MAX_FRAMES == server.ARRAYS.dims["N"].high
    for dim in ("H", "W"):
        limit = server.ARRAYS.dims[dim]
        assert (addon.MIN_SIDE, addon.MAX_SIDE, addon.SIDE_MULTIPLE) == (limit.low, limit.high, limit.multiple_of)

    chunks = addon.plan_chunks(1, 20, 8)
    for model_defaults in (True, False):
        base = addon.stylize_params(
            "ink wash", negative_prompt="blurry", seed=3, strength=0.5, keyframes="first+previous", noise="warped",
            steps=None if model_defaults else 12, guidance=None if model_defaults else 4.0, chunk_frames=8)
        name = addon.sequence_name(addon.fingerprint(base, frame_start=1, frame_end=20, size=(64, 64), source="RENDER",
                                                     model="tiny", scene="Scene"), ROOT)
        for k, chunk in enumerate(chunks):
            sent = addon.chunk_params(base, chunk, name, 20, resume=k == 1)
            assert set(sent) <= set(protocol.JOB_PARAMS["stylize"])
            parsed = schemas.StylizeParams(**sent)  # extra fields are refused by the server's model
            assert (parsed.first_frame, parsed.sequence, parsed.sequence_frames) == (chunk.first_index, name, 20)
            assert (parsed.steps is None) == model_defaults
            # what the server compares between the requests of one sequence: all but first_frame and resume
            same = parsed.model_dump(exclude={"first_frame", "resume"})
            if k == 0:
                first = same
            assert same == first
