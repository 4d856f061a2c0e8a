"""The HTTP server: FastAPI routes over the job manager, the model loaded once in the app's lifespan.

Routes (protocol in `schemas.py`, prose in docs/protocol.md):
  GET  /v1/health                 server, model, device, queue, and whether jobs can run (ok / degraded)
  GET  /v1/models                 presets and whether each loads offline now
  POST /v1/jobs                   multipart: `request` (JSON) + `arrays` (.npz) -> 202 {id}; 429 queue full; 413 too big;
                                  503 stopping, no job worker, or the data dir cannot store it
  GET  /v1/jobs                   recent jobs
  GET  /v1/jobs/{id}              state, stage, step/total, message, error
  GET  /v1/jobs/{id}/result       the result files as one .zip, once done
  GET  /v1/jobs/{id}/result/{name} one result file
  POST /v1/jobs/{id}/cancel       stop a queued or running job (a running sampler stops within one step)

Every error answer is `ErrorBody` JSON (`{error, field, hint}`), whatever raised it. When a token is set every
request needs `Authorization: Bearer <token>`. A 405 lists in `Allow` every method served at the path. The
OpenAPI document (`_install_openapi`, `_errors`, `_links`, `_job_request_body`) lists exactly the statuses each
route answers, with links from a created job to its routes; tests/api/test_openapi_conformance.py checks it.

Never runs model code on the event loop: jobs run on the manager's worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import zipfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from concord import __version__
from concord.api import schemas
from concord.api.arrays import ArrayError, decode_npz, validate_arrays
from concord.api.schemas import ErrorBody, JobState
from concord.jobs.context import JobInputError
from concord.jobs.manager import Job, JobManager, JobNotFound, NotAccepting, QueueFull, StorageError
from concord.models.registry import DEFAULT_MODEL

log = logging.getLogger(__name__)

_REQUEST_ADAPTER = TypeAdapter(schemas.JobRequest)


@dataclass
class ServerSettings:
    model: str = DEFAULT_MODEL
    model_config: str | None = None  # a single file's configuration folder (`load_model(config=)`)
    device: str = "auto"
    data_dir: Path = field(default_factory=lambda: Path.home() / ".concord")
    token: str | None = None
    max_queue: int = 8
    max_history: int = 500
    max_upload_mb: int = 256


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None, hint: str | None = None, headers=None):
        super().__init__(error)
        self.status = status
        self.body = ErrorBody(error=error, field=field, hint=hint)
        self.headers = headers


def _error_response(status: int, body: ErrorBody, headers=None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"), headers=headers)


_ERROR_DESCRIPTIONS = {
    400: "Malformed request: unreadable multipart, JSON or .npz, or a bad Content-Length header.",
    401: "Missing or wrong bearer token (only when the server was started with a token).",
    404: "No such job, or no such file in its result.",
    409: "The job is not done, so it has no result (yet, or ever: failed and cancelled jobs have none).",
    413: "The request is larger than the server accepts (--max-upload-mb).",
    415: "A job must be sent as multipart/form-data.",
    422: "Well-formed but invalid: parameters, a missing or unexpected part, or arrays that break the job kind's "
    "contract (names, dtypes, shapes, values: see the `arrays` part's description).",
    429: "The job queue is full; retry after `Retry-After` seconds.",
    503: "The server takes no jobs now: it is shutting down, its job worker stopped, or the job could not be stored "
    "in its data dir (the error says which).",
}
# Every route can answer these: the token and the size limit are checked before routing.
_COMMON_ERRORS = (400, 401, 413)


def _errors(*codes: int) -> dict:
    """OpenAPI `responses` entries (ErrorBody) for exactly the error statuses a route answers."""
    out = {}
    for code in sorted({*_COMMON_ERRORS, *codes}):
        entry = {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]}
        if code == 429:
            entry["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
        out[code] = entry
    return out


def _links(expr: str, *operations: str) -> dict:
    """OpenAPI links from a response carrying a job id at `expr` to the job routes that take it."""
    return {op[0].upper() + op[1:]: {"operationId": op, "parameters": {"job_id": expr}} for op in operations}


_JOB_ROUTES = ("getJob", "cancelJob", "getJobResult", "getJobResultFile")




def create_app(settings: ServerSettings, model=None) -> FastAPI:
    """Build the app. `model`: an already loaded `LoadedModel` (the CLI loads it first to fail fast); when None the
    lifespan loads `settings.model`."""
    from concord.pipelines.kinds import JOB_KINDS

    state: dict = {}

    def execute(job: Job, ctx) -> None:
        kind = JOB_KINDS[job.kind]
        try:
            kind.run(state["model"], job.params, job.arrays, ctx)
        finally:
            _free_device_memory(state["model"].device)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from concord.models.registry import load_model

        state["model"] = model if model is not None else await asyncio.to_thread(
            load_model, settings.model, settings.device, settings.model_config
        )
        manager = JobManager(settings.data_dir, execute, max_queue=settings.max_queue, max_history=settings.max_history)
        manager.start()
        state["manager"] = manager
        try:
            yield
        finally:
            await asyncio.to_thread(manager.stop)

    app = FastAPI(
        title="Concord",
        version=__version__,
        summary="Local job server for consistent multi-image diffusion (protocol v%d)." % schemas.PROTOCOL_VERSION,
        lifespan=lifespan,
    )
    max_bytes = settings.max_upload_mb * 1024 * 1024

    # ----------------------------------------------------------------------------------------------- middleware
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if settings.token:
            got = request.headers.get("authorization", "")
            want = f"Bearer {settings.token}"
            if not hmac.compare_digest(got.encode(), want.encode()):
                return _error_response(
                    401,
                    ErrorBody(
                        error="missing or wrong token" if got else "this server needs a token",
                        field="Authorization",
                        hint="send `Authorization: Bearer <token>` with the token the server was started with",
                    ),
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > max_bytes
            except ValueError:
                return _error_response(400, ErrorBody(error="bad Content-Length header", field="Content-Length"))
            if too_big:
                return _error_response(413, _too_large(settings.max_upload_mb))
        return await call_next(request)

    # ----------------------------------------------------------------------------------------------- error bodies
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(exc.status, exc.body, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; RFC 9110 wants every method served there.
            allowed = ", ".join(_methods_served(app, request.scope))
            body = ErrorBody(
                error=f"{request.method} is not served at {request.url.path}",
                hint=f"this path serves: {allowed}; see docs/protocol.md for the routes",
            )
            return _error_response(405, body, {"Allow": allowed})
        hint = "see docs/protocol.md for the routes" if exc.status_code == 404 else None
        return _error_response(exc.status_code, ErrorBody(error=str(exc.detail), hint=hint), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # A bug, not the client's fault: still an ErrorBody (Starlette logs the traceback).
        body = ErrorBody(error=f"internal server error ({type(exc).__name__})", hint="see the server log; please report it")
        return _error_response(500, body)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return _error_response(422, ErrorBody(error=first["msg"], field=".".join(str(p) for p in first["loc"])))

    # ----------------------------------------------------------------------------------------------- routes
    def manager() -> JobManager:
        return state["manager"]

    def find(job_id: str) -> schemas.JobStatus:
        """A consistent snapshot of the job's status, or a 404."""
        try:
            return manager().status(job_id)
        except JobNotFound:
            raise ApiError(404, f"no job {job_id!r}", field="id", hint="list jobs with GET /v1/jobs") from None

    @app.get("/v1/health", response_model=schemas.HealthResponse, tags=["server"], operation_id="getHealth", responses=_errors())
    def health() -> schemas.HealthResponse:
        m = state["model"]
        problem = manager().worker_problem
        return schemas.HealthResponse(
            protocol_version=schemas.PROTOCOL_VERSION,
            server_version=__version__,
            model=m.name,
            model_kind=m.kind,
            recommended=schemas.RecommendedSettings(**m.settings.as_dict()),
            device=m.device,
            dtype=m.dtype,
            queue_length=manager().queue_length,
            queue_capacity=manager().max_queue,
            busy=manager().busy,
            job_kinds=sorted(JOB_KINDS),
            status="ok" if problem is None else "degraded",
            worker_alive=problem is None,
            problem=problem,
        )

    @app.get("/v1/models", response_model=schemas.ModelsResponse, tags=["server"], operation_id="listModels", responses=_errors())
    def models() -> schemas.ModelsResponse:
        from concord.models.registry import PRESETS, offline_status, preset_recommended

        out = []
        for p in PRESETS.values():
            ok, reason = offline_status(p.name)
            out.append(
                schemas.ModelInfo(
                    name=p.name,
                    description=p.description,
                    kind=p.kind,
                    sources=[s for s in (p.base, p.controlnet) if s],
                    loaded=p.name == state["model"].name,
                    available_offline=ok,
                    reason=reason,
                    recommended=schemas.RecommendedSettings(**preset_recommended(p).as_dict()),
                )
            )
        m = state["model"]
        if m.name not in PRESETS:  # a local folder or single file: listed too, with its kind's settings
            out.append(
                schemas.ModelInfo(
                    name=m.name,
                    description=f"local {m.kind} model",
                    kind=m.kind,
                    sources=list(m.sources),
                    loaded=True,
                    available_offline=True,
                    recommended=schemas.RecommendedSettings(**m.settings.as_dict()),
                )
            )
        return schemas.ModelsResponse(models=out)

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=schemas.JobCreated,
        tags=["jobs"],
        operation_id="createJob",
        responses={202: {"links": _links("$response.body#/id", *_JOB_ROUTES)}, **_errors(415, 422, 429, 503)},
        openapi_extra={"requestBody": _job_request_body()},
    )
    async def create_job(request: Request) -> schemas.JobCreated:
        body = await _read_body_limited(request, max_bytes, settings.max_upload_mb)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(
                415 if body else 400,
                "a job is sent as multipart/form-data",
                field="Content-Type",
                hint="send a `request` part (JSON) and an `arrays` part (.npz); see docs/protocol.md",
            )
        try:
            # Room for a few unexpected parts, so that they are named in a 422 rather than lost in a parser limit.
            form = await request.form(max_files=_MAX_PARTS, max_fields=_MAX_PARTS, max_part_size=1024 * 1024)
        except Exception as exc:  # multipart parser errors come in several types
            raise ApiError(400, f"unreadable multipart body ({exc})", hint="see docs/protocol.md for the format") from None
        unknown = sorted(set(form.keys()) - {"request", "arrays"})
        if unknown:
            raise ApiError(422, f"unexpected part {unknown[0]!r}", field=unknown[0], hint="send only `request` and `arrays`")
        for name in ("request", "arrays"):
            if len(form.getlist(name)) > 1:
                raise ApiError(422, f"the `{name}` part is sent more than once", field=name, hint="send each part once")
        raw = form.get("request")
        if raw is None:
            raise ApiError(422, "missing the `request` part", field="request", hint='send {"kind": ..., "params": {...}} as JSON')
        if not isinstance(raw, str):
            raw = (await raw.read()).decode("utf-8", errors="replace")
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"the `request` part is not valid JSON ({exc})", field="request") from None
        job_req = _parse_job_request(payload)
        kind = JOB_KINDS[job_req.kind]

        upload = form.get("arrays")
        if upload is None:
            needed = [s.name for s in kind.arrays.specs if s.required]
            if needed:
                raise ApiError(
                    422,
                    f"missing the `arrays` part: a `{job_req.kind}` job needs arrays {', '.join(needed)}",
                    field="arrays",
                    hint="send them as one .npz file part named `arrays` (numpy.savez); see docs/protocol.md",
                )
            arrays = {}
        elif isinstance(upload, str):
            raise ApiError(422, "the `arrays` part must be a file (.npz)", field="arrays", hint="send it as a file part")
        else:
            data = await upload.read()
            try:
                arrays = await asyncio.to_thread(decode_npz, data, max_bytes * 4)
            except ArrayError as exc:
                raise ApiError(400 if exc.field == "arrays" else 422, str(exc), exc.field, exc.hint) from None
        try:
            arrays = await asyncio.to_thread(validate_arrays, arrays, kind.arrays)
            kind.check_inputs(job_req.params, arrays)
        except (ArrayError, JobInputError) as exc:
            raise ApiError(422, str(exc), exc.field, exc.hint) from None
        try:
            job = manager().submit(job_req.kind, job_req.params, arrays)
        except QueueFull as exc:
            raise ApiError(
                429, f"the job queue is full: {exc}", hint="wait for a job to finish, then retry", headers={"Retry-After": "5"}
            ) from None
        except (NotAccepting, StorageError) as exc:
            raise ApiError(503, str(exc), hint=exc.hint) from None
        return schemas.JobCreated(id=job.id, kind=job.kind, state=job.state)

    @app.get(
        "/v1/jobs",
        response_model=schemas.JobList,
        tags=["jobs"],
        operation_id="listJobs",
        responses=_errors(),
    )
    def list_jobs() -> schemas.JobList:
        return schemas.JobList(jobs=manager().statuses())

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=schemas.JobStatus,
        tags=["jobs"],
        operation_id="getJob",
        responses={200: {"links": _links("$response.body#/id", "cancelJob", "getJobResult", "getJobResultFile")}, **_errors(404)},
    )
    def job_status(job_id: str) -> schemas.JobStatus:
        return find(job_id)

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        response_model=schemas.JobStatus,
        tags=["jobs"],
        operation_id="cancelJob",
        responses={200: {"links": _links("$response.body#/id", "getJob", "getJobResult")}, **_errors(404)},
    )
    def cancel_job(job_id: str) -> schemas.JobStatus:
        find(job_id)
        return manager().cancel(job_id)

    def done_job(job_id: str) -> schemas.JobStatus:
        job = find(job_id)
        if job.state != JobState.done:
            hint = "poll GET /v1/jobs/{id} until state is done" if job.state in (JobState.queued, JobState.running) else None
            raise ApiError(409, f"job {job_id} is {job.state.value}, it has no result", field="id", hint=hint)
        return job

    @app.get(
        "/v1/jobs/{job_id}/result",
        tags=["jobs"],
        operation_id="getJobResult",
        responses={200: {"content": {"application/zip": {}}, "description": "Every result file, zipped."}, **_errors(404, 409)},
    )
    def job_result(job_id: str) -> Response:
        job = done_job(job_id)
        root = manager().result_dir(job.id)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name in job.files:
                zf.write(root / name, name)
        return Response(
            buf.getvalue(),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="concord-{job.id}.zip"'},
        )

    @app.get(
        "/v1/jobs/{job_id}/result/{name:path}",
        tags=["jobs"],
        operation_id="getJobResultFile",
        responses={200: {"content": {"application/octet-stream": {}}, "description": "One result file."}, **_errors(404, 409)},
    )
    def job_result_file(job_id: str, name: str) -> FileResponse:
        job = done_job(job_id)
        if name not in job.files:
            raise ApiError(404, f"job {job_id} has no file {name!r}", field="name", hint=f"files: {', '.join(job.files)}")
        return FileResponse(manager().result_dir(job.id) / name)

    _install_openapi(app)
    return app


