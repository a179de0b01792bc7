"""QLoRA's 4-bit linear layers on CPU, without a fresh weight-sized allocation on every pass.

bitsandbytes dequantises a 4-bit weight into a new tensor on each forward and each backward pass. On CPU a tensor
that large (100 MB for Phi-3-mini's ``gate_up_proj``) is a fresh ``mmap`` from the C library, and faulting its pages
in costs several times the dequantisation itself (45 of 50 ms, measured on 2 cores).
:func:`reuse_dequantisation_buffer` makes a model's 4-bit layers dequantise into one buffer per thread instead:
bitsandbytes' own kernel, the same values, the pages faulted once.
"""

from __future__ import annotations

import ctypes
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

from . import patches
from .buffers import thread_buffer

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dequantize_into(packed: Any, absmax: Any, *, blocksize: int, quant_type: str, out: Any) -> bool:
    """bitsandbytes' CPU kernel dequantising ``packed`` (4-bit pairs, ``out.numel() // 2`` bytes) with fp32 block
    scales ``absmax`` into the 2-D tensor ``out``; False, with ``out`` untouched, where that kernel does not apply
    (not CPU, an odd row length, blocks bitsandbytes dequantises another way, or a build without the kernel)."""
    rows, columns = out.shape
    kernel = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_DTYPE_NAMES.get(out.dtype)}", None)
    if (
        kernel is None
        or isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
        or out.device.type != "cpu"
        or columns % 2
        or blocksize >= 2048  # bitsandbytes' AVX512 kernel is inexact there and it falls back to torch
        or not out.is_contiguous()
        or absmax.dtype != torch.float32
    ):
        return False
    packed = packed.contiguous().view(torch.uint8)
    absmax = absmax.contiguous()
    kernel(
        ctypes.c_void_p(packed.data_ptr()),
        ctypes.c_void_p(absmax.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_longlong(blocksize),
        ctypes.c_longlong(rows),
        ctypes.c_longlong(columns),
    )
    return True


def dequantized_weight(weight: Any, state: Any, dtype: torch.dtype) -> Any:
    """The 4-bit ``weight`` (with its ``QuantState``) in ``dtype``, [out_features, in_features]: in this thread's
    reused buffer where the CPU kernel applies (valid until the next call), else bitsandbytes' own fresh tensor."""
    absmax = state.absmax
    if state.nested:  # as bitsandbytes.functional.dequantize_4bit
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    if weight.device.type == "cpu":
        out = thread_buffer("dequantised weight", tuple(state.shape), dtype)
        if dequantize_into(weight, absmax.float(), blocksize=state.blocksize, quant_type=state.quant_type, out=out):
            return out
    return bnb.functional.dequantize_4bit(weight, state).to(dtype)


class _Matmul4bit(torch.autograd.Function):
    """``x @ W.T + bias`` for a frozen 4-bit ``W``, dequantised anew in the backward as bitsandbytes does (nothing
    weight-sized is saved)."""

    @staticmethod
    def forward(ctx: Any, x: Any, weight: Any, state: Any, bias: Any) -> Any:
        ctx.weight, ctx.state = weight, state
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, dequantized_weight(weight, state, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Any) -> Any:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ dequantized_weight(ctx.weight, ctx.state, grad_output.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class BufferedLinear4bit(bnb.nn.Linear4bit):  # type: ignore[misc]
    """A ``bitsandbytes.nn.Linear4bit`` that dequantises into this thread's reused buffer (CPU training)."""

    compute_type_is_set: bool

    def forward(self, x: Any) -> Any:
        """``bitsandbytes.nn.Linear4bit.forward``'s training path, through :class:`_Matmul4bit`."""
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(self)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out: torch.Tensor = _Matmul4bit.apply(x, self.weight, self.weight.quant_state, bias)  # type: ignore[no-untyped-call]
        return out.to(input_dtype)


def reuse_dequantisation_buffer(model: Any) -> int:
    """Make ``model``'s 4-bit linear layers on CPU dequantise into a reused per-thread buffer; returns how many.
    Values are bit-identical to bitsandbytes' own layers (the same kernel), and peft wraps them as it does those."""
    if not patches.applies("linear_4bit"):
        return 0
    layers = [
        m
        for m in model.modules()
        if type(m) is bnb.nn.Linear4bit and m.weight.device.type == "cpu" and m.weight.quant_state is not None
    ]
    for layer in layers:
        layer.__class__ = BufferedLinear4bit
    return len(layers)
