"""peft's LoRA linear layer with the adapter's product added inside one GEMM.

peft computes ``base(x) + lora_B(lora_A(x)) * scaling``: after the two matmuls, a pass over the ``[tokens, out]``
output to scale it and another to add it, each again in the backward, and, under autocast, a copy of ``x`` in the
adapter's dtype that autocast casts straight back. :class:`FusedLoraLinear` computes the same sum as
``addmm(base(x), lora_A(x), lora_B.weight.T, alpha=scaling)``: the scaling and the sum happen in the GEMM's
accumulator, in fp32, rounded once. The sum is written over the base product, which nothing else keeps (a matmul's
backward needs its inputs, not its output), so no second ``[tokens, out]`` tensor is made — except under selective
checkpointing, whose dispatch mode may keep that product for the backward, and under ``torch.compile``. Parameters,
state dict, merging and saving are peft's own.
"""

from __future__ import annotations

from typing import Any

import peft
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


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
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        low_rank = self.lora_A[adapter](self.lora_dropout[adapter](x))
        product = result.view(-1, result.shape[-1])
        low_rank = low_rank.reshape(-1, low_rank.shape[-1])
        scaling = self.scaling[adapter]
        # a mode (selective checkpointing) may hold on to the product; AOTAutograd (torch.compile) cannot trace the
        # write into a view, and fuses the sum itself
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return torch.addmm(product, low_rank, self.lora_B[adapter].weight.T, alpha=scaling).view(result.shape)
        # in place, autocast does not cast: both factors in the product's dtype, as autocast would give them
        lora_b = self.lora_B[adapter].weight.T.to(product.dtype)
        product.addmm_(low_rank.to(product.dtype), lora_b, alpha=scaling)
        return result


def fuse_lora_layers(model: Any) -> int:
    """Give every plain peft LoRA ``Linear`` of ``model`` the fused forward (their class becomes
    :class:`FusedLoraLinear`; quantised and other layer types keep theirs); returns how many."""
    fused = 0
    for module in model.modules():
        if type(module) is peft.tuners.lora.Linear:
            module.__class__ = FusedLoraLinear
            fused += 1
    return fused
