"""Server benchmarks: cold start of `concord serve --model tiny`, and the round trip of a depth_image job
(submit -> poll -> download) through a real server process on loopback.

    .venv/bin/python bench/server.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from blender_addon.core.client import ConcordClient  # noqa: E402
from concord.serve_process import ServerProcess  # noqa: E402


def sphere_depth(size: int) -> np.ndarray:
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    r2 = xx**2 + yy**2
    return np.where(r2 < 0.64, 3.0 - np.sqrt(np.clip(0.64 - r2, 0, None)), 0.0).astype(np.float32)


def main() -> None:
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="concord-bench-"))
    starts = []
    for i in range(3):
        srv = ServerProcess(tmp / f"s{i}").start()
        starts.append(srv.startup_seconds)
        if i < 2:
            srv.stop()
    rows.append({"case": "cold start, tiny, process spawn -> /v1/health", "median_s": statistics.median(starts), "runs": 3})
    client = ConcordClient(srv.url)
    for size, steps in [(64, 2), (256, 10), (512, 20)]:
        depth = sphere_depth(size)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jid = client.submit("depth_image", {"prompt": "a red ball", "steps": steps}, {"depth": depth})
            client.wait(jid, poll=0.01)
            client.download_result(jid, tmp / "dl" / jid)
            times.append(time.perf_counter() - t0)
        rows.append({"case": f"depth_image round trip {size}x{size}, {steps} steps, CFG", "median_s": statistics.median(times), "runs": 3})
    srv.stop()
    report("server", rows, ["case", "median_s", "runs"])


if __name__ == "__main__":
    main()
