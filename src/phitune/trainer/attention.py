"""Causal attention of one example through batched GEMMs: the CPU kernel for packed chat examples.

SDPA's CPU kernel is a flash kernel: it never holds a ``[length, length]`` score matrix, which is what long sequences
need, but for the few hundred tokens of a typical chat example it runs at 40-60 GFLOP/s on 2 cores, its backward
slowest, while the same products as batched matmuls run at ~300. Here a block of query rows gets its scores in one
``bmm``, its probabilities in one pass of the fused kernel's masked softmax (:mod:`.fused`; in fp32, or where the
kernels are missing, a ``baddbmm`` with the causal mask as its added input and torch's softmax) and its output in one
``bmm``; a block's keys stop at its last row, so blocks of :data:`ROW_BLOCK` rows skip most of the masked half. Heads
go in groups whose scores fit :data:`GROUP_BYTES`, which bounds the transient memory.

With ``keep``, the op keeps the probabilities for the backward (``heads x length²`` in the compute dtype, less the
masked keys that row blocks skip), which then computes no scores and no softmax: ~5% of a step of the benchmark model,
where attention is a quarter of the time. Without, it keeps what SDPA keeps and recomputes them, as a flash kernel
does. The trainer keeps them where recomputing would cost at least 2% of the layer's matmul work, up to 1024 tokens
(:func:`phitune.estimate.keeps_attention_probabilities`: examples from ~180 tokens on the benchmark model, none on
Phi-3's real sizes, where they would raise the peak 4% for no speed), and the memory estimate counts them
(:func:`phitune.estimate.attention_probability_bytes`).

Each example is padded with zero queries, keys and values to a multiple of :data:`LENGTH_MULTIPLE` tokens: oneDNN
builds a matmul primitive for every new shape, and chat examples have nearly every length, so without it most examples
would pay for new primitives (~16 ms a step on the benchmark model, more than the ~10% of extra attention work padding
costs) and each primitive stayed cached (~0.5 MB). The padded keys come after every real query, so the causal mask
already hides them; the padded rows get a zero gradient and are dropped.

In bf16 the scores are rounded before the softmax, as in transformers' eager attention (SDPA keeps them in fp32): the
errors stay within a few times SDPA's own (``tests/test_attention.py``). Measured fwd + bwd on 2 cores (Zen 5), SDPA's
time over this kernel's: 6 heads of 64, 2.1x at 300 tokens and 1.9x at 1000 keeping the probabilities, 1.8x and 1.6x
recomputing them; Phi-3-mini's 32 heads of 96, recomputing, 1.6x at 1024 tokens, 1.3x at 2048, 1.5x at 4096
(:data:`MAX_LENGTH`). Blocks of rows bound the transient scores at any length.

:func:`causal_attention` calls a ``torch.library`` custom op (``phitune::causal_attention``), so that selective
checkpointing keeps its outputs like SDPA's and a kept layer does not redo it in the backward.
"""

from __future__ import annotations

import threading
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F

from . import fused

GROUP_BYTES = 4 * 2**20
"""The most bytes of scores computed at once (``heads * length**2`` elements for a group of heads)."""

MAX_LENGTH = 4096
"""Examples longer than this go to SDPA's flash kernel (see :func:`preferred`): Phi-3's 4k context fits."""

ROW_BLOCK = 256
"""The fewest query rows per block."""

LENGTH_MULTIPLE = 32
"""Examples are computed padded to a multiple of this many tokens (``phitune.estimate``'s
``GEMM_ATTENTION_LENGTH_MULTIPLE``)."""

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


def _forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, keep: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    length = query.shape[1]
    query, key, value = _padded(query, key, value)
    out = torch.empty_like(query)
    tiles, size = _tiles(query)
    probabilities = query.new_empty(size if keep else 0)
    for heads, rows, offset in tiles:
        kept = _probabilities(
            query[heads], key[heads], rows, scale, _tile(probabilities, heads, rows, offset) if keep else None
        )
        torch.bmm(kept, value[heads, : rows.stop], out=out[heads, rows])
    return out[:, :length].contiguous() if out.shape[1] != length else out, probabilities


