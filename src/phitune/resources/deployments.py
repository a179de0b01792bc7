from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

from .._ops import Forward, Op
from ..backends.base import StreamingChatBackend
from ..types import ChatCompletion, Deployment
from ._base import AsyncResource, Call, Resource, SyncResource, call


class _Deployments(Resource):
    """The behaviour of ``deployments``, for :class:`Deployments` and :class:`AsyncDeployments`."""

    def _chat(self, name: str, messages: builtins.list[dict[str, str]], options: dict[str, Any]) -> Op[ChatCompletion]:
        completion: ChatCompletion = yield Call(lambda b: b.chat(name, messages, **options))
        return completion

    def _stream_chat(self, name: str, messages: builtins.list[dict[str, str]], options: dict[str, Any]) -> Op[None]:
        self._require("chat_streaming", "deployments.stream_chat")
        pieces = Forward(Call(lambda b: cast(StreamingChatBackend, b).stream_chat(name, messages, **options)))
        yield pieces


def _text_only(items: Iterator[object]) -> Iterator[str]:
    return (item for item in items if isinstance(item, str))


class Deployments(_Deployments, SyncResource):
    """Serve models for chat: ``dep = client.deployments.create(model=..., name=...)`` then
    ``client.deployments.chat(dep.name, messages)`` (or ``dep.chat(messages)``)."""

    def create(self, *, model: str, name: str, **options: Any) -> Deployment:
        """Deploy ``model`` under ``name``. Backend options (e.g. Azure's region) go in ``options``."""
        return self._run(call(lambda b: b.create_deployment(model, name, **options))).bind(self._backend)

    def get(self, name: str) -> Deployment:
        """A deployment by name, ready to ``chat``."""
        return self._run(call(lambda b: b.get_deployment(name))).bind(self._backend)

    def list(self) -> builtins.list[Deployment]:
        """Every deployment of the backend."""
        return [d.bind(self._backend) for d in self._run(call(lambda b: b.list_deployments()))]

    def delete(self, name: str) -> None:
        """Delete a deployment; the model it serves stays."""
        self._run(call(lambda b: b.delete_deployment(name)))

    def chat(
        self,
        name: str,
        messages: builtins.list[dict[str, str]],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> ChatCompletion:
        """An OpenAI-shaped chat completion from the deployment ``name``."""
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        return self._run(self._chat(name, messages, options))

    def stream_chat(
        self,
        name: str,
        messages: builtins.list[dict[str, str]],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """The answer's text in pieces, as it is generated. Raises
        :class:`~phitune.errors.UnsupportedOptionError` on a backend that cannot stream (Azure)."""
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        return _text_only(self._iterate(self._stream_chat(name, messages, options)))


class AsyncDeployments(_Deployments, AsyncResource):
    """:class:`Deployments` for ``AsyncClient``. Its deployments are not bound to a client: chat through
    ``await client.deployments.chat(name, messages)``."""

    async def create(self, *, model: str, name: str, **options: Any) -> Deployment:
        """:meth:`Deployments.create`."""
        return await self._run(call(lambda b: b.create_deployment(model, name, **options)))

    async def get(self, name: str) -> Deployment:
        """A deployment by name, ready to ``chat``."""
        return await self._run(call(lambda b: b.get_deployment(name)))

    async def list(self) -> builtins.list[Deployment]:
        """Every deployment of the backend."""
        return await self._run(call(lambda b: b.list_deployments()))

    async def delete(self, name: str) -> None:
        """Delete a deployment; the model it serves stays."""
        await self._run(call(lambda b: b.delete_deployment(name)))

    async def chat(
        self,
        name: str,
        messages: builtins.list[dict[str, str]],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> ChatCompletion:
        """:meth:`Deployments.chat`."""
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        return await self._run(self._chat(name, messages, options))

    async def stream_chat(
        self,
        name: str,
        messages: builtins.list[dict[str, str]],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> AsyncIterator[str]:
        """:meth:`Deployments.stream_chat`: ``async for piece in client.deployments.stream_chat(name, messages)``."""
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        async for item in self._iterate(self._stream_chat(name, messages, options)):
            if isinstance(item, str):
                yield item
