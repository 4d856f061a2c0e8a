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
