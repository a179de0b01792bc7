"""How one definition of each resource serves ``Client`` and ``AsyncClient``.

A resource's behaviour is written once, as operations (:mod:`phitune._ops`): generators that yield steps and return
the result. The steps are :class:`Call` (a backend call), :class:`Blocking` (work on this machine that blocks:
reading and tokenising a dataset, the fit estimate), :class:`Sleep`, and ``Emit`` / ``Forward`` for streamed results.
:class:`SyncResource` performs them in place. :class:`AsyncResource` awaits an async backend's calls and runs a
synchronous backend's calls (local, Azure) and every ``Blocking`` step on a worker thread
(``anyio.to_thread.run_sync``), so the event loop never blocks on them; a synchronous backend's stream (local chat) is
opened, pulled and closed on one thread of its own.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .._ops import Forward, Op, adrive, aiterate, drive, iterate
from ..backends.base import Backend, Capabilities, Feature

if TYPE_CHECKING:
    from .._client import AsyncClient, Client

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """A backend call: ``fn(backend)`` (a coroutine of the result on an async backend)."""

    fn: Callable[[Backend], Any]


@dataclass(frozen=True)
class Blocking:
    """Work on this machine that blocks: run in place by ``Client``, on a worker thread by ``AsyncClient``."""

    fn: Callable[[], Any]


@dataclass(frozen=True)
class Sleep:
    seconds: float


def call(fn: Callable[[Backend], T]) -> Op[T]:
    """The operation of one backend call."""
    result: T = yield Call(fn)
    return result


def blocking(fn: Callable[[], T]) -> Op[T]:
    """The operation of one piece of blocking work."""
    result: T = yield Blocking(fn)
    return result


class Resource:
    """What the sync and async twins of a resource share: the client, its backend's name and capabilities."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self._client = client

    @property
    def _backend_name(self) -> str:
        return self._client.backend.name

    @property
    def _capabilities(self) -> Capabilities:
        return self._client.backend.capabilities

    def _require(self, feature: Feature, operation: str) -> None:
        self._capabilities.require(feature, operation, self._backend_name)


class SyncResource(Resource):
    """Runs operations in place."""

    _client: Client

    @property
    def _backend(self) -> Backend:
        return self._client.backend

    def _run(self, op: Op[T]) -> T:
        return drive(op, self._perform)

    def _iterate(self, op: Op[Any]) -> Iterator[Any]:
        return iterate(op, self._perform)

    def _perform(self, step: Any) -> Any:
        if isinstance(step, Forward):
            step = step.step
        if isinstance(step, Call):
            return step.fn(self._client.backend)
        if isinstance(step, Blocking):
            return step.fn()
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        raise TypeError(f"unknown step {step!r}")


class AsyncResource(Resource):
    """Runs operations on the event loop; blocking steps on worker threads."""

    _client: AsyncClient

    async def _run(self, op: Op[T]) -> T:
        return await adrive(op, self._perform)

    def _iterate(self, op: Op[Any]) -> AsyncIterator[Any]:
        return aiterate(op, self._perform)

    async def _perform(self, step: Any) -> Any:
        import anyio.to_thread

        backend: Any = self._client.backend
        if isinstance(step, Forward):
            call: Call = step.step
            if self._client.threaded:
                return _pulled_on_one_thread(lambda: call.fn(backend))
            return call.fn(backend)
        if isinstance(step, Call):
            if self._client.threaded:
                return await anyio.to_thread.run_sync(step.fn, backend)
            return await step.fn(backend)
        if isinstance(step, Blocking):
            return await anyio.to_thread.run_sync(step.fn)
        if isinstance(step, Sleep):
            await anyio.sleep(step.seconds)
            return None
        raise TypeError(f"unknown step {step!r}")


_END = object()


async def _pulled_on_one_thread(open_items: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """A blocking iterator as an async one. It is opened, pulled and closed on one thread of its own (an iterator may
    hold a lock of that thread from one item to the next, as the ONNX model pool does); the event loop awaits each
    step from a worker thread."""
    import anyio.to_thread

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="phitune-stream") as own:

        def on_own(fn: Callable[..., Any], *args: Any) -> Any:
            return own.submit(fn, *args).result()

        items = await anyio.to_thread.run_sync(on_own, open_items)
        try:
            while (item := await anyio.to_thread.run_sync(on_own, next, items, _END)) is not _END:
                yield item
        finally:
            if isinstance(items, Generator):
                await anyio.to_thread.run_sync(on_own, items.close)