_MAX_PARTS = 16
_ARRAYS_MEDIA_TYPE = "application/octet-stream"


def _job_request_body() -> dict:
    """The documented body of POST /v1/jobs, exactly as `create_job` parses it.

    Two parts, nothing else (`additionalProperties: false`: an unexpected part is a 422, like an unknown JSON
    field). `arrays` is required for the kinds whose array contract has a required array (all kinds today);
    if kinds ever differ, the body becomes a `oneOf` per group of kinds. What JSON Schema cannot say about
    the .npz (member names, dtypes, shapes, values) is in the part's description and answered with a 422.
    """
    from concord.pipelines.kinds import JOB_KINDS

    def arrays_text(kinds) -> str:
        lines = []
        for name in kinds:
            specs = JOB_KINDS[name].arrays.specs
            members = ", ".join(
                f"`{s.name}` {'|'.join(s.dtypes)} ({', '.join(map(str, s.shape))})" + ("" if s.required else " optional")
                for s in specs
            )
            lines.append(f"`{name}`: {members}")
        return (
            "One .npz file (numpy.savez or savez_compressed; no pickles) holding the job kind's arrays by name. "
            "Arrays must be finite; shape letters must agree across arrays; extra or missing arrays are refused. "
            + "; ".join(lines)
            + ". See docs/protocol.md."
        )

    def variant(kinds, arrays_required: bool) -> dict:
        request = (
            {"$ref": "#/components/schemas/JobRequest"}
            if len(kinds) == len(JOB_KINDS)
            else {"oneOf": [{"$ref": f"#/components/schemas/{_job_model_name(k)}"} for k in kinds]}
        )
        return {
            "type": "object",
            "properties": {
                "request": request,
                "arrays": {"type": "string", "format": "binary", "description": arrays_text(kinds)},
            },
            "required": ["request", "arrays"] if arrays_required else ["request"],
            "additionalProperties": False,
        }

    groups: dict[bool, list[str]] = {}
    for name, kind in sorted(JOB_KINDS.items()):
        groups.setdefault(any(s.required for s in kind.arrays.specs), []).append(name)
    variants = [variant(kinds, needs) for needs, kinds in sorted(groups.items(), reverse=True)]
    schema = variants[0] if len(variants) == 1 else {"oneOf": variants}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": schema,
                "encoding": {"request": {"contentType": "application/json"}, "arrays": {"contentType": _ARRAYS_MEDIA_TYPE}},
            }
        },
    }


