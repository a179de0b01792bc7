"""One definition of a behaviour, driven either synchronously or asynchronously (the sans-I/O pattern).

An *operation* is a generator. It yields the steps that need I/O and receives each step's result at the ``yield``
(or has the step's error raised there), then returns its own result. It may also yield :class:`Emit` (one item of a
streamed result) and :class:`Forward` (every item of an iterator that a step opens). What a step does is up to the
driver's ``perform``: :func:`drive` performs steps in place; :func:`adrive` awaits them. The client's resources
(:mod:`phitune.resources`) and the OpenAI-compatible backend (:mod:`phitune.backends.openai`) write their logic once
this way; the sync and async classes are thin shells around the same operations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

S = TypeVar("S")
T = TypeVar("T")

Op = Generator[Any, Any, T]
"""An operation returning ``T``."""


@dataclass(frozen=True)
class Emit:
    """One item of a streamed result: :func:`iterate` / :func:`aiterate` hand it to the caller."""

    value: Any


@dataclass(frozen=True)
class Forward:
    """A step whose result is an iterator (an async iterator under :func:`aiterate`): every item is handed to the
    caller as it arrives. ``perform`` receives the ``Forward`` itself and opens the iterator of its ``step``."""

    step: Any


def iterate(op: Op[Any], perform: Callable[[Any], Any], result: list[Any] | None = None) -> Iterator[Any]:
    """Run ``op``, performing its steps with ``perform`` in place; yield what it emits. Its return value is appended
    to ``result``."""
    send: Any = None
    error: Exception | None = None
    try:
        while True:
            try:
                step = op.send(send) if error is None else op.throw(error)
            except StopIteration as stop:
                if result is not None:
                    result.append(stop.value)
                return
            send, error = None, None
            if isinstance(step, Emit):
                yield step.value
                continue
            try:
                if isinstance(step, Forward):
                    yield from perform(step)
                else:
                    send = perform(step)
            except Exception as exc:  # raised in the operation, at its yield
                error = exc
    finally:
        op.close()


def drive(op: Op[T], perform: Callable[[Any], Any]) -> T:
    """Run ``op`` to its result, performing its steps with ``perform`` in place."""
    result: list[T] = []
    for _ in iterate(op, perform, result):
        raise TypeError("this operation streams its result: iterate it")
    return result[0]


async def aiterate(
    op: Op[Any], perform: Callable[[Any], Awaitable[Any]], result: list[Any] | None = None
) -> AsyncIterator[Any]:
    """:func:`iterate`, awaiting each step (``perform`` of a :class:`Forward` step gives an async iterator)."""
    send: Any = None
    error: Exception | None = None
    try:
        while True:
            try:
                step = op.send(send) if error is None else op.throw(error)
            except StopIteration as stop:
                if result is not None:
                    result.append(stop.value)
                return
            send, error = None, None
            if isinstance(step, Emit):
                yield step.value
                continue
            try:
                if isinstance(step, Forward):
                    async for item in await perform(step):
                        yield item
                else:
                    send = await perform(step)
            except Exception as exc:
                error = exc
    finally:
        op.close()


async def adrive(op: Op[T], perform: Callable[[Any], Awaitable[Any]]) -> T:
    """:func:`drive`, awaiting each step."""
    result: list[T] = []
    async for _ in aiterate(op, perform, result):
        raise TypeError("this operation streams its result: iterate it")
    return result[0]
