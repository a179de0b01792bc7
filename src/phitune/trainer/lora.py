"""peft's LoRA linear layer with the adapter's product added inside one GEMM.

peft computes ``base(x) + lora_B(lora_A(x)) * scaling``: after the two matmuls, a pass over the ``[tokens, out]``
output to scale it and another to add it, each again in the backward, and, under autocast, a copy of ``x`` in the
adapter's dtype that autocast casts straight back. :class:`FusedLoraLinear` computes the same sum as
``addmm(base(x), lora_A(x), lora_B.weight.T, alpha=scaling)``: the scaling and the sum happen in the GEMM's
accumulator, in fp32, rounded once. The sum is written over the base product, which nothing else keeps (a matmul's
backward needs its inputs, not its output), so no second ``[tokens, out]`` tensor is made — except under selective
checkpointing, whose dispatch mode may keep that product for the backward, and under ``torch.compile``. The write is
an autograd function of its own (:class:`_AddLowRank`) on the 2-D product of the 2-D input: written into a view, it
made the backward copy the ``[tokens, out]`` gradient twice per layer. Parameters, state dict, merging and saving are
peft's own.
"""

from __future__ import annotations

from typing import Any

import peft
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode  # torch-private: see .patches

from . import patches


class FusedLoraLinear(peft.tuners.lora.Linear):  # type: ignore[misc]
    """A vanilla LoRA ``nn.Linear`` (one active adapter, no bias on ``lora_B``, no variant such as DoRA, not
    partitioned by DeepSpeed ZeRO-3) whose forward is one ``addmm`` for the adapter; anything else takes peft's
    forward."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if (
            args
            or kwargs
            or self.disable_adapters
            or self.merged
            or adapter not in self.lora_A
            or adapter in self.lora_variant
            or self.lora_B[adapter].bias is not None
            or hasattr(self.lora_B[adapter].weight, "ds_id")  # ZeRO-3 gathers it only in lora_B's own forward
            or not (torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_A[adapter].weight.dtype)
        ):
            plain: torch.Tensor = super().forward(x, *args, **kwargs)
            return plain
        rows = x.reshape(-1, x.shape[-1])  # 2-D, so that the base product is no view (see _AddLowRank)
        product = self.base_layer(rows)
        low_rank = self.lora_A[adapter](self.lora_dropout[adapter](rows))
        scaling = self.scaling[adapter]
        lora_b = self.lora_B[adapter].weight
        # a mode (selective checkpointing) may hold on to the product; AOTAutograd (torch.compile) cannot trace the
        # in-place write, and fuses the sum itself
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            product = torch.addmm(product, low_rank, lora_b.T, alpha=scaling)
        else:
            product = _AddLowRank.apply(product, low_rank, lora_b, scaling)  # type: ignore[no-untyped-call]
        fused: torch.Tensor = product.view(*x.shape[:-1], product.shape[-1])
        return fused


class _AddLowRank(torch.autograd.Function):
    """``product += scaling * low_rank @ lora_b.T`` in place, on 2-D ``product`` and ``low_rank``, with the gradients
    autograd gives the same ``addmm_`` (the factors in the product's dtype, as autocast would give them: an in-place op
    is not autocast). Written through autograd into a view (such as the 3-D output of ``nn.Linear``), the backward
    copied the ``[tokens, out]`` gradient twice (autograd's bookkeeping for in-place writes into views)."""

    @staticmethod
    def forward(
        ctx: Any, product: torch.Tensor, low_rank: torch.Tensor, lora_b: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        ctx.mark_dirty(product)
        # saved as addmm saves its factors, so that a checkpointed layer that recomputes through addmm (under a
        # dispatch mode) finds the same tensors
        factor, transposed = low_rank.to(product.dtype), lora_b.T.to(product.dtype)
        ctx.save_for_backward(factor, transposed)
        ctx.scaling, ctx.dtypes = scaling, (low_rank.dtype, lora_b.dtype)
        return product.addmm_(factor, transposed, alpha=scaling)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, None]:
        factor, transposed = ctx.saved_tensors
        grad_low_rank = grad_lora_b = None
        if ctx.needs_input_grad[1]:
            grad_low_rank = (grad.mm(transposed.T) * ctx.scaling).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_lora_b = (grad.T.mm(factor) * ctx.scaling).to(ctx.dtypes[1])
        return grad, grad_low_rank, grad_lora_b, None


def fuse_lora_layers(model: Any) -> int:
    """Give every plain peft LoRA ``Linear`` of ``model`` the fused forward (their class becomes
    :class:`FusedLoraLinear`; quantised and other layer types keep theirs); returns how many."""
    if not patches.applies("lora_linear"):
        return 0
    fused = 0
    for module in model.modules():
        if type(module) is peft.tuners.lora.Linear:
            module.__class__ = FusedLoraLinear
            fused += 1
    return fused
