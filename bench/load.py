"""Load benchmark: a real `concord serve --model tiny` on loopback, 100 sequential jobs, then 20 concurrent clients.

    .venv/bin/python bench/load.py        (or `make load`, which also runs bench/fuzz.py)

Phase 1 sends 100 `depth_image` jobs (64x64, 2 steps) one after the other: submit, wait, download the zip.
Phase 2 starts 20 client threads that each submit 5 such jobs as fast as they can against a queue of 4, retrying
after a 429 (the 429s are counted); then every accepted job must finish `done` and its result download: none
lost. The server's resident memory (RSS) is read after a warm-up of 10 jobs and at the end; the target is less
than 5 % growth. Any answer other than 2xx or a 429 counts as an error (target 0).

Prints a table and writes bench/results/load.json. Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from blender_addon.core.client import ConcordClient, ServerError  # noqa: E402
from concord.serve_process import ServerProcess  # noqa: E402

SEQUENTIAL = 100
WARMUP = 10
CLIENTS = 20
JOBS_PER_CLIENT = 5
MAX_QUEUE = 4
PARAMS = {"prompt": "a red ball", "steps": 2, "seed": 1}


def sphere_depth(size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    r2 = xx**2 + yy**2
    return np.where(r2 < 0.64, 3.0 - np.sqrt(np.clip(0.64 - r2, 0, None)), 0.0).astype(np.float32)


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("cannot read the server's RSS") from None


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.rejected_429 = 0

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)


def finish(client: ConcordClient, job_id: str, tally: Tally) -> bool:
    """Wait for the job, then download and open its zip. True when it is done with its files."""
    try:
        st = client.wait(job_id, poll=0.01)
        if st["state"] != "done":
            tally.error(f"job {job_id} ended {st['state']}: {st.get('error')}")
            return False
        names = zipfile.ZipFile(BytesIO(client.result_zip(job_id))).namelist()
        if sorted(names) != sorted(st["files"]) or not names:
            tally.error(f"job {job_id}: zip holds {names}, status lists {st['files']}")
            return False
        return True
    except ServerError as exc:
        tally.error(f"job {job_id}: {exc}")
        return False


def row(measure: str, value, target=None, met=None) -> dict:
    return {"measure": measure, "value": value, "target": target, "met": met}


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="concord-load-"))
    depth = sphere_depth()
    tally = Tally()
    rows = []
    with ServerProcess(tmp / "data", extra_args=("--max-queue", str(MAX_QUEUE))) as srv:
        pid = srv.proc.pid
        client = ConcordClient(srv.url, timeout=120)
        rss_start = rss_bytes(pid)

        # Phase 1: sequential jobs.
        t0 = time.perf_counter()
        done_seq = 0
        rss_warm = None
        for i in range(SEQUENTIAL):
            try:
                jid = client.submit("depth_image", PARAMS, {"depth": depth})
            except ServerError as exc:
                tally.error(f"sequential submit {i}: {exc}")
                continue
            done_seq += finish(client, jid, tally)
            if i + 1 == WARMUP:
                rss_warm = rss_bytes(pid)
        seq_s = time.perf_counter() - t0
        rss_after_seq = rss_bytes(pid)

        # Phase 2: concurrent clients against a small queue.
        accepted: list[str] = []
        accepted_lock = threading.Lock()

        def client_thread(k: int) -> None:
            c = ConcordClient(srv.url, timeout=120)
            pause = threading.Event()
            for j in range(JOBS_PER_CLIENT):
                while True:
                    try:
                        jid = c.submit("depth_image", {**PARAMS, "seed": k * 100 + j}, {"depth": depth})
                        break
                    except ServerError as exc:
                        if exc.status == 429:
                            with tally.lock:
                                tally.rejected_429 += 1
                            pause.wait(0.05)  # a client backs off briefly, then retries
                            continue
                        tally.error(f"client {k} submit {j}: {exc}")
                        jid = None
                        break
                if jid is not None:
                    with accepted_lock:
                        accepted.append(jid)

        t1 = time.perf_counter()
        threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done_conc = sum(finish(client, jid, tally) for jid in accepted)
        conc_s = time.perf_counter() - t1
        rss_end = rss_bytes(pid)
        health = client.health()
        listed = {j["id"]: j["state"] for j in client._json("GET", "/v1/jobs")["jobs"]}

    submitted = CLIENTS * JOBS_PER_CLIENT
    lost = submitted - len(accepted) + sum(1 for jid in accepted if listed.get(jid) != "done")
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else float("nan")
    mib = 1 / (1024 * 1024)
    rows += [
        row(f"sequential jobs done (of {SEQUENTIAL})", done_seq, SEQUENTIAL, done_seq == SEQUENTIAL),
        row("sequential round trip, mean s", seq_s / SEQUENTIAL),
        row(f"concurrent: jobs done (of {submitted}, {CLIENTS} clients, queue {MAX_QUEUE})", done_conc, submitted,
            done_conc == submitted),
        row("concurrent: 429 answers (each retried)", tally.rejected_429),
        row("concurrent: jobs lost", lost, 0, lost == 0),
        row("concurrent: wall s", conc_s),
        row("errors (any answer but 2xx or 429)", len(tally.errors), 0, not tally.errors),
        row("server RSS at start, MiB", rss_start * mib),
        row(f"server RSS after {WARMUP} warm-up jobs, MiB", rss_warm * mib),
        row(f"server RSS after {SEQUENTIAL} sequential jobs, MiB", rss_after_seq * mib),
        row("server RSS at the end, MiB", rss_end * mib),
        row("RSS growth after warm-up", f"{100 * growth:.2f} %", "< 5 %", growth < 0.05),
        row("health at the end", health.get("status"), "ok", health.get("status") == "ok"),
    ]
    report("load", rows, ["measure", "value", "target", "met"])
    for e in tally.errors[:20]:
        print("error:", e)
    if not all(r["met"] in (True, None) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