def _shape(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, keep: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(query), query.new_empty(_tiles(_padded(query)[0])[1] if keep else 0)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    query, key, value, scale, _ = inputs
    ctx.save_for_backward(query, key, value, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the probabilities
    ctx.scale = scale


def _backward(
    ctx: Any, grad: torch.Tensor, _: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
    query, key, value, probabilities = ctx.saved_tensors
    scale: float = ctx.scale
    length = query.shape[1]
    query, key, value, grad = _padded(query, key, value, grad.to(query.dtype))
    grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    # each group's last block of rows sees every key and writes the key and value gradients; earlier blocks add to them
    for heads, rows, offset in reversed(_tiles(query)[0]):
        q, k, v, g = query[heads], key[heads], value[heads], grad[heads]
        keys = slice(0, rows.stop)
        # kept by the forward, or recomputed as a flash kernel does
        kept = _tile(probabilities, heads, rows, offset) if probabilities.numel() else _probabilities(q, k, rows, scale)
        grad_scores = _scores_gradient(torch.bmm(g[:, rows], v[:, keys].transpose(1, 2)), kept, scale)
        torch.bmm(grad_scores, k[:, keys], out=grad_query[heads, rows])
        if rows.stop == q.shape[1]:
            torch.bmm(kept.transpose(1, 2), g[:, rows], out=grad_value[heads])
            torch.bmm(grad_scores.transpose(1, 2), q[:, rows], out=grad_key[heads])
        else:
            grad_value[heads, keys] += torch.bmm(kept.transpose(1, 2), g[:, rows])
            grad_key[heads, keys] += torch.bmm(grad_scores.transpose(1, 2), q[:, rows])
    return grad_query[:, :length], grad_key[:, :length], grad_value[:, :length], None, None


attention_and_probabilities = torch.library.custom_op(
    "phitune::causal_attention",
    _forward,
    mutates_args=(),
    schema="(Tensor query, Tensor key, Tensor value, float scale, bool keep) -> (Tensor, Tensor)",
)
"""The op (``phitune::causal_attention``): the output and, with ``keep``, the probabilities the backward reuses
(else an empty tensor, and the backward recomputes them)."""
attention_and_probabilities.register_fake(_shape)
attention_and_probabilities.register_autograd(_backward, setup_context=_setup_context)
torch.library.register_autocast(attention_and_probabilities, "cpu", torch.bfloat16)  # as CPU autocast treats SDPA


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, *, keep: bool = True
) -> torch.Tensor:
    """Causal softmax attention of one example, whose ``query``, ``key`` and ``value`` are ``[heads, length, dim]``
    of one dtype; returns ``[heads, length, dim]``. ``keep``: keep the probabilities for the backward (faster, and
    ``heads x length²`` values more memory) rather than recompute them."""
    out: torch.Tensor = attention_and_probabilities(query, key, value, scale, keep)[0]
    return out


def _probabilities(
    query: torch.Tensor, key: torch.Tensor, rows: slice, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The causal softmax probabilities of query ``rows`` against the keys up to the last of them, ``[heads, rows,
    rows.stop]``, in ``out`` when given: in bf16 on a CPU, the fused kernel's masked softmax (:mod:`.fused`) over the
    raw scores; else torch's softmax of :func:`_scores`."""
    kernels = fused.operators_for(query)
    if kernels is None:
        scores = _scores(query, key, rows, scale)
        return torch.softmax(scores, -1) if out is None else torch.ops.aten._softmax.out(scores, -1, False, out=out)
    scores = torch.bmm(query[:, rows], key[:, : rows.stop].transpose(1, 2), out=out)
    kernels.causal_softmax_(scores, scale, rows.start)
    return scores


def _scores_gradient(grad: torch.Tensor, probabilities: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient of the scaled scores from the probabilities' ``grad`` (overwritten in bf16 on a CPU, by the fused
    kernel): ``scale`` times the softmax's backward."""
    kernels = fused.operators_for(grad, probabilities)
    if kernels is None:
        return torch._softmax_backward_data(grad, probabilities, -1, probabilities.dtype).mul_(scale)
    kernels.softmax_backward_(grad, probabilities, scale)
    return grad


def _scores(query: torch.Tensor, key: torch.Tensor, rows: slice, scale: float) -> torch.Tensor:
    """The causally masked scores of query ``rows`` against the keys up to the last of them:
    ``[heads, rows, rows.stop]``."""
    bias = _causal_bias(rows.stop, query.dtype)[rows]
    return torch.baddbmm(bias, query[:, rows], key[:, : rows.stop].transpose(1, 2), alpha=scale)


def _padded(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """``[heads, length, dim]`` tensors with zero rows appended up to a multiple of :data:`LENGTH_MULTIPLE`, all
    contiguous: on the strided slices of a packed row, the batched matmuls run ~30% slower."""
    length = tensors[0].shape[1]
    extra = -length % LENGTH_MULTIPLE
    return [F.pad(tensor, (0, 0, 0, extra)) if extra else tensor.contiguous() for tensor in tensors]


def _row_blocks(length: int) -> list[slice]:
    """Query rows in blocks of at least :data:`ROW_BLOCK`: a block's scores stop at its last row, so the blocks
    skip most of the masked half of the score matrix."""
    blocks = max(1, length // ROW_BLOCK)
    bounds = [length * i // blocks for i in range(blocks + 1)]
    return [slice(start, stop) for start, stop in pairwise(bounds)]


def _tiles(query: torch.Tensor) -> tuple[list[tuple[slice, slice, int]], int]:
    """Where each block's probabilities lie in the flat buffer the op keeps: ``(heads, rows, offset)`` of every group
    of heads and block of rows, in the forward's order, and the buffer's size. A block's ``[heads, rows, rows.stop]``
    is contiguous there, and the masked keys past a block's last row take no space."""
    tiles, offset = [], 0
    for heads in _groups(query):
        for rows in _row_blocks(query.shape[1]):
            tiles.append((heads, rows, offset))
            offset += (heads.stop - heads.start) * (rows.stop - rows.start) * rows.stop
    return tiles, offset


def _tile(buffer: torch.Tensor, heads: slice, rows: slice, offset: int) -> torch.Tensor:
    """A tile's ``[heads, rows, rows.stop]`` probabilities in the flat ``buffer`` (see :func:`_tiles`)."""
    shape = (heads.stop - heads.start, rows.stop - rows.start, rows.stop)
    return buffer[offset : offset + shape[0] * shape[1] * shape[2]].view(shape)


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