def _job_model_name(kind: str) -> str:
    """The component name of a kind's `*Job` model in the `JobRequest` union."""
    from typing import get_args

    for model in get_args(get_args(schemas.JobRequest)[0]) or (get_args(schemas.JobRequest)[0],):
        if get_args(model.model_fields["kind"].annotation)[0] == kind:
            return model.__name__
    raise KeyError(kind)


def _parse_job_request(payload):
    """The validated `JobRequest` variant (one `*Job` model of `schemas.JobRequest`), or an ApiError."""
    from concord.pipelines.kinds import JOB_KINDS

    if not isinstance(payload, dict):
        raise ApiError(422, "the `request` part must be a JSON object", field="request", hint='{"kind": ..., "params": {...}}')
    kind = payload.get("kind")
    if kind not in JOB_KINDS:
        raise ApiError(
            422,
            f"unknown job kind {kind!r}" if kind is not None else "missing job kind",
            field="kind",
            hint=f"one of: {', '.join(sorted(JOB_KINDS))}",
        )
    try:
        return _REQUEST_ADAPTER.validate_python(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if str(p) != kind]
        return_field = ".".join(loc) or "request"
        raise ApiError(422, f"{return_field}: {err['msg']}", field=return_field, hint=_hint_for(err)) from None


def _hint_for(err: dict) -> str | None:
    t = err.get("type", "")
    if t == "extra_forbidden":
        return "remove it: unknown fields are refused so typos do not pass silently"
    if t == "missing":
        return "this field is required"
    ctx = err.get("ctx") or {}
    bounds = [f"{k.replace('_', ' ')} {v}" for k, v in ctx.items() if k in ("ge", "le", "gt", "lt", "max_length", "min_length")]
    return ("allowed: " + ", ".join(bounds)) if bounds else None


