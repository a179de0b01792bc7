"""``POST /v1/chat/completions``: OpenAI's chat completions, streamed or not, from a catalog model, a fine-tuned
model of this home or a deployment, through the backend's model pool.

Each generation runs start to end in a thread of its own, and stops within a token when its client goes away, at its
deadline (``generation_seconds``), or at the end of what the model's context leaves. At most ``max_pending_chats``
requests generate or wait for the model at once (:class:`ChatLimiter`); more are answered 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from ..backends.local import LocalBackend, chat_completion
from ..errors import NotFoundError, PhituneError, SpecError
from .deps import BackendDep, StateDep, check_model
from .errors import HTTPError, from_phitune, internal_error

if TYPE_CHECKING:
    from ..engines.torch_engine import Generation

logger = logging.getLogger("phitune.server")
router = APIRouter()


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


class ChatLimiter:
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


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def chat_limiter(request: Request) -> ChatLimiter:
    limiter: ChatLimiter = request.app.state.chat_limiter
    return limiter


def _served_model_id(backend: LocalBackend, name: str) -> str:
    try:
        backend.get_deployment(name)
    except NotFoundError:
        try:
            check_model(backend, name)
        except SpecError:
            raise NotFoundError("model or deployment", name) from None
    return backend.served_model(name).model_id


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest,
    request: Request,
    state: StateDep,
    backend: BackendDep,
    limiter: Annotated[ChatLimiter, Depends(chat_limiter)],
) -> dict[str, Any] | Response:
    messages = [m.as_dict() for m in body.messages]
    options: dict[str, Any] = {
        "max_tokens": body.max_completion_tokens or body.max_tokens,  # None: the default, within the context
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed,
        "deadline": time.monotonic() + state.generation_seconds,
    }
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    limiter.acquire()
    streaming = False
    try:
        model_id = await run_in_threadpool(_served_model_id, backend, body.model)
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
        error = from_phitune(exc) if isinstance(exc, PhituneError) else internal_error()
        if error.status >= 500:
            logger.error("generation failed: %s", type(exc).__name__, exc_info=exc)
        yield _sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
