"""The ``phitune serve`` application: the local backend behind OpenAI's REST shapes, wired from one router per
resource.

- :mod:`.files` (``/v1/files``), :mod:`.jobs` (``/v1/fine_tuning/jobs``), :mod:`.models` (``/v1/models``,
  ``/v1/phitune/deployments``), :mod:`.chat` (``/v1/chat/completions``), :mod:`.dashboard` (the web page and its
  routes);
- :mod:`.deps`: what they share, injected with ``Depends`` (the backend, a client over it, the limits, the API key
  check); :mod:`.errors`: every error in OpenAI's shape.

One :class:`~phitune.backends.local.LocalBackend`, and so one model pool, lives as long as the app: several adapters
on one base model share a single loaded copy of the base. Blocking work (SQLite, dataset validation) runs in worker
threads. No answer carries a path of the server's file system, and without an API key only requests that name this
machine (``Host``, ``Origin``) are served.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from .._client import Client
from ..backends.local import LocalBackend
from . import chat, files, jobs, models
from .dashboard import add_dashboard
from .deps import ServerState, StateDep, authorize
from .errors import HTTPError, add_error_handlers
from .hosts import names_this_machine

DEFAULT_MAX_UPLOAD_BYTES = 1 << 30
DEFAULT_MAX_PENDING_CHATS = 4
DEFAULT_GENERATION_SECONDS = 120.0
"""How long one chat request may generate before it ends with ``finish_reason`` ``"length"``."""


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
    uploads = backend.home / "tmp"  # the dashboard's temporary folders
    uploads.mkdir(exist_ok=True)

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
    app.state.phitune = ServerState(
        backend=backend,
        client=Client(backend=backend),
        api_key=api_key or None,
        max_upload_bytes=max_upload_bytes,
        generation_seconds=generation_seconds,
        uploads=uploads,
    )
    app.state.chat_limiter = chat.ChatLimiter(max_pending_chats)
    if not api_key:
        app.add_middleware(_LoopbackOnly)
    add_error_handlers(app, max_upload_bytes=max_upload_bytes)
    app.get("/v1/phitune")(info)
    for router in (files.router, jobs.router, models.router, chat.router):
        app.include_router(router)
    add_dashboard(app)
    return app


def info(state: StateDep) -> dict[str, Any]:
    """Identifies a phitune server (the OpenAI backend sends phitune-only options when it finds one)."""
    return {
        "object": "phitune.server",
        "version": __version__,
        "backend": state.backend.name,
        "methods": ["lora", "qlora", "dora", "full", "peft"],
        "max_upload_bytes": state.max_upload_bytes,
    }


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
            if not names_this_machine(headers.get("host", "")) or (
                origin not in (None, "null") and not names_this_machine(urlsplit(origin).netloc)
            ):
                message = "This server has no API key and answers requests for a loopback host name only."
                await HTTPError(403, message, code="invalid_host").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
