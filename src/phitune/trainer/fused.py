"""Fused CPU kernels for the trainer's element-wise work, built on this machine at first use.

On a CPU, much of a training step outside the matmuls is chains of element-wise torch ops, each one pass over a
``[tokens, width]`` tensor in memory: a dozen passes for an RMSNorm forward and backward, eight for Phi-3's SwiGLU
(plus the ``cat`` that joins its gradient's halves), a dozen for rotary embeddings (plus a zero-filled gradient of the
full ``qkv_proj`` width per slice), a mask copy and a softmax per block of attention scores, and an fp32 copy of the
logits for the loss. ``fused.cpp`` does each in one pass with fp32 in registers: :mod:`.norm`, :mod:`.decoder`
(rotary queries and keys, SwiGLU), :mod:`.attention` (the causal softmax) and :mod:`.loss` (cross-entropy and its
gradient) call it. The forwards round where torch's ops round and return the same bf16 values (the exponentials
within an ulp of torch's); the backwards keep fp32 where torch rounds to bf16 between ops. On the benchmark model
(``benchmarks/train_vs_trl.py``) the kernels together take ~14% off a step.

The kernels compile with ``torch.utils.cpp_extension`` (the C++ compiler torch's extensions use, ``c++`` by default,
and ninja) the first time a job needs them, ~10 s, into ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), where later jobs load them in milliseconds; torchrun's ranks wait on one build. The
build targets the instruction set torch itself uses on this CPU (``torch.backends.cpu.get_cpu_capability()``), part
of the build's name, so a cache shared by different machines keeps one build per instruction set. Where the build
fails (no compiler), the trainer logs why once and runs the torch ops instead; ``PHITUNE_FUSED_KERNELS=0`` skips the
kernels. Only bf16 tensors on the CPU take them: fp32 training and GPUs run the torch ops.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

_LOG = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.cpp")
"""The kernels' C++ source, shipped with the package."""

_INSTRUCTION_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
"""Compiler flags for torch's CPU capability; any other capability builds for the compiler's default target."""


_PLAIN = (torch.Tensor, torch.nn.Parameter)
"""Tensor types the kernels take: not subclasses such as DTensor (FSDP) or quantised weights."""


def enabled() -> bool:
    """Whether the trainer may use the kernels: unless ``$PHITUNE_FUSED_KERNELS`` is ``0``."""
    return os.environ.get("PHITUNE_FUSED_KERNELS", "1") != "0"


@functools.cache
def operators() -> Any | None:
    """The kernels' operators (``torch.ops.phitune_fused``), building them on first call; ``None`` where they are
    disabled or cannot be built (logged once, with the compiler's reason)."""
    if not enabled():
        return None
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    flags = _INSTRUCTION_FLAGS.get(capability, [])
    try:
        _put_ninja_on_path()
        cpp_extension.load(
            name=f"phitune_fused_{capability.lower().replace(' ', '_')}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # a missing compiler or ninja raises its own types; every failure falls back alike
        _LOG.warning("fused CPU kernels unavailable, the trainer runs torch's ops instead: %s", error)
        return None
    return torch.ops.phitune_fused


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from ``$PATH``: add the folder of the ``ninja`` wheel's binary (a virtual
    environment's ``bin``, absent from ``$PATH`` when its Python runs without activating it) where none is found."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def operators_for(*tensors: torch.Tensor) -> Any | None:
    """The kernels' operators where all ``tensors`` are plain bf16 CPU tensors and the kernels are available; not
    under ``torch.compile``, which fuses torch's ops itself."""
    if torch.compiler.is_compiling():
        return None
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.dtype != torch.bfloat16 or type(tensor) not in _PLAIN:
            return None
    return operators()