def _too_large(limit_mb: int) -> ErrorBody:
    return ErrorBody(
        error=f"the request is larger than this server accepts ({limit_mb} MiB)",
        field="arrays",
        hint="send fewer or smaller views, or start the server with a larger --max-upload-mb",
    )


async def _read_body_limited(request: Request, max_bytes: int, limit_mb: int) -> bytes:
    """Read the body, stopping at the limit even when no Content-Length was sent (chunked uploads)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, _too_large(limit_mb).error, "arrays", _too_large(limit_mb).hint)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette serves the cached body to request.form()
    return body


def _free_device_memory(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _methods_served(app: FastAPI, scope) -> list[str]:
    """Every HTTP method some route serves at the scope's path (for the `Allow` header of a 405)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches({**scope, "type": "http"})[0] != Match.NONE:
            methods |= set(route_methods)
    return sorted(methods)


def _install_openapi(app: FastAPI) -> None:
    """Add the job request union to the OpenAPI components (the route parses multipart by hand)."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        doc["info"]["x-protocol-version"] = schemas.PROTOCOL_VERSION
        extra = _REQUEST_ADAPTER.json_schema(ref_template="#/components/schemas/{model}")
        comps = doc.setdefault("components", {}).setdefault("schemas", {})
        comps.update(extra.pop("$defs", {}))
        comps["JobRequest"] = extra
        # FastAPI documents a 422 (HTTPValidationError) for every route with parameters; these routes parse nothing
        # it could refuse (a job id is any string), so the only 422s are the ErrorBody ones declared per route.
        for ops in doc["paths"].values():
            for op in ops.values():
                resp = op.get("responses", {}).get("422", {})
                if "HTTPValidationError" in json.dumps(resp):
                    del op["responses"]["422"]
        if "HTTPValidationError" not in json.dumps(doc["paths"]):
            comps.pop("HTTPValidationError", None)
            comps.pop("ValidationError", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
