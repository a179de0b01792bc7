"""Phi-3's attention inputs and MLP with their element-wise work in fused CPU kernels (:mod:`.fused`).

transformers' ``Phi3Attention`` slices its ``qkv_proj`` output into queries, keys and values and rotates the first two
with a dozen element-wise ops (``apply_rotary_pos_emb``); in the backward, each slice's gradient is a zero-filled tensor
of the projection's full width, summed into the next. :class:`TrainingPhi3Attention` makes the rotated queries and keys
and the values in one pass over the projection, and its gradient in one pass back.

``Phi3MLP`` splits its ``gate_up_proj`` output in two and computes ``up * silu(gate)`` with three ops; autograd keeps
``silu(gate)`` beside the projection and its backward runs four more, then joins the two halves' gradients with a
``cat``. :class:`TrainingPhi3MLP` computes it with one kernel each way, from the projection alone.

Forwards return transformers' values exactly; backwards keep fp32 between the steps that torch rounds to bf16.
Partial rotary embeddings (Phi-4-mini rotates the first three quarters of each head) are rotated where they apply and
the rest passed through, as transformers does. Tensors the kernels do not take (fp32, GPU) and a generation cache take
transformers' forwards; so do modules of other architectures, which :func:`fused_coverage` names for the job's events.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3MLP, eager_attention_forward

from . import fused, patches


class TrainingPhi3Attention(Phi3Attention):  # type: ignore[misc]
    """``Phi3Attention`` whose queries, keys and values come from :class:`_RotaryQKV` on bf16 CPU tensors; the same
    parameters and state dict."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cos, sin = position_embeddings
        kernels = fused.operators_for(hidden_states, cos, sin)
        if kernels is None or cache is not None:
            plain: tuple[torch.Tensor, torch.Tensor | None] = super().forward(
                hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs
            )
            return plain
        qkv = self.qkv_proj(hidden_states)
        query, key, value = _RotaryQKV.apply(  # type: ignore[no-untyped-call]
            qkv.contiguous(),
            cos.contiguous(),
            sin.contiguous(),
            self.config.num_attention_heads,
            self.num_key_value_heads,
            kernels,
        )
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None),
            **kwargs,
        )
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class TrainingPhi3MLP(Phi3MLP):  # type: ignore[misc]
    """``Phi3MLP`` whose SwiGLU runs :class:`_SwiGLU` on bf16 CPU tensors; the same parameters and state dict."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden_states)
        kernels = fused.operators_for(gate_up)
        if kernels is None:
            gate, up = gate_up.chunk(2, dim=-1)
            plain: torch.Tensor = self.down_proj(up * self.activation_fn(gate))
            return plain
        swiglu = _SwiGLU.apply(gate_up.contiguous(), kernels)  # type: ignore[no-untyped-call]
        out: torch.Tensor = self.down_proj(swiglu)
        return out


def use_fused_decoder(model: Any) -> int:
    """Give every ``Phi3Attention`` of ``model`` :class:`TrainingPhi3Attention`'s forward and every ``Phi3MLP`` with a
    SiLU activation :class:`TrainingPhi3MLP`'s. Returns how many modules."""
    if not patches.applies("phi3_decoder"):
        return 0
    count = 0
    for module in model.modules():
        if type(module) is Phi3Attention:
            module.__class__ = TrainingPhi3Attention
            count += 1
        elif type(module) is Phi3MLP and module.config.hidden_act == "silu":
            module.__class__ = TrainingPhi3MLP
            count += 1
    return count


def fused_coverage(model: Any) -> str | None:
    """Which decoder modules of a model given :func:`use_fused_decoder` and ``norm.use_training_rms_norm`` take
    transformers' (or torch's) forwards rather than the fused kernels' in bf16 on a CPU, and why; None where every
    attention, MLP and norm takes the kernels."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .norm import TrainingRMSNorm

    fused_classes = (TrainingPhi3Attention, TrainingPhi3MLP, TrainingRMSNorm)
    aside: dict[str, int] = {}
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        for child in layer.children():
            if next(child.parameters(), None) is not None and not isinstance(child, fused_classes):
                aside[type(child).__name__] = aside.get(type(child).__name__, 0) + 1
    if not aside:
        return None
    modules = ", ".join(f"{count} {name}" for name, count in aside.items())
    return (
        f"the fused CPU kernels cover Phi-3's attention, SwiGLU MLP and RMSNorm: {modules} run transformers' "
        "forwards (in bf16 on a CPU, torch's element-wise ops)"
    )


class _RotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, kernels: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.kernels = kernels
        query, key, value = kernels.rotary_qkv_forward(qkv, cos, sin, heads, kv_heads)
        return query, key, value

    @staticmethod
    def backward(
        ctx: Any, d_query: torch.Tensor, d_key: torch.Tensor, d_value: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, None, None]:
        cos, sin = ctx.saved_tensors
        grads = [grad.contiguous() for grad in (d_query, d_key, d_value)]
        return ctx.kernels.rotary_qkv_backward(*grads, cos, sin), None, None, None, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor, kernels: Any) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        ctx.kernels = kernels
        hidden: torch.Tensor = kernels.swiglu_forward(gate_up)
        return hidden

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (gate_up,) = ctx.saved_tensors
        return ctx.kernels.swiglu_backward(grad.contiguous(), gate_up), None
