"""The ``phitune serve`` application: the local backend behind OpenAI's REST shapes.

One :class:`~phitune.backends.local.LocalBackend`, and so one model pool, lives as long as the app: several adapters
on one base model share a single loaded copy of the base. Blocking work (SQLite, dataset validation) runs in worker
threads; each generation runs start to end in a thread of its own, and stops within a token when its client goes
away, at its deadline, or at the end of what the model's context leaves. No answer carries a path of the server's
file system, and without an API key only requests that name this machine (``Host``, ``Origin``) are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__, catalog
from .. import openai_shapes as shapes
from .._client import Client
from ..backends.local import LocalBackend, chat_completion
from ..errors import (
    ConflictError,
    DatasetError,
    MissingDependencyError,
    NotFoundError,
    PhituneError,
    SpecError,
    UnsupportedOptionError,
    WontFitError,
    scrub_paths,
)
from ..types import FileObject, JobEvent
from . import is_loopback
from ._upload import MalformedUpload, UploadTooLarge, receive_upload
from .dashboard import add_dashboard

if TYPE_CHECKING:
    from ..engines.torch_engine import Generation

logger = logging.getLogger("phitune.server")

DEFAULT_MAX_UPLOAD_BYTES = 1 << 30
DEFAULT_MAX_PENDING_CHATS = 4
DEFAULT_GENERATION_SECONDS = 120.0
"""How long one chat request may generate before it ends with ``finish_reason`` ``"length"``."""

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EVENT_ID = re.compile(r"^ftevent-\d+$")
_UNION_TAGS = frozenset({"int", "float", "str", "bool", "dict", "list", "none"})
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------- errors
class HTTPError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = dict(self.headers or {})
        if self.status in (400, 404, 409, 413):
            headers["x-should-retry"] = "false"  # openai-python retries 409 otherwise
        return JSONResponse(body, status_code=self.status, headers=headers)


def _from_phitune(exc: PhituneError) -> HTTPError:
    """The HTTP status and OpenAI error fields of a phitune error, its message without the server's paths."""
    message = scrub_paths(exc.message)
    if isinstance(exc, UnsupportedOptionError):
        return HTTPError(400, message, param=exc.field, code="unsupported_option")
    if isinstance(exc, SpecError):
        return HTTPError(400, message, param=exc.field, code="invalid_value")
    if isinstance(exc, DatasetError):
        return HTTPError(400, message, param="file", code="invalid_file")
    if isinstance(exc, WontFitError):
        return HTTPError(400, message, code="wont_fit")
    if isinstance(exc, NotFoundError):
        return HTTPError(404, message, code="not_found")
    if isinstance(exc, ConflictError):
        return HTTPError(409, message, code="conflict")
    if isinstance(exc, MissingDependencyError):
        return HTTPError(501, message, type="server_error", code="missing_dependency")
    return _internal_error()


def _internal_error() -> HTTPError:
    return HTTPError(500, "The server had an error while processing your request.", type="server_error")


def _validation_error(exc: RequestValidationError) -> HTTPError:
    first = exc.errors()[0]
    parts = [str(p) for p in first["loc"][1:]]  # after "body" / "query" / ...
    param = ".".join(p for p in parts if "[" not in p and p not in _UNION_TAGS) or None
    problem = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
    return HTTPError(400, f"{param or 'request'}: {problem}", param=param, code="invalid_value")


# ------------------------------------------------------------------------------------------------- requests
class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    """A chat message; ``content`` may be a string or a list of text parts. Other fields (``name``) are ignored."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``. Options the local engine cannot honour (``stop``, ``tools``, ``logprobs``,
    penalties, ``n`` > 1) are refused by name rather than ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = Field(None, description="An end-user id; accepted and not stored.")


class DeploymentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    name: str
    engine: str = "torch"


# ------------------------------------------------------------------------------------------------- helpers
def _list(data: Sequence[dict[str, Any]], *, has_more: bool = False) -> dict[str, Any]:
    """OpenAI's list shape."""
    return {
        "object": "list",
        "data": list(data),
        "has_more": has_more,
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
    }


def _page(items: Sequence[T], ids: Sequence[str], after: str | None, limit: int) -> tuple[list[T], bool]:
    """The ``limit`` items after the one whose id is ``after`` (cursor pagination), and whether more follow."""
    start = 0
    if after is not None:
        if after not in ids:
            raise SpecError("after", f"{after!r} is not an id of this list")
        start = ids.index(after) + 1
    return list(items[start : start + limit]), start + limit < len(items)


