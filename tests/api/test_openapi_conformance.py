"""docs/openapi.json says exactly what the server does: a schema-driven fuzzer with every check finds nothing.

The fuzzer is schemathesis (its CLI, every phase: coverage, fuzzing, stateful through the document's links), run
against the real app under uvicorn on loopback with a fixed seed and a small budget per operation. The only help
it gets is tests/api/schemathesis_hooks.py: a real .npz for the binary `arrays` part, which JSON Schema cannot
describe. The 10,000-request run is `make load` (bench/fuzz.py).

The findings that once failed are also pinned one by one below, so a regression names itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.helpers import job_files
from tests.harness import HANG_GUARD_S, InProcessServer

ROOT = Path(__file__).resolve().parents[2]
DOC = json.loads((ROOT / "docs" / "openapi.json").read_text())
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def test_schemathesis_with_every_check_finds_no_failure(tiny_model, tmp_path):
    with InProcessServer(tiny_model, tmp_path / "data") as srv:
        run = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run", str(ROOT / "docs" / "openapi.json"),
                "--url", srv.url, "--checks", "all", "--max-examples", "15", "--seed", "20240917",
                "--workers", "1", "--generation-database", "none", "--no-color", "--request-timeout", "60",
            ],
            cwd=tmp_path,  # schemathesis writes its own folder into the working directory
            env=dict(os.environ, SCHEMATHESIS_HOOKS="tests.api.schemathesis_hooks", PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
        )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-8000:]
    assert "Operations:       8 selected / 8 total" in out, out[-3000:]
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", out)
    assert links and int(links.group(1)) > 0, out[-3000:]  # the links lead from POST /v1/jobs to the job routes


def test_every_path_answers_405_with_exactly_its_documented_methods(client):
    for path, ops in DOC["paths"].items():
        concrete = path.replace("{job_id}", "0" * 32).replace("{name}", "image.png")
        documented = sorted(m.upper() for m in ops if m in HTTP_METHODS)
        for method in ("OPTIONS", "PUT", "DELETE", "PATCH"):
            r = client.request(method, concrete)
            assert r.status_code == 405, (method, path, r.status_code)
            assert sorted(m.strip() for m in r.headers["allow"].split(",")) == documented, (method, path)
            assert set(r.json()) == {"error", "field", "hint"} and documented[0] in r.json()["hint"]


def test_job_body_is_documented_as_the_server_parses_it(client):
    body = DOC["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    schema = body["schema"]
    assert schema["required"] == ["request", "arrays"] and schema["additionalProperties"] is False
    assert body["encoding"]["request"]["contentType"] == "application/json"
    # every kind takes arrays, so the part is required, and leaving it out is the documented 422 naming it
    r = client.post("/v1/jobs", files=job_files(arrays=False))
    assert r.status_code == 422 and r.json()["field"] == "arrays" and "depth" in r.json()["error"]
    # extra parts are refused by name (additionalProperties: false), even several of them
    files = job_files()
    files.update({f"extra{i}": (None, "x") for i in range(5)})
    r = client.post("/v1/jobs", files=files)
    assert r.status_code == 422 and r.json()["field"] == "extra0"
    assert "422" in DOC["paths"]["/v1/jobs"]["post"]["responses"]


def test_links_lead_from_a_created_job_to_every_job_route():
    ops = {op["operationId"]: (path, op) for path, item in DOC["paths"].items() for op in item.values()}
    links = DOC["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]
    targets = {link["operationId"] for link in links.values()}
    assert targets == {op_id for op_id, (path, _) in ops.items() if "{job_id}" in path}
    for link in links.values():
        path, op = ops[link["operationId"]]
        params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert set(link["parameters"]) <= params
        assert link["parameters"]["job_id"] == "$response.body#/id"
    assert "id" in DOC["components"]["schemas"]["JobCreated"]["required"]


@pytest.mark.parametrize("code", ["415", "422", "429", "503"])
def test_job_errors_the_route_answers_are_documented(code):
    assert code in DOC["paths"]["/v1/jobs"]["post"]["responses"]
