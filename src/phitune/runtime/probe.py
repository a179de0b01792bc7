"""The machine probe's process (``python -m phitune.runtime.probe [--quantized] [--device DEVICE]``): times a
Phi-3-mini-sized GEMM in bf16 and fp32 and, with ``--quantized``, QLoRA's NF4 dequantisation, and prints the
:class:`~phitune.estimate.probe.MachineProbe` as JSON. :func:`phitune.estimate.probe.probe_machine` runs it and caches
what it prints; :func:`measure` measures in the calling process instead (the benchmarks, with their thread counts).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from .._process import die_with_parent
from ..estimate.probe import MachineProbe, fingerprint


def measure(*, quantized: bool = False, device: str | None = None) -> MachineProbe:
    """This process's matmul throughput (and dequantisation rate when ``quantized``), measured now (about a
    second per dtype)."""
    import torch

    from ..trainer.model import bf16_supported

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = bf16_supported()
    return MachineProbe(
        device=device,
        threads=torch.get_num_threads(),
        # where bf16 is emulated (a CPU without AVX512-BF16) one full-size GEMM takes tens of seconds: time fewer rows
        bf16_flops=_gemm_flops(torch.bfloat16, device, rows=512 if bf16 else 4),
        fp32_flops=_gemm_flops(torch.float32, device),
        dequant_per_second=_dequant_rate(device) if quantized else None,
        bf16=bf16,
        measured_at=time.time(),
        fingerprint=fingerprint(),
    )


def _timed(fn: Any, seconds: float) -> float:
    """Seconds per call of ``fn``: best of repeated calls over about ``seconds``, after a warm-up call."""
    fn()
    best = math.inf
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _gemm_flops(dtype: Any, device: str, rows: int = 512) -> float:
    """A Phi-3-mini-sized projection (``rows`` tokens x 3072 -> 3072): the best of a second of repeats, which sees the
    machine's speed between other processes' time slices."""
    import torch

    a = torch.randn(rows, 3072, dtype=dtype, device=device)
    b = torch.randn(3072, 3072, dtype=dtype, device=device)

    def matmul() -> None:
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return 2 * rows * 3072 * 3072 / _timed(matmul, 1.0)


def _dequant_rate(device: str) -> float | None:
    """NF4 -> bf16 dequantisation of a Phi-3-mini-sized weight (8192 x 3072) as QLoRA runs it on every pass: into the
    reused buffer on CPU (:mod:`phitune.trainer.quantized`), bitsandbytes' own op elsewhere. Random packed bytes and
    scales stand in for a quantised weight (the kernel's speed does not depend on them)."""
    try:
        from ..trainer.quantized import dequantize_into
    except ImportError:  # no bitsandbytes
        return None
    import torch

    shape = (8192, 3072)
    packed = torch.randint(0, 256, (shape[0] * shape[1] // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(shape[0] * shape[1] // 64, dtype=torch.float32, device=device)
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    if dequantize_into(packed, absmax, blocksize=64, quant_type="nf4", out=out):
        seconds = _timed(lambda: dequantize_into(packed, absmax, blocksize=64, quant_type="nf4", out=out), 0.3)
    else:
        op = torch.ops.bitsandbytes.dequantize_4bit.default
        seconds = _timed(lambda: op(packed, absmax, 64, "nf4", shape, torch.bfloat16), 0.3)
    return float(shape[0] * shape[1] / seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phitune.runtime.probe")
    parser.add_argument("--quantized", action="store_true", help="also time NF4 dequantisation (needs bitsandbytes)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    args = parser.parse_args(argv)
    die_with_parent()
    print(measure(quantized=args.quantized, device=args.device).model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
