"""This machine's measured throughput, :class:`MachineProbe`, kept in a disk cache.

The measurement runs in a child process (:mod:`phitune.runtime.probe`, ``python -m phitune.runtime.probe``): the
caller imports no torch and times no GEMM itself, and the child sees the machine as a trainer process does (torch's
default threads, no other work of the caller's). A measurement is reused from the cache for an hour
(:data:`PROBE_TTL_SECONDS`) on the same machine and software (:func:`fingerprint`). Light: no torch.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .._process import child_environment
from ..errors import scrub_paths

PROBE_VERSION = 3
"""Part of a cached probe's key: raised when what the probe times or reports changes (3: measured in a child process,
which reports whether bf16 is fast)."""
PROBE_TTL_SECONDS = 3600
"""How long a probe is reused: an hour, so that one taken while the machine was busy (a quarter of the quiet rate was
seen here) does not skew estimates for long."""
PROBE_TIMEOUT_SECONDS = 300.0
"""How long the probe's child process may take (it imports torch and times about two seconds of GEMMs)."""


class MachineProbe(BaseModel):
    """Measured throughput of this machine: dense matmuls in bf16 and fp32, and bitsandbytes' NF4 dequantisation."""

    device: str
    threads: int
    bf16_flops: float = Field(description="FLOP/s of a timed bf16 GEMM.")
    fp32_flops: float = Field(description="FLOP/s of a timed fp32 GEMM.")
    dequant_per_second: float | None = Field(None, description="NF4 weights dequantised to bf16 per second.")
    bf16: bool = Field(
        description="Whether bf16 matmuls are fast here (CUDA with bf16, a CPU with AVX512-BF16 or AMX): the dtype "
        "precision='auto' computes in.",
    )
    measured_at: float
    fingerprint: str


def default_probe_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phitune" / "machine_probe.json"


def fingerprint() -> str:
    """What a probe measured: this machine, the CPUs and threads a trainer gets, the devices it sees and the torch
    build, read without importing torch."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return f"{platform.node()}|{os.cpu_count()}|{cpus}|{threads}|{devices}|{torch_version}|v{PROBE_VERSION}"


def probe_machine(
    cache: Path | None = None, *, refresh: bool = False, quantized: bool = False, device: str | None = None
) -> MachineProbe:
    """This machine's matmul throughput (and dequantisation rate when ``quantized``), from ``cache`` when it holds
    a measurement of the same machine and software younger than an hour; else measured in a child process (a few
    seconds) and saved."""
    key = fingerprint()
    cached: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            cached = {}
    found = cached.get(key)
    if found and not refresh:
        probe = MachineProbe.model_validate(found)
        fresh = time.time() - probe.measured_at < PROBE_TTL_SECONDS
        if fresh and (probe.dequant_per_second is not None or not quantized) and device in (None, probe.device):
            return probe
    probe = _measure_in_child(quantized=quantized, device=device)
    if cache is not None:
        cached[key] = probe.model_dump()
        cache.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file of this thread's own, then an atomic rename: concurrent probes never see half a file
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, cache)
    return probe


def _measure_in_child(*, quantized: bool, device: str | None) -> MachineProbe:
    """Run :mod:`phitune.runtime.probe` and read the probe it prints; RuntimeError where it fails."""
    command = [sys.executable, "-m", "phitune.runtime.probe"]
    command += ["--quantized"] if quantized else []
    command += ["--device", device] if device else []
    try:
        done = subprocess.run(
            command,
            env=child_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the machine probe took more than {PROBE_TIMEOUT_SECONDS:.0f} s") from None
    if done.returncode != 0:  # no torch, or a crash: the local backend's fit check logs it and refuses nothing
        tail = scrub_paths("\n".join(done.stderr.strip().splitlines()[-8:]))
        raise RuntimeError(f"the machine probe failed (exit code {done.returncode}):\n{tail}")
    return MachineProbe.model_validate_json(done.stdout.strip().splitlines()[-1])
