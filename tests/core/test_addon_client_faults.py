"""The add-on's client and worker when the server misbehaves: hangs, interrupts, and URLs that are not Concord.

* A server that accepts the connection but never answers must not hold a cancel until the client's timeout:
  the client here waits up to 600 s for an answer, and the test's own hang guard (HANG_GUARD_S, far below
  that) only turns a stuck worker into a failure. So only an event-driven cancel can pass: the outcome asserted
  is the final message (Cancelled, not Failed), never an elapsed time.
* The hangs are real: a loopback socket that accepts and never answers, or a loopback HTTP proxy in front of
  the real app (``tests.harness.InProcessServer``) that holds chosen requests until the test releases them.
  ``StepGate`` holds the job mid-run, so "the job is still running on the server" never depends on speed.
* Ctrl+C (KeyboardInterrupt) raised from ``run_blocking``'s message callback, the deterministic stand-in for a
  SIGINT arriving while a script waits: the interrupt propagates and the server was told to cancel before it did.
* A URL that answers something that is not Concord (a proxy's 404 page, another JSON service) says so, with a hint.
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import socket
import threading

import numpy as np
import pytest

from blender_addon.core import jobs
from blender_addon.core.client import ConcordClient, ServerError
from tests.harness import InProcessServer, StepGate, worker_messages

CLIENT_TIMEOUT_S = 600.0  # the client's own per-answer timeout in these tests: far beyond the hang guard
HANG_GUARD_S = 120.0  # bounds a stuck test; no outcome depends on it


def _depth(n=64):
    d = np.zeros((n, n), np.float32)
    d[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 2.0
    return {"depth": d}


def _worker(url, tmp_path, steps=2):
    return jobs.JobWorker(
        lambda: ConcordClient(url, None, CLIENT_TIMEOUT_S), "depth_image", {"prompt": "a cube", "steps": steps},
        _depth(), tmp_path / "out", poll=0.05,
    )


def _final(worker) -> list:
    """Messages up to the final one, waiting on the worker's queue; the guard only bounds a hang."""
    return worker_messages(worker, HANG_GUARD_S)


def _wait_state(client: ConcordClient, job_id: str, pred) -> dict:
    """Poll the real server until ``pred(status)``; waits on state, the guard only bounds a hang."""
    stop = threading.Event()
    deadline = threading.Timer(HANG_GUARD_S, stop.set)
    deadline.start()
    try:
        while not stop.is_set():
            st = client.status(job_id)
            if pred(st):
                return st
            stop.wait(0.02)
    finally:
        deadline.cancel()
    raise AssertionError(f"job {job_id} never reached the expected state: {st}")


