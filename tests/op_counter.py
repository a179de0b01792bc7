"""A dispatch mode that counts the ops a block of code runs (for tests that already need torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):  # type: ignore[misc]
    """Counts, in ``calls``, the ops run while it is active for which ``counts(op)`` is true, and keeps the shapes of
    their tensor arguments in ``shapes``."""

    def __init__(self, counts: Callable[[Any], bool]) -> None:
        super().__init__()
        self.counts = counts
        self.calls = 0
        self.shapes: set[tuple[tuple[int, ...], ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.counts(func):
            self.calls += 1
            self.shapes.add(tuple(tuple(a.shape) for a in args if isinstance(a, Tensor)))
        return func(*args, **(kwargs or {}))
