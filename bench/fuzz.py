"""Fuzz benchmark: at least 10,000 schema-generated requests against every route of a real `concord serve`.

    .venv/bin/python bench/fuzz.py        (or `make load`, which also runs bench/load.py)

Schemathesis (its CLI, every check, every phase: coverage, fuzzing, stateful through the document's links) reads
docs/openapi.json and sends valid and invalid requests to `concord serve --model tiny` on loopback, with
tests/api/schemathesis_hooks.py supplying real .npz files for the `arrays` part. Runs repeat with new seeds until
the server has answered at least 10,000 requests. The requests are counted by the server itself (its access log),
so every status is counted, including the ones no check looks at; the target is 0 answers of 5xx, 0 schemathesis
failures, and `/v1/health` still `ok` at the end.

Prints a table and writes bench/results/fuzz.json. Not a test: the CI runs the small version
(tests/api/test_openapi_conformance.py).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from blender_addon.core.client import ConcordClient  # noqa: E402
from concord.serve_process import ServerProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_REQUESTS = 10_000
MAX_EXAMPLES = 500  # per operation and run; runs repeat until TARGET_REQUESTS
ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


def count_requests(log: str) -> collections.Counter:
    return collections.Counter(int(m.group("status")) for m in ACCESS.finditer(log))


def row(measure: str, value, target=None, met=None) -> dict:
    return {"measure": measure, "value": value, "target": target, "met": met}


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="concord-fuzz-"))
    runs = []
    t0 = time.perf_counter()
    # `concord serve --log-level debug` turns uvicorn's access log on: one line per answered request, with its status.
    with ServerProcess(tmp / "data", extra_args=("--log-level", "debug")) as srv:
        seed = 1
        while True:
            cmd = [
                sys.executable, "-m", "schemathesis.cli", "run", str(ROOT / "docs" / "openapi.json"),
                "--url", srv.url, "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", str(seed),
                "--workers", "1", "--generation-database", "none", "--no-color", "--request-timeout", "120",
            ]
            env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.api.schemathesis_hooks", PYTHONPATH=str(ROOT))
            r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
            out = r.stdout + r.stderr
            cases = re.search(r"(\d+) generated", out)
            failures = re.search(r"(\d+) failures?\b", out.split("SUMMARY")[-1])
            runs.append(
                {
                    "seed": seed,
                    "exit": r.returncode,
                    "test_cases": int(cases.group(1)) if cases else None,
                    "failures": int(failures.group(1)) if failures else (0 if r.returncode == 0 else None),
                }
            )
            if r.returncode != 0:
                print(out[-6000:])
            statuses = count_requests(srv.output())
            print(f"run {seed}: exit {r.returncode}, {runs[-1]['test_cases']} test cases; "
                  f"{sum(statuses.values())} requests answered so far", flush=True)
            if sum(statuses.values()) >= TARGET_REQUESTS:
                break
            seed += 1
        health = ConcordClient(srv.url, timeout=60).health()
        statuses = count_requests(srv.output())
    wall = time.perf_counter() - t0
    total = sum(statuses.values())
    server_errors = sum(n for s, n in statuses.items() if s >= 500)
    failures = sum(r["failures"] or 0 for r in runs)
    rows = [
        row("requests answered (server access log)", total, f">= {TARGET_REQUESTS}", total >= TARGET_REQUESTS),
        row("schemathesis runs (seeds)", len(runs)),
        row("schemathesis test cases", sum(r["test_cases"] or 0 for r in runs)),
        row("schemathesis failures (every check)", failures, 0, failures == 0 and all(r["exit"] == 0 for r in runs)),
        row("5xx answers", server_errors, 0, server_errors == 0),
        row("answers by status", " ".join(f"{s}:{n}" for s, n in sorted(statuses.items()))),
        row("health afterwards", health["status"], "ok", health["status"] == "ok"),
        row("wall s", wall),
    ]
    report("fuzz", rows, ["measure", "value", "target", "met"])
    if not all(r["met"] in (True, None) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
