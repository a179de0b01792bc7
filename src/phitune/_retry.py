"""Bounded retries with backoff for calls to remote services.

One :class:`RetryPolicy` serves every HTTP client phitune drives (azure-core, httpx, openai): it retries throttling
(429), timeouts (408) and server errors (5xx), read from the exception's ``status_code`` or ``response.status_code``,
plus the connection failures a backend names in ``transient``. The wait honours the server's hint
(``retry-after-ms``, ``x-ms-retry-after-ms``, or ``Retry-After`` in seconds or as an HTTP date); without a hint it backs
off exponentially with jitter. A hint longer than ``max_retry_after`` stops retrying at once rather than knocking early.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

T = TypeVar("T")

logger = logging.getLogger("phitune.retry")

RETRY_STATUSES: frozenset[int] = frozenset({408, 429})
"""Statuses retried besides every 5xx."""


def status_code_of(exc: BaseException) -> int | None:
    """The HTTP status carried by an exception (``exc.status_code`` or ``exc.response.status_code``), if any."""
    for holder in (exc, getattr(exc, "response", None)):
        status = getattr(holder, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def headers_of(exc: BaseException) -> Mapping[str, str]:
    """The response headers carried by an exception (``exc.response.headers``), or an empty mapping."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return headers if isinstance(headers, Mapping) else {}


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait, from ``retry-after-ms``, ``x-ms-retry-after-ms`` or ``Retry-After``."""
    lower = {key.lower(): value for key, value in headers.items()}
    for key in ("retry-after-ms", "x-ms-retry-after-ms"):
        try:
            return max(0.0, float(lower[key]) / 1000.0)
        except (KeyError, ValueError):
            pass
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a failed call. ``sleep`` is injectable so tests need not wait."""

    max_attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    transient: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    sleep: Callable[[float], None] = time.sleep

    def is_retryable(self, exc: BaseException) -> bool:
        """Throttling, timeouts, server errors and the connection failures named in ``transient``."""
        if isinstance(exc, self.transient):
            return True
        status = status_code_of(exc)
        return status is not None and (status in RETRY_STATUSES or status >= 500)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying retryable failures; the last failure is re-raised unchanged."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(self.is_retryable),
            stop=self._stop,
            wait=self._wait,
            sleep=self.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(fn)

    def _hint(self, state: tenacity.RetryCallState) -> float | None:
        exc = state.outcome.exception() if state.outcome is not None else None
        return None if exc is None else retry_after(headers_of(exc))

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.max_attempts:
            return True
        hint = self._hint(state)
        return hint is not None and hint > self.max_retry_after

    def _wait(self, state: tenacity.RetryCallState) -> float:
        hint = self._hint(state)
        if hint is not None:
            return hint
        delay = min(self.max_backoff, self.backoff * 2.0 ** (state.attempt_number - 1))
        return delay * (0.5 + random.random() / 2)


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc: Any = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    # Only the class and status: messages may quote request details.
    logger.info(
        "retrying after %s (status %s) in %.2f s, attempt %d",
        type(exc).__name__,
        status_code_of(exc) if exc is not None else None,
        wait,
        state.attempt_number + 1,
    )
