"""Scratch buffers that a thread keeps and reuses on hot paths.

On CPU a large tensor allocated afresh is new memory whose pages fault in on first touch, which can cost more than
the work that fills it (QLoRA's dequantised weights, the loss's chunk of logits). Each such path asks
:func:`thread_buffer` for its scratch space instead.
"""

from __future__ import annotations

import math
import threading

import torch

_kept = threading.local()


def thread_buffer(
    purpose: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """This thread's buffer for ``purpose`` in ``dtype`` on ``device``, as a contiguous tensor of ``shape`` (its
    contents undefined, valid until this thread asks again for the same purpose, dtype and device); grown when a
    larger one is asked for, the smaller freed first."""
    kept: dict[tuple[str, torch.dtype, str], torch.Tensor] = _kept.__dict__.setdefault("by_key", {})
    key = (purpose, dtype, str(device or "cpu"))
    numel = math.prod(shape)
    buffer = kept.get(key)
    if buffer is None or buffer.numel() < numel:
        kept.pop(key, None)
        del buffer
        buffer = kept[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)
