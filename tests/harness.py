"""Deterministic control over a running job, for tests that must not depend on how fast the machine is.

- :class:`StepGate` holds a model's denoiser at its n-th call until the test releases it. A test that wants
  "the job is running and not finished" (to cancel it, to fill the queue behind it, to ask for its result
  early) waits for ``reached`` instead of hoping a long job is still running when the next request arrives.
- :class:`InProcessServer` is the real app under the real uvicorn on a free loopback port, in a thread of the
  test process, so a test can gate the very model the HTTP server runs. (``concord.serve_process`` starts the
  same app as a subprocess, which a test cannot gate.)

The only timeouts here are hang guards: generous bounds that turn a bug (a job that never reaches the gate,
a server that never starts) into a failure instead of a stuck suite. No outcome depends on them.
"""

from __future__ import annotations

import queue
import socket
import threading

import pytest
from pathlib import Path

HANG_GUARD_S = 600.0


class StepGate:
    """Wrap ``module.forward`` (e.g. a model's UNet) so that its ``at_call``-th call blocks until released.

    ``calls`` counts every call. Use as a context manager: leaving it releases the gate and restores the
    module's own forward.
    """

    def __init__(self, module, at_call: int = 1):
        self.module = module
        self.at_call = at_call
        self.calls = 0
        self.reached = threading.Event()
        self.released = threading.Event()
        self._had_instance_forward = "forward" in vars(module)
        self._original = module.forward

    def __enter__(self) -> "StepGate":
        original = self._original

        def gated(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at_call:
                self.reached.set()
                if not self.released.wait(HANG_GUARD_S):
                    raise RuntimeError("StepGate: the test never released the gate")
            return original(*args, **kwargs)

        self.module.forward = gated
        return self

    def wait_reached(self) -> None:
        assert self.reached.wait(HANG_GUARD_S), f"the denoiser was never called {self.at_call} time(s)"

    def release(self) -> None:
        self.released.set()

    def __exit__(self, *exc) -> None:
        self.release()
        if self._had_instance_forward:
            self.module.forward = self._original
        else:
            del self.module.forward


class InProcessServer:
    """The real Concord app (``create_app``) served by uvicorn on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, model, data_dir: Path, **settings):
        import uvicorn

        from concord.api.app import ServerSettings, create_app

        self.app = create_app(ServerSettings(data_dir=Path(data_dir), **settings), model=model)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))  # bound before the thread starts: no port race with other tests
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "InProcessServer":
        from blender_addon.core.client import ConcordClient, ServerError

        self._thread.start()
        client = ConcordClient(self.url, timeout=HANG_GUARD_S)
        # uvicorn sets `started` after the lifespan ran and the socket listens; wait on that state.
        stop = threading.Event()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the in-process server stopped during start-up")
            stop.wait(0.01)
        try:
            client.health()
        except ServerError as exc:  # pragma: no cover - a start-up bug
            self.__exit__(None, None, None)
            raise RuntimeError(f"the in-process server does not answer: {exc}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(HANG_GUARD_S)
        self._sock.close()


def worker_messages(worker, guard: float = HANG_GUARD_S) -> list:
    """Every message of an add-on ``JobWorker`` up to and including its final one, waiting on the worker's
    queue (no clock); then the worker has ended and nothing follows the final message."""
    from blender_addon.core import jobs

    msgs: list = []
    while not (msgs and isinstance(msgs[-1], jobs.FINAL)):
        try:
            msgs.append(worker.messages.get(timeout=guard))
        except queue.Empty:
            raise AssertionError(f"no message within the {guard:g} s hang guard: {msgs}") from None
    worker.join(guard)
    assert not worker.is_alive(), "the worker runs on after its final message"
    assert worker.drain() == [], "nothing may follow the final message"
    return msgs



def one_torch_thread():
    """An autouse, module-scoped fixture that runs torch on one thread (assign it in a test module:
    ``_one_thread = one_torch_thread()``). The models those modules run are small: one thread is as fast as two,
    and two threads on a busy 2-core machine are not."""

    @pytest.fixture(autouse=True, scope="module")
    def _one_thread():
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(old)

    return _one_thread
