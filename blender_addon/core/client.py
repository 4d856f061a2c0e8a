"""HTTP client for the Concord server, stdlib only (urllib), so Blender's bundled Python can use it.

Blocking calls: the add-on runs them on a worker thread, never on Blender's main thread. Every failure becomes a
`ServerError` with a message a user can act on: server down, refused, wrong token, protocol mismatch, a job
that failed, a timeout. The command line and tests use the same client.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import protocol


NOT_CONCORD_HINT = (
    "check the Server URL in the add-on preferences: it is the address `concord serve` prints when it starts "
    "(by default http://127.0.0.1:8765)"
)


class ServerError(RuntimeError):
    """What went wrong talking to the server, for the user. `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, hint: str | None = None, status: int = 0, field: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.status = status
        self.field = field

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} ({self.hint})" if self.hint else base


class JobCancelledError(ServerError):
    pass


@dataclass
class Progress:
    state: str
    stage: str
    step: int
    total: int
    message: str


def _failed(error: str | None) -> str:
    """The message for a failed job: the server's error, prefixed once with "the job failed"."""
    error = error or "unknown error"
    return error if error.startswith("the job failed") else f"the job failed: {error}"


def encode_multipart(fields: dict[str, tuple[str | None, bytes, str]]) -> tuple[bytes, str]:
    """multipart/form-data body. fields: name -> (filename or None, content, content type)."""
    boundary = "concord-" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, (filename, content, ctype) in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n".encode())
        out.write(content)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def encode_arrays(arrays: dict) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def progress_of(status: dict) -> Progress:
    """A job status as progress. A job may finish between two polls: a done job's progress is always complete
    (step == total > 0), so a progress bar never stops short of full on a finished job."""
    step, total = int(status.get("step") or 0), int(status.get("total") or 0)
    if status["state"] == "done":
        step = total = max(total, 1)
    return Progress(status["state"], status["stage"], step, total, status.get("message", ""))


def is_loopback_url(url: str) -> bool:
    """True when ``url`` names this computer: ``localhost``, 127.0.0.0/8 or ::1 (no name is resolved)."""
    try:
        host = urllib.parse.urlsplit(url.strip()).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConcordClient:
    def __init__(self, url: str = "http://127.0.0.1:8765", token: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token or None
        self.timeout = timeout

    # ------------------------------------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> tuple[bytes, str]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, method, path) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ConnectionRefusedError):
                raise ServerError(
                    f"no Concord server at {self.url} (connection refused)",
                    hint="start it with `concord serve`, or check the URL in the add-on preferences",
                ) from None
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise ServerError(f"{self.url} did not answer within {self.timeout:g} s", hint="is the server busy or hung?") from None
            raise ServerError(f"cannot reach {self.url}: {reason}", hint="check the URL and that the server runs") from None
        except (socket.timeout, TimeoutError):
            raise ServerError(f"{self.url} did not answer within {self.timeout:g} s", hint="is the server busy or hung?") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise ServerError(f"the connection to {self.url} broke: {exc}", hint="the server may have stopped") from None

    def _http_error(self, exc: urllib.error.HTTPError, method: str = "GET", path: str = "") -> ServerError:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        if not isinstance(body, dict) or not body.get("error"):
            # Every Concord error is JSON with an "error" field: this answer came from something else (another
            # web server, a proxy's 404 page, a captive portal).
            hint = NOT_CONCORD_HINT
            if exc.code == 401:
                hint = "if a proxy asks for a login, point the add-on at the Concord server itself; " + hint
            return ServerError(
                f"{self.url} does not lead to a Concord server: it answered HTTP {exc.code} {exc.reason} to {method} {path}",
                hint=hint,
                status=exc.code,
            )
        message = body.get("error")
        hint = body.get("hint")
        if exc.code == 401:
            hint = hint or "set the server's token in the add-on preferences"
        return ServerError(message, hint=hint, status=exc.code, field=body.get("field"))

    def _json(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> dict:
        data, _ = self._request(method, path, body, ctype)
        try:
            return json.loads(data)
        except ValueError:
            raise ServerError(
                f"{self.url} does not lead to a Concord server: {method} {path} answered with something that is not JSON",
                hint=NOT_CONCORD_HINT,
            ) from None

    # ------------------------------------------------------------------------------------------------ API
    def health(self) -> dict:
        """The server's health, after checking it speaks our protocol version."""
        h = self._json("GET", "/v1/health")
        if not isinstance(h, dict) or "protocol_version" not in h:
            raise ServerError(f"{self.url} does not lead to a Concord server: its /v1/health is not Concord's", hint=NOT_CONCORD_HINT)
        version = h.get("protocol_version")
        if version != protocol.PROTOCOL_VERSION:
            raise ServerError(
                f"the server speaks protocol {version}, this add-on speaks {protocol.PROTOCOL_VERSION}",
                hint="update the add-on and the server to the same Concord release",
            )
        if h.get("status", "ok") != "ok":  # the server answers but its job worker cannot run jobs
            raise ServerError(
                f"the Concord server at {self.url} cannot run jobs now: {h.get('problem') or 'its job worker stopped'}",
                hint="restart `concord serve`; its log says what went wrong",
            )
        return h

    def submit(self, kind: str, params: dict, arrays: dict | None = None) -> str:
        fields = {"request": (None, json.dumps({"kind": kind, "params": params}).encode(), "application/json")}
        if arrays:
            fields["arrays"] = ("arrays.npz", encode_arrays(arrays), "application/octet-stream")
        body, ctype = encode_multipart(fields)
        return self._json("POST", "/v1/jobs", body, ctype)["id"]

    def status(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel", b"")

    def result_zip(self, job_id: str) -> bytes:
        data, _ = self._request("GET", f"/v1/jobs/{job_id}/result")
        return data

    def download_result(self, job_id: str, out_dir: Path) -> list[Path]:
        """Fetch every result file into ``out_dir``, which appears only once complete.

        The files are written into a hidden sibling ``.<name>.partial`` folder that is renamed to ``out_dir``
        after the last byte is on disk (the server's results work the same way): a broken download (server
        gone, disk full, a bad archive) leaves nothing that looks finished. ``out_dir`` must not exist yet or
        be empty."""
        out_dir = Path(out_dir)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise ServerError(f"the result folder {out_dir} already has files", hint="choose a new, empty folder")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        partial = out_dir.with_name(f".{out_dir.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier broken download
        partial.mkdir()
        try:
            data = self.result_zip(job_id)
            names = []
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for name in zf.namelist():
                    target = (partial / name).resolve()
                    if partial.resolve() not in target.parents:
                        raise ServerError(f"the server sent an unsafe file name {name!r}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(name))
                    names.append(name)
            if out_dir.is_dir():
                out_dir.rmdir()  # empty (checked above)
            os.replace(partial, out_dir)
        except zipfile.BadZipFile:
            shutil.rmtree(partial, ignore_errors=True)
            raise ServerError(f"the result of job {job_id} arrived damaged (not a complete zip archive)",
                              hint="download it again; if it persists, the server's disk may be full") from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return [(out_dir / name).resolve() for name in names]

    def wait(self, job_id: str, on_progress=None, poll: float = 0.2, should_cancel=None, deadline: float | None = None) -> dict:
        """Poll until the job ends. Returns the final status when done; raises ServerError / JobCancelledError."""
        cancel_sent = False
        start = time.monotonic()
        while True:
            st = self.status(job_id)
            if on_progress:
                on_progress(progress_of(st))
            if st["state"] == "done":
                return st
            if st["state"] == "failed":
                err = st.get("error") or {}
                raise ServerError(_failed(err.get("error")), hint=err.get("hint"), field=err.get("field"))
            if st["state"] == "cancelled":
                raise JobCancelledError("the job was cancelled")
            if should_cancel is not None and should_cancel() and not cancel_sent:
                self.cancel(job_id)
                cancel_sent = True
            if deadline is not None and time.monotonic() - start > deadline:
                raise ServerError(f"the job did not finish within {deadline:g} s", hint="it is still running on the server")
            time.sleep(poll)

