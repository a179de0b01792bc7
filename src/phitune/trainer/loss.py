"""Cross-entropy straight from hidden states, in chunks, with the backward computed on the way.

The LM head of Phi-3 has 32064 outputs, so ``hidden @ lm_head.T`` for a micro-batch is the largest tensor of a LoRA
step: ``[tokens, 32064]`` in bf16, again in fp32 for the softmax, and once more as its gradient. Here the head runs on
a few hundred rows at a time; each chunk's logits give that chunk's loss and, while they are still in cache, its
gradient ``softmax - onehot``, which is multiplied out at once into the gradients of the hidden states (and of the
head weight when it trains). The backward then only scales what the forward stored, so no ``[tokens, vocab]`` tensor
outlives its chunk and the head costs two matrix products per chunk (three when the head trains), as the plain
loss does.

Numerics follow ``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` under the same autocast: the head's
matmuls run in the autocast dtype (bf16 on CPUs with AVX512-BF16), the softmax in fp32. On a CPU in bf16, one pass of
a fused kernel per row (:mod:`.fused`) computes its loss, ``logsumexp - target logit``, and overwrites the bf16
logits with the gradient: no fp32 copy of the logits (2.4% of the benchmark model's step). Elsewhere, torch's softmax
runs in place on an fp32 copy, and a row's loss is ``-log`` of its target's probability, or ``logsumexp - target
logit`` where that probability is too small for fp32 to hold exactly.

A head with a bias (Phi-3.5-MoE's) adds it in the same matmul, and its gradient is the column sums of the chunks'
gradients. A chunk holds :data:`CHUNK_ELEMENTS` logits, and at least :data:`MIN_CHUNK_ROWS` rows: Phi-4's and
Phi-4-mini's vocabularies (100352 and 200064 entries) would otherwise leave a few dozen rows per matmul.

A chunk's logits live in buffers that each thread keeps and reuses (:mod:`.buffers`, 16 MiB for Phi-3's vocabulary
in bf16, 48 MiB with the fp32 copy). Allocated afresh, every chunk's 33 MB of fp32 logits would be new memory whose
pages fault in on first touch: the benchmark model's forward + backward (``benchmarks/train_vs_trl.py``) takes 1.17x
as long.
"""

from __future__ import annotations

from typing import Any

import torch

from . import fused
from .buffers import thread_buffer

CHUNK_ELEMENTS = 8 * 2**20
"""Logits per chunk (rows x vocabulary): 261 rows of Phi-3's 32064, 32 MiB in fp32. At 128 rows the head's matmul runs
at ~70% of this CPU's bf16 GEMM rate, at 512 rows at ~90%."""
MIN_CHUNK_ROWS = 128
"""The fewest rows per chunk, whatever the vocabulary: 128 rows of Phi-4-mini's 200064 logits are 49 MiB in bf16."""


def chunk_rows(vocabulary: int) -> int:
    """Rows of hidden states per chunk of the LM head (``phitune.estimate`` sizes the buffers with it)."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocabulary)


_SMALLEST_EXACT = 2.0**-100
"""Target probabilities below this (fp32 keeps ~24 bits down to 2^-126, then loses them) get their loss from the
logits (``logsumexp - target``) rather than as ``-log(probability)``."""


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")`` without materialising the logits.

    ``hidden`` is ``[rows, features]``, ``weight`` ``[vocab, features]``, ``bias`` ``[vocab]`` and ``targets``
    ``[rows]`` (every row counts: select the labelled positions before calling). Differentiable in ``hidden``,
    ``weight`` and ``bias``.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)  # differentiable casts: gradients reach the originals
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        trains = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        if torch.is_grad_enabled() and any(trains):
            loss: torch.Tensor = _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets)  # type: ignore[no-untyped-call]
            return loss
        return _chunks(hidden, weight, bias, targets, _Gradients())


class _Gradients:
    """The gradients :func:`_chunks` fills: of the hidden states (the compute dtype), of the head's weight and bias
    (fp32 sums)."""

    def __init__(
        self, hidden: torch.Tensor | None = None, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias

    @property
    def wanted(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        def fp32_zeros(like: torch.Tensor) -> torch.Tensor:
            return torch.zeros(like.shape, dtype=torch.float32, device=like.device)

        grads = _Gradients(
            torch.empty_like(hidden) if ctx.needs_input_grad[0] else None,
            fp32_zeros(weight) if ctx.needs_input_grad[1] else None,
            fp32_zeros(bias) if bias is not None and ctx.needs_input_grad[2] else None,
        )
        loss = _chunks(hidden, weight, bias, targets, grads)
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = (grad_bias * scale).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None


def _chunks(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, grads: _Gradients
) -> torch.Tensor:
    """The summed loss, chunk by chunk; fills ``grads.hidden`` and accumulates ``grads.weight`` and ``grads.bias``
    where they are given."""
    rows = chunk_rows(weight.shape[0])
    shape = (min(rows, hidden.shape[0]), weight.shape[0])
    # the head's matmul output (later the gradient it multiplies out)
    products = thread_buffer("loss products", shape, weight.dtype, weight.device)
    kernels = fused.operators_for(products)
    gradient = grads.wanted
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        out = products[: h.shape[0]]
        product = torch.mm(h, weight.T, out=out) if bias is None else torch.addmm(bias, h, weight.T, out=out)
        if kernels is not None:
            total += kernels.cross_entropy_rows_(product, t.contiguous(), gradient).sum()
            grad_logits = product
        else:
            losses, grad_logits = _softmax_cross_entropy(product, h, weight, bias, t, gradient)
            total += losses.sum()
        if not gradient:
            continue
        if grads.hidden is not None:
            torch.mm(grad_logits, weight, out=grads.hidden[start : start + rows])
        if grads.weight is not None:
            grads.weight.add_(grad_logits.T @ h)
        if grads.bias is not None:
            grads.bias.add_(grad_logits.sum(0, dtype=torch.float32))
    return total


def _softmax_cross_entropy(
    product: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    gradient: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's row losses and (with ``gradient``) ``softmax - onehot`` in ``product``'s dtype, through torch's ops:
    the softmax in fp32 (a thread's buffer unless the head is fp32)."""
    widen = product.dtype != torch.float32
    logits = (
        thread_buffer("loss logits", product.shape, torch.float32, product.device).copy_(product) if widen else product
    )
    # one fused pass per row (its max, exponentials, sum and scaling while the row is in cache): separate
    # element-wise ops over the chunk take ~25% of the head's time on the benchmark model
    probabilities = torch.softmax(logits, 1, out=logits)
    picked = probabilities.gather(1, targets[:, None]).squeeze(1)
    losses = picked.log().neg_()
    underflowed = (picked < _SMALLEST_EXACT).nonzero().squeeze(1)
    if underflowed.numel():  # the target's logit is ~70+ below the row's largest: redo those rows exactly
        exact = torch.nn.functional.linear(hidden[underflowed], weight, bias).float()
        picked_logits = exact.gather(1, targets[underflowed, None]).squeeze(1)
        losses[underflowed] = exact.logsumexp(1) - picked_logits
    if not gradient:
        return losses, product
    probabilities[torch.arange(targets.shape[0], device=targets.device), targets] -= 1.0
    return losses, product.copy_(probabilities) if widen else probabilities  # rounded to the head's dtype