class _ChatLimiter:
    """At most ``limit`` chat requests generating or waiting for the model at once; more are answered 429. Used from
    the event loop only, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise HTTPError(
                429,
                f"{self.active} chat requests are in progress; retry shortly",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


class _TokenStream:
    """One generation run start to end in its own thread, its pieces handed to the event loop through a queue."""

    _END = object()

    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop = threading.Event()
        threading.Thread(target=self._run, args=(start,), name="phitune-generate", daemon=True).start()

    def _put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self, start: Callable[[], Iterator[Any]]) -> None:
        try:
            pieces = start()
            try:
                for piece in pieces:
                    self._put(piece)
                    if self._stop.is_set():
                        break
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()  # in this thread, which holds the model pool's lock
        except BaseException as exc:
            self._put(exc)
        self._put(self._END)

    async def next(self) -> Any:
        """The next piece; raises what the generation raised; ``None`` at the end."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is self._END else item

    def stop(self) -> None:
        self._stop.set()


class _ChatStream(StreamingResponse):
    """A streamed chat answer that frees its limiter slot and stops its generation however the response ends
    (finished, client gone, or never started)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _stop_when_gone(request: Request, stream: _TokenStream) -> None:
    """Stop ``stream`` when the client of ``request`` disconnects (a task, cancelled once the answer is sent)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    stream.stop()


