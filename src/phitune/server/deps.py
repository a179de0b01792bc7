"""What the routers share, injected with FastAPI's ``Depends``: the app's :class:`ServerState` (the local backend, a
client over it, the limits), the API key check, and the OpenAI list shape with its cursor pagination.

A router names what it needs in its signature (``backend: BackendDep``); :func:`phitune.server.app.create_app` puts
one :class:`ServerState` on the app, and tests may replace any of these with ``app.dependency_overrides``.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from .. import catalog
from .._client import Client
from ..backends.local import LocalBackend
from ..errors import SpecError
from .errors import HTTPError

T = TypeVar("T")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ServerState:
    """One app's shared parts: they live as long as the app (one backend, so one model pool)."""

    backend: LocalBackend
    client: Client
    api_key: str | None
    max_upload_bytes: int
    generation_seconds: float
    uploads: Path
    """The folder of the dashboard's temporary files."""


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.phitune
    return state


StateDep = Annotated[ServerState, Depends(server_state)]


def backend(state: StateDep) -> LocalBackend:
    return state.backend


def client(state: StateDep) -> Client:
    return state.client


BackendDep = Annotated[LocalBackend, Depends(backend)]
ClientDep = Annotated[Client, Depends(client)]


async def authorize(request: Request, state: StateDep) -> None:
    """With an API key, every request carries it (``Authorization: Bearer <key>`` or ``api-key: <key>``)."""
    expected = state.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    supplied = header[7:] if header[:7].lower() == "bearer " else request.headers.get("api-key", "")
    if not hmac.compare_digest(supplied.encode(), expected.encode()):
        raise HTTPError(401, "Incorrect or missing API key.", code="invalid_api_key")


def check_model(backend: LocalBackend, model: str) -> None:
    """Models reachable over HTTP: catalog names, fine-tuned models of this home and Hugging Face ids — never a
    folder of the server's file system."""
    if catalog.find(model) is not None or backend.store.find_model(model) is not None:
        return
    if _HF_ID.match(model) and ".." not in model and not Path(model).expanduser().exists():
        return
    raise SpecError("model", f"{model!r} is not a catalog model, a fine-tuned model id or a Hugging Face id")


def list_response(data: Sequence[dict[str, Any]], *, has_more: bool = False) -> dict[str, Any]:
    """OpenAI's list shape."""
    return {
        "object": "list",
        "data": list(data),
        "has_more": has_more,
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
    }


def page(items: Sequence[T], ids: Sequence[str], after: str | None, limit: int) -> tuple[list[T], bool]:
    """The ``limit`` items after the one whose id is ``after`` (cursor pagination), and whether more follow."""
    start = 0
    if after is not None:
        if after not in ids:
            raise SpecError("after", f"{after!r} is not an id of this list")
        start = ids.index(after) + 1
    return list(items[start : start + limit]), start + limit < len(items)