# ------------------------------------------------------------------------------------------- loopback servers
class SilentServer:
    """Accepts a TCP connection on 127.0.0.1, reads the request and never answers; closing it ends the connection."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = threading.Event()
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):  # one connection: the worker's health request
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(conn)
        conn.recv(65536)  # the request arrived: the client now waits for an answer that never comes
        self.accepted.set()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.sock.close()
        for c in self.conns:
            c.close()
        self._thread.join(HANG_GUARD_S)


class HoldingProxy:
    """A loopback HTTP proxy in front of a real server that holds requests matching a rule until released.

    ``hold(method, pattern, when)``: ``when="before"`` holds the request before it reaches the server (a hung
    server); ``"after"`` forwards it, then holds the answer (the server acted, the client hears nothing).
    ``held`` is set when a request is being held; ``release()`` lets every held request go on."""

    def __init__(self, upstream_url: str):
        self.upstream = upstream_url.removeprefix("http://")
        self.rules: list[tuple[str, re.Pattern, str]] = []
        self.held = threading.Event()
        self.released = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                when = next((w for m, p, w in proxy.rules if m == self.command and p.fullmatch(self.path)), None)
                if when == "before":
                    proxy._hold()
                conn = http.client.HTTPConnection(proxy.upstream, timeout=HANG_GUARD_S)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if when == "after":
                    proxy._hold()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def hold(self, method: str, pattern: str, when: str) -> None:
        self.rules.append((method, re.compile(pattern), when))

    def _hold(self):
        self.held.set()
        self.released.wait(HANG_GUARD_S)

    def release(self):
        self.released.set()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------------- hangs
def test_cancel_wins_while_server_accepts_but_never_answers(tmp_path):
    with SilentServer() as silent:
        w = _worker(silent.url, tmp_path).start()
        assert silent.accepted.wait(HANG_GUARD_S), "the worker never connected"
        w.cancel()  # the health request is in flight and will never be answered
        msgs = _final(w)
    assert isinstance(msgs[-1], jobs.Cancelled), msgs[-1]
    assert "before the job was sent" in msgs[-1].message
    assert w.job_id is None and not (tmp_path / "out").exists()


def test_cancel_wins_while_status_hangs_and_reaches_server_when_it_answers(tiny_model, tmp_path):
    with InProcessServer(tiny_model, tmp_path / "data") as srv, StepGate(tiny_model.pipe.unet) as gate, \
            HoldingProxy(srv.url) as proxy:
        proxy.hold("GET", r"/v1/jobs/[^/]+", "before")  # status polls hang once the job runs...
        proxy.hold("POST", r"/v1/jobs/[^/]+/cancel", "before")  # ...and so does the cancel request
        w = _worker(proxy.url, tmp_path, steps=5).start()
        gate.wait_reached()  # the job runs on the server and cannot finish until released
        assert proxy.held.wait(HANG_GUARD_S)  # a status poll is stuck in the proxy
        w.cancel()
        msgs = _final(w)
        assert isinstance(msgs[-1], jobs.Cancelled), msgs[-1]
        assert "did not answer" in msgs[-1].message and msgs[-1].job_id == w.job_id
        # the server comes back: the cancel request that was held is delivered, and the job stops
        proxy.release()
        direct = ConcordClient(srv.url, None, CLIENT_TIMEOUT_S)
        _wait_state(direct, w.job_id, lambda st: st["message"] == "cancelling" or st["state"] == "cancelled")
        gate.release()
        assert _wait_state(direct, w.job_id, lambda st: st["state"] != "running")["state"] == "cancelled"
    assert not (tmp_path / "out").exists()


def test_cancel_while_submit_unanswered_cancels_the_job_the_server_took(tiny_model, tmp_path):
    with InProcessServer(tiny_model, tmp_path / "data") as srv, StepGate(tiny_model.pipe.unet) as gate, \
            HoldingProxy(srv.url) as proxy:
        proxy.hold("POST", r"/v1/jobs", "after")  # the server takes the job; its answer is held
        w = _worker(proxy.url, tmp_path, steps=5).start()
        gate.wait_reached()  # the job runs on the server while the client still waits for the submit answer
        assert proxy.held.wait(HANG_GUARD_S)
        w.cancel()
        msgs = _final(w)
        assert isinstance(msgs[-1], jobs.Cancelled), msgs[-1]
        assert "while sending the job" in msgs[-1].message
        direct = ConcordClient(srv.url, None, CLIENT_TIMEOUT_S)
        (job,) = [j for j in direct._json("GET", "/v1/jobs")["jobs"] if j["state"] == "running"]
        proxy.release()  # the submit answer arrives late: the worker's abandoned call cancels that job
        _wait_state(direct, job["id"], lambda st: st["message"] == "cancelling")
        gate.release()
        assert _wait_state(direct, job["id"], lambda st: st["state"] != "running")["state"] == "cancelled"


def test_interrupt_during_blocking_run_cancels_server_job(tiny_model, tmp_path):
    with InProcessServer(tiny_model, tmp_path / "data") as srv, StepGate(tiny_model.pipe.unet) as gate:
        w = _worker(srv.url, tmp_path, steps=5)
        seen = []

        def on_message(msg):  # Ctrl+C while the job certainly runs on the server (held by the gate)
            seen.append(msg)
            if gate.reached.is_set() and w.job_id is not None and isinstance(msg, jobs.Progress):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            jobs.run_blocking(w, on_message=on_message)
        # run_blocking returned only after the server was told: it is cancelling the job now
        direct = ConcordClient(srv.url, None, CLIENT_TIMEOUT_S)
        assert direct.status(w.job_id)["message"] == "cancelling"
        gate.release()
        assert _wait_state(direct, w.job_id, lambda st: st["state"] != "running")["state"] == "cancelled"
        w.join(HANG_GUARD_S)
        assert not w.is_alive()
        assert gate.calls == 1


# ------------------------------------------------------------------------------------------- not Concord
class _Answer(http.server.BaseHTTPRequestHandler):
    status, ctype, body = 404, "text/html", b"<html><body><h1>404 Not Found</h1>nginx</body></html>"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Type", self.ctype)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_POST = do_GET


@pytest.fixture(params=["proxy-404", "other-json-api", "html-200"])
def not_concord(request):
    kinds = {
        "proxy-404": (404, "text/html", b"<html><body><h1>404 Not Found</h1>nginx</body></html>"),
        "other-json-api": (200, "application/json", json.dumps({"status": "ok", "version": "2.1"}).encode()),
        "html-200": (200, "text/html", b"<html>router login</html>"),
    }
    handler = type("Handler", (_Answer,), dict(zip(("status", "ctype", "body"), kinds[request.param])))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_that_is_not_concord_says_so(not_concord, tmp_path):
    with pytest.raises(ServerError) as info:
        ConcordClient(not_concord, None, 10.0).health()
    err = info.value
    assert "does not lead to a Concord server" in str(err) and not_concord in str(err)
    assert err.hint and "Server URL" in err.hint and "concord serve" in err.hint
    msgs = _final(_worker(not_concord, tmp_path).start())  # the add-on's path: a Failed with the same words
    assert isinstance(msgs[-1], jobs.Failed) and "does not lead to a Concord server" in msgs[-1].message
    assert "Server URL" in msgs[-1].hint


def test_concord_errors_keep_their_own_message(tiny_model, tmp_path):
    with InProcessServer(tiny_model, tmp_path / "data") as srv:
        with pytest.raises(ServerError) as info:
            ConcordClient(srv.url, None, 10.0).status("no-such-job")
    assert info.value.status == 404 and "no job" in str(info.value)
    assert "does not lead to a Concord server" not in str(info.value)