class _LoopbackOnly:
    """Without an API key, serve only requests that name this machine: a loopback ``Host`` and, where the browser
    sends one, a loopback ``Origin``. A web page whose own name its DNS rebinds to 127.0.0.1 sends that name, and
    is refused (403)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if not _names_this_machine(headers.get("host", "")) or (
                origin not in (None, "null") and not _names_this_machine(urlsplit(origin).netloc)
            ):
                message = "This server has no API key and answers requests for a loopback host name only."
                await HTTPError(403, message, code="invalid_host").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _names_this_machine(authority: str) -> bool:
    """Whether a ``host[:port]`` (``[::1]:8000`` too) names this machine by loopback."""
    host = urlsplit(f"//{authority}").hostname
    return host is not None and is_loopback(host)


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# ----------------------------------------------------------------------------------------------------- app
def create_app(
    home: str | Path,
    *,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pending_chats: int = DEFAULT_MAX_PENDING_CHATS,
    generation_seconds: float = DEFAULT_GENERATION_SECONDS,
) -> FastAPI:
    """The ASGI app serving the phitune home ``home``. With ``api_key``, every request must carry it
    (``Authorization: Bearer <key>`` or ``api-key: <key>``); without one, only requests naming a loopback host are
    served. A chat request generates for at most ``generation_seconds``."""
    backend = LocalBackend(home)
    client = Client(backend=backend)
    limiter = _ChatLimiter(max_pending_chats)
    expected = api_key.encode() if api_key else None

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        supplied = header[7:] if header[:7].lower() == "bearer " else request.headers.get("api-key", "")
        if not hmac.compare_digest(supplied.encode(), expected):
            raise HTTPError(401, "Incorrect or missing API key.", code="invalid_api_key")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        backend.close()

    app = FastAPI(
        title="phitune serve",
        version=__version__,
        dependencies=[Depends(authorize)],
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.backend = backend
    if expected is None:
        app.add_middleware(_LoopbackOnly)

    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, exc: HTTPError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(PhituneError)
    async def _phitune_error(request: Request, exc: PhituneError) -> JSONResponse:
        error = _from_phitune(exc)
        if error.status >= 500:
            logger.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc.message)
        return error.response()

    @app.exception_handler(UploadTooLarge)
    async def _upload_too_large(_: Request, exc: UploadTooLarge) -> JSONResponse:
        message = f"The upload is larger than this server's limit of {max_upload_bytes} bytes."
        return HTTPError(413, message, param="file", code="file_too_large").response()

    @app.exception_handler(MalformedUpload)
    async def _malformed_upload(_: Request, exc: MalformedUpload) -> JSONResponse:
        return HTTPError(400, str(exc), param="file", code="invalid_file").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            message = f"Unknown request URL: {request.method} {request.url.path}"
            return HTTPError(exc.status_code, message, code="unknown_url").response()
        return HTTPError(exc.status_code, str(exc.detail), code="invalid_request").response()  # e.g. a body not JSON

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _internal_error().response()  # Starlette re-raises exc after this, and the server logs it

    def check_model(model: str) -> None:
        """Models reachable over HTTP: catalog names, fine-tuned models of this home and Hugging Face ids — never
        a folder of the server's file system."""
        if catalog.find(model) is not None or backend.store.find_model(model) is not None:
            return
        if _HF_ID.match(model) and ".." not in model and not Path(model).expanduser().exists():
            return
        raise SpecError("model", f"{model!r} is not a catalog model, a fine-tuned model id or a Hugging Face id")

    # ---------------------------------------------------------------------------------------------- info
    @app.get("/v1/phitune")
    def info() -> dict[str, Any]:
        """Identifies a phitune server (the OpenAI backend sends phitune-only options when it finds one)."""
        return {
            "object": "phitune.server",
            "version": __version__,
            "backend": backend.name,
            "methods": ["lora", "qlora", "dora", "full", "peft"],
            "max_upload_bytes": max_upload_bytes,
        }

    # --------------------------------------------------------------------------------------------- files
    @app.post("/v1/files")
    async def create_file(request: Request) -> dict[str, Any]:
        with backend.staging() as folder:
            upload = await receive_upload(request, folder, file_field="file", max_bytes=max_upload_bytes)
            purpose = upload.fields.get("purpose", "fine-tune")
            if purpose != "fine-tune":
                raise SpecError("purpose", f"{purpose!r}: this server stores 'fine-tune' files only")

            def store() -> FileObject:
                # in this process: forking a server's threads (event loop, thread pool) for a parallel pass is unsafe
                report = client.files.validate(upload.path, workers=1)
                if not report.ok:
                    raise DatasetError(upload.filename, report.errors, total=max(report.error_count, 1))
                return backend.upload_file(str(upload.path), report=report)

            return shapes.file_to_openai(await run_in_threadpool(store))

    @app.get("/v1/files")
    def list_files(
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
        order: Literal["asc", "desc"] = "desc",
        purpose: str | None = None,
    ) -> dict[str, Any]:
        files = [f for f in backend.list_files() if purpose is None or f.purpose == purpose]
        if order == "asc":
            files.reverse()
        page, more = _page(files, [f.id for f in files], after, limit)
        return _list([shapes.file_to_openai(f) for f in page], has_more=more)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str) -> dict[str, Any]:
        return shapes.file_to_openai(backend.get_file(file_id))

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        backend.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> FileResponse:
        return FileResponse(backend.file_content(file_id), media_type="application/octet-stream")

    # ---------------------------------------------------------------------------------------------- jobs
    @app.post("/v1/fine_tuning/jobs")
    def create_job(
        body: shapes.JobCreateRequest, idempotency_key: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        spec, origin = shapes.spec_from_request(body)
        try:
            check_model(spec.model)
            job = client.finetune.submit(spec, idempotency_key=idempotency_key)
        except SpecError as exc:
            exc.field = shapes.request_param(exc.field, origin)
            raise
        if job.spec is not None and job.spec.model_dump() != spec.model_dump():
            raise ConflictError(f"Idempotency-Key {idempotency_key!r} was used for job {job.id} with other options")
        return shapes.job_to_openai(job)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
        jobs = backend.list_jobs(limit=limit + 1, after=after)
        return _list([shapes.job_to_openai(j) for j in jobs[:limit]], has_more=len(jobs) > limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return shapes.job_to_openai(backend.get_job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict[str, Any]:
        return shapes.job_to_openai(backend.cancel_job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str) -> dict[str, Any]:
        return shapes.job_to_openai(backend.pause_job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> dict[str, Any]:
        return shapes.job_to_openai(backend.resume_job(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(
        job_id: str,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> dict[str, Any]:
        """Newest first, as OpenAI; ``order=asc`` (a phitune extension) pages oldest first from ``after``."""
        if after is not None and not _EVENT_ID.match(after):
            raise SpecError("after", f"{after!r} is not an event id")
        if order == "asc":
            events = backend.list_events(job_id, after=after, limit=limit + 1)
            page, more = events[:limit], len(events) > limit
        else:
            newest_first = _all_events(job_id)[::-1]
            page, more = _page(newest_first, [e.id for e in newest_first], after, limit)
        return _list([shapes.event_to_openai(e) for e in page], has_more=more)

    def _all_events(job_id: str) -> list[JobEvent]:
        events: list[JobEvent] = []
        while True:
            batch = backend.list_events(job_id, after=events[-1].id if events else None, limit=1000)
            events.extend(batch)
            if len(batch) < 1000:
                return events

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(
        job_id: str, after: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 10
    ) -> dict[str, Any]:
        checkpoints = backend.list_checkpoints(job_id)
        page, more = _page(checkpoints, [c.id for c in checkpoints], after, limit)
        return _list([shapes.checkpoint_to_openai(c) for c in page], has_more=more)

    # -------------------------------------------------------------------------------------------- models
    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return _list([shapes.model_to_openai(m) for m in backend.list_models()])

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict[str, Any]:
        try:
            check_model(model_id)
        except SpecError:
            raise NotFoundError("model", model_id) from None
        return shapes.model_to_openai(backend.get_model(model_id))

    # ------------------------------------------------------------------------------------- deployments
    def deployment_json(request: Request, name: str) -> dict[str, Any]:
        deployment = backend.get_deployment(name)
        endpoint = f"{str(request.base_url).rstrip('/')}/v1"
        return {"object": "phitune.deployment", **deployment.model_dump(mode="json"), "endpoint": endpoint}

    @app.post("/v1/phitune/deployments")
    def create_deployment(body: DeploymentRequest, request: Request) -> dict[str, Any]:
        check_model(body.model)
        backend.create_deployment(body.model, body.name, engine=body.engine)
        return deployment_json(request, body.name)

    @app.get("/v1/phitune/deployments")
    def list_deployments(request: Request) -> dict[str, Any]:
        return _list([deployment_json(request, d.name) for d in backend.list_deployments()])

    @app.get("/v1/phitune/deployments/{name}")
    def get_deployment(name: str, request: Request) -> dict[str, Any]:
        return deployment_json(request, name)

    @app.delete("/v1/phitune/deployments/{name}")
    def delete_deployment(name: str) -> dict[str, Any]:
        backend.delete_deployment(name)
        return {"id": name, "object": "phitune.deployment", "deleted": True}

    # ---------------------------------------------------------------------------------------------- chat
    def served_model_id(name: str) -> str:
        try:
            backend.get_deployment(name)
        except NotFoundError:
            try:
                check_model(name)
            except SpecError:
                raise NotFoundError("model or deployment", name) from None
        return backend.served_model(name).model_id

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> dict[str, Any] | Response:
        messages = [m.as_dict() for m in body.messages]
        options: dict[str, Any] = {
            "max_tokens": body.max_completion_tokens or body.max_tokens,  # None: the default, within the context
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "seed": body.seed,
            "deadline": time.monotonic() + generation_seconds,
        }
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        limiter.acquire()
        streaming = False
        try:
            model_id = await run_in_threadpool(served_model_id, body.model)
            stream = _TokenStream(lambda: backend.stream_chat(body.model, messages, **options))
            if not body.stream:
                return await _complete(stream, request, model_id)
            try:
                first = await stream.next()  # model loading errors become an error response, not a broken stream
            except BaseException:
                stream.stop()
                raise
            streaming = True  # from here on, the response frees the slot when it ends
        finally:
            if not streaming:
                limiter.release()

        def close() -> None:
            stream.stop()
            limiter.release()

        return _ChatStream(_chunks(stream, first, model_id, include_usage), on_close=close)

    async def _complete(stream: _TokenStream, request: Request, model_id: str) -> dict[str, Any] | JSONResponse:
        """A non-streamed answer; its generation stops if the client disconnects before it is done."""
        watcher = asyncio.create_task(_stop_when_gone(request, stream))
        try:
            while (piece := await stream.next()) is not None:
                if not isinstance(piece, str):
                    return {**chat_completion(model_id, piece).model_dump(mode="json"), "system_fingerprint": None}
        finally:
            stream.stop()
            watcher.cancel()
        return JSONResponse({}, status_code=499)  # the client went away: nobody reads this

    async def _chunks(
        stream: _TokenStream, first: str | Generation, model_id: str, include_usage: bool
    ) -> AsyncIterator[str]:
        """``chat.completion.chunk`` events, then ``[DONE]``; an error after the first chunk is an error event."""
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_id,
            "system_fingerprint": None,
        }

        def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice], **({"usage": None} if include_usage else {})}

        try:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            piece: str | Generation | None = first
            while piece is not None:
                if isinstance(piece, str):
                    if piece:
                        yield _sse(chunk({"content": piece}))
                else:
                    yield _sse(chunk({}, piece.finish_reason))
                    if include_usage:
                        usage = {
                            "prompt_tokens": piece.prompt_tokens,
                            "completion_tokens": piece.completion_tokens,
                            "total_tokens": piece.prompt_tokens + piece.completion_tokens,
                        }
                        yield _sse({**base, "choices": [], "usage": usage})
                piece = await stream.next()
            yield _sse("[DONE]")
        except Exception as exc:
            error = _from_phitune(exc) if isinstance(exc, PhituneError) else _internal_error()
            if error.status >= 500:
                logger.error("generation failed: %s", type(exc).__name__, exc_info=exc)
            yield _sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})

    uploads = backend.home / "tmp"  # the dashboard's temporary folders
    uploads.mkdir(exist_ok=True)
    add_dashboard(app, backend, uploads=uploads, max_upload_bytes=max_upload_bytes)
    return app
