"""Start and stop a real `concord serve` process on a free loopback port (for the demo, benchmarks and tests).

The process is the same command a user runs; this module only picks a port, waits until `/v1/health` answers
(or the process dies, in which case its output is in the error), and stops it with SIGINT so uvicorn runs the
lifespan shutdown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, model: str = "tiny", device: str = "cpu", token: str | None = None, extra_args=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.data_dir = Path(data_dir)
        self.args = [
            sys.executable, "-m", "concord.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--model", model, "--device", device, "--data-dir", str(self.data_dir), "--log-level", "warning",
            *(["--token", token] if token else []), *extra_args,
        ]
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+b")
        self.startup_seconds: float | None = None

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        from blender_addon.core.client import ConcordClient, ServerError

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        client = ConcordClient(self.url, token=self.token, timeout=2.0)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"concord serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                client.health()
                break
            except ServerError:
                if time.perf_counter() - t0 > timeout:
                    self.stop()
                    raise RuntimeError(f"concord serve did not answer within {timeout} s:\n{self.output()}") from None
                time.sleep(0.05)
        self.startup_seconds = time.perf_counter() - t0
        return self

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
