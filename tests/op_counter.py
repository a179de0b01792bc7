"""A dispatch mode that counts the ops a block of code runs (for tests that already need torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):  # type: ignore[misc]
    """Counts, in ``calls``, the ops run while it is active for which ``counts(op)`` is true."""

    def __init__(self, counts: Callable[[Any], bool]) -> None:
        super().__init__()
        self.counts = counts
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += bool(self.counts(func))
        return func(*args, **(kwargs or {}))
