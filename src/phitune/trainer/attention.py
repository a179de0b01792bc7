"""Causal attention of one example through batched GEMMs: the CPU kernel for packed chat examples.

SDPA's CPU kernel is a flash kernel: it never holds a ``[length, length]`` score matrix, which is what long sequences
need, but for the few hundred tokens of a typical chat example it runs at 40-60 GFLOP/s on 2 cores, its backward
slowest, while the same products as batched matmuls run at ~300. Here a block of query rows gets its scores in one
``baddbmm`` (the causal mask is its added input), its probabilities in one softmax and its output in one ``bmm``; a
block's keys stop at its last row, so blocks of :data:`ROW_BLOCK` rows skip most of the masked half. Nothing of size
``length²`` is kept: the backward recomputes each block's probabilities, as a flash kernel does, and the op saves
what SDPA saves. Heads go in groups whose scores fit :data:`GROUP_BYTES`, which bounds the transient memory.

Each example is padded with zero queries, keys and values to a multiple of :data:`LENGTH_MULTIPLE` tokens: oneDNN
builds a matmul primitive for every new shape, and chat examples have nearly every length, so without it most examples
paid for new primitives (~16 ms a step on the benchmark model, more than the ~10% of extra attention work padding
costs) and each primitive stayed cached (~0.5 MB). The padded keys come after every real query, so the causal mask
already hides them; the padded rows get a zero gradient and are dropped.

In bf16 the scores are rounded before the softmax, as in transformers' eager attention (SDPA keeps them in fp32): the
errors stay within a few times SDPA's own (``tests/test_attention.py``). Measured fwd + bwd on 2 cores, 6 heads of 64:
1.7x SDPA at 300 tokens, about even at 1000 (:data:`MAX_LENGTH`).

:data:`causal_attention` is a ``torch.library`` custom op (``phitune::causal_attention``), so that selective
checkpointing keeps its output like SDPA's and a kept layer does not redo it in the backward.
"""

from __future__ import annotations

import threading
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F

GROUP_BYTES = 4 * 2**20
"""The most bytes of scores computed at once (``heads * length**2`` elements for a group of heads)."""

MAX_LENGTH = 1024
"""Examples longer than this go to SDPA's flash kernel (see :func:`preferred`)."""

ROW_BLOCK = 256
"""The fewest query rows per block."""

LENGTH_MULTIPLE = 32
"""Examples are computed padded to a multiple of this many tokens."""

_masks = threading.local()


def preferred(query: torch.Tensor, *, dropout: float, window: bool) -> bool:
    """Whether :data:`causal_attention` should take an example's ``[1, heads, length, dim]`` query: on a CPU, for
    plain causal attention without dropout, up to :data:`MAX_LENGTH` tokens."""
    return (
        query.device.type == "cpu"
        and not dropout
        and not window
        and query.shape[0] == 1
        and query.shape[2] <= MAX_LENGTH
        and query.dtype in (torch.bfloat16, torch.float32)
    )


def _forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    length = query.shape[1]
    query, key, value = _padded(query, key, value)
    out = torch.empty_like(query)
    for heads in _groups(query):
        q, k, v = query[heads], key[heads], value[heads]
        for rows in _row_blocks(q.shape[1]):
            torch.bmm(_probabilities(q, k, rows, scale), v[:, : rows.stop], out=out[heads, rows])
    return out[:, :length].contiguous() if out.shape[1] != length else out


def _shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(query)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    query, key, value, scale = inputs
    ctx.save_for_backward(query, key, value)
    ctx.scale = scale


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    query, key, value = ctx.saved_tensors
    scale: float = ctx.scale
    length = query.shape[1]
    query, key, value, grad = _padded(query, key, value, grad.to(query.dtype))
    grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    for heads in _groups(query):
        q, k, v, g = query[heads], key[heads], value[heads], grad[heads]
        # the last block of rows sees every key and writes the key and value gradients; earlier blocks add to them
        for rows in reversed(_row_blocks(q.shape[1])):
            keys = slice(0, rows.stop)
            probabilities = _probabilities(q, k, rows, scale)
            grad_scores = torch._softmax_backward_data(
                torch.bmm(g[:, rows], v[:, keys].transpose(1, 2)), probabilities, -1, probabilities.dtype
            )
            torch.bmm(grad_scores, k[:, keys], out=grad_query[heads, rows]).mul_(scale)
            if rows.stop == q.shape[1]:
                torch.bmm(probabilities.transpose(1, 2), g[:, rows], out=grad_value[heads])
                torch.bmm(grad_scores.transpose(1, 2), q[:, rows], out=grad_key[heads]).mul_(scale)
            else:
                grad_value[heads, keys] += torch.bmm(probabilities.transpose(1, 2), g[:, rows])
                grad_key[heads, keys] += torch.bmm(grad_scores.transpose(1, 2), q[:, rows]).mul_(scale)
    return grad_query[:, :length], grad_key[:, :length], grad_value[:, :length], None


causal_attention = torch.library.custom_op("phitune::causal_attention", _forward, mutates_args=())
"""``causal_attention(query, key, value, scale)``: causal softmax attention of one example, whose ``query``,
``key`` and ``value`` are ``[heads, length, dim]`` of one dtype; returns ``[heads, length, dim]``."""
causal_attention.register_fake(_shape)
causal_attention.register_autograd(_backward, setup_context=_setup_context)
torch.library.register_autocast(causal_attention, "cpu", torch.bfloat16)  # as CPU autocast treats SDPA


def _probabilities(query: torch.Tensor, key: torch.Tensor, rows: slice, scale: float) -> torch.Tensor:
    """Softmax of the causally masked scores of query ``rows`` against the keys up to the last of them:
    ``[heads, rows, rows.stop]``."""
    bias = _causal_bias(rows.stop, query.dtype)[rows]
    scores = torch.baddbmm(bias, query[:, rows], key[:, : rows.stop].transpose(1, 2), alpha=scale)
    return torch.softmax(scores, -1)


def _padded(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """``[heads, length, dim]`` tensors with zero rows appended up to a multiple of :data:`LENGTH_MULTIPLE`."""
    length = tensors[0].shape[1]
    extra = -length % LENGTH_MULTIPLE
    return [F.pad(tensor, (0, 0, 0, extra)) if extra else tensor for tensor in tensors]


def _row_blocks(length: int) -> list[slice]:
    """Query rows in blocks of at least :data:`ROW_BLOCK`: a block's scores stop at its last row, so the blocks
    skip most of the masked half of the score matrix."""
    blocks = max(1, length // ROW_BLOCK)
    bounds = [length * i // blocks for i in range(blocks + 1)]
    return [slice(start, stop) for start, stop in pairwise(bounds)]


def _groups(query: torch.Tensor) -> list[slice]:
    heads, length = query.shape[0], query.shape[1]
    per_group = max(1, GROUP_BYTES // (length * length * query.element_size()))
    return [slice(start, min(start + per_group, heads)) for start in range(0, heads, per_group)]


def _causal_bias(length: int, dtype: torch.dtype) -> torch.Tensor:
    """``[length, length]``: 0 on and below the diagonal, -inf above; a corner of one cached matrix per dtype."""
    cached: torch.Tensor | None = getattr(_masks, str(dtype), None)
    if cached is None or cached.shape[0] < length:
        size = max(length, 256)
        cached = torch.full((size, size), float("-inf"), dtype=dtype).triu_(1)
        setattr(_masks, str(dtype), cached)
    return cached[:length, :length]
