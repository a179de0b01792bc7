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
``~/.cache/torch_extensions/py<version>_cpu``), where later jobs load them in milliseconds. The build is named by
what makes it: the instruction set torch itself uses on this CPU (``torch.backends.cpu.get_cpu_capability()``) and a
hash of the source, the compiler flags and the torch and Python versions, so installs of different versions on one
machine keep one build each and never rebuild each other's. One process builds at a time (an ``flock`` on the build's
``build.lock``, which the kernel releases when its holder dies, however it dies); the others wait for it and load its
library. The build runs in a child process, in a folder of its own, with a time limit
(``$PHITUNE_FUSED_BUILD_TIMEOUT``, default 900 s); the library is moved into place whole, so a builder killed midway
leaves nothing a later build waits on. Where the build fails (no compiler, the time limit), :func:`status` says why,
the trainer records it as a job event and runs the torch ops instead; ``PHITUNE_FUSED_KERNELS=0`` skips the kernels.
Only bf16 tensors on the CPU take them: fp32 training and GPUs run the torch ops.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._process import child_environment, die_with_parent
from ..errors import scrub_paths

_LOG = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.cpp")
"""The kernels' C++ source, shipped with the package."""

BUILD_TIMEOUT_ENV = "PHITUNE_FUSED_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT = 900.0
"""Seconds a build may take, and a process may wait for another's, before the trainer runs torch's ops instead."""

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


@dataclass(frozen=True)
class Build:
    """What one build of the kernels is made of; ``name`` names it by a hash of all of it."""

    capability: str
    source: Path
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]

    @property
    def name(self) -> str:
        recipe = [self.source.read_text(), *self.cflags, "--", *self.ldflags, torch.__version__, sys.version]
        digest = hashlib.sha256("\0".join(recipe).encode()).hexdigest()[:16]
        return f"phitune_fused_{self.capability.lower().replace(' ', '_')}_{digest}"

    @property
    def library(self) -> Path:
        """Where the built library lies: ``<extensions root>/<name>/<name>.so``."""
        return extensions_root() / self.name / f"{self.name}.so"


def this_build() -> Build:
    """The build of :data:`SOURCE` for this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    cflags = ("-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", *_INSTRUCTION_FLAGS.get(capability, []))
    return Build(capability, SOURCE, cflags, ("-fopenmp",))


def extensions_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR``, else torch's default root for this Python on the CPU."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return Path(configured)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"


def build_timeout() -> float:
    """``$PHITUNE_FUSED_BUILD_TIMEOUT`` seconds, default :data:`DEFAULT_BUILD_TIMEOUT`."""
    value = os.environ.get(BUILD_TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_BUILD_TIMEOUT
    except ValueError:
        _LOG.warning("%s=%r is not a number of seconds; using %s", BUILD_TIMEOUT_ENV, value, DEFAULT_BUILD_TIMEOUT)
        return DEFAULT_BUILD_TIMEOUT


@dataclass(frozen=True)
class KernelStatus:
    """Whether this process has the kernels: ``detail`` says how they came (built, or loaded from the cache) or why
    they are unavailable; ``seconds`` is what getting them took."""

    available: bool
    detail: str
    seconds: float = 0.0

    @property
    def message(self) -> str:
        if self.available:
            return f"fused CPU kernels {self.detail} in {self.seconds:.1f} s"
        return f"fused CPU kernels unavailable, the trainer runs torch's ops instead: {self.detail}"


class _BuildFailed(Exception):
    """The kernels could not be built; the message says why."""


@functools.cache
def status() -> KernelStatus:
    """Build (once per machine and :class:`Build`) and load the kernels into this process, on first call."""
    if not enabled():
        return KernelStatus(False, "turned off by PHITUNE_FUSED_KERNELS=0")
    started = time.monotonic()
    build = this_build()
    try:
        built = _ensure_built(build, build_timeout())
        torch.ops.load_library(str(build.library))
    except Exception as error:  # a missing compiler or ninja raises its own types; every failure falls back alike
        _LOG.warning("fused CPU kernels unavailable, the trainer runs torch's ops instead: %s", error)
        return KernelStatus(False, scrub_paths(str(error)), time.monotonic() - started)
    return KernelStatus(True, "built" if built else "loaded", time.monotonic() - started)


def operators() -> Any | None:
    """The kernels' operators (``torch.ops.phitune_fused``), built on first call; ``None`` where they are disabled
    or cannot be built (:func:`status` says why)."""
    return torch.ops.phitune_fused if status().available else None


def _ensure_built(build: Build, timeout: float) -> bool:
    """Build ``build``'s library unless it exists; True if this call built it."""
    if build.library.exists():
        return False
    folder = build.library.parent
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder, timeout):
        if build.library.exists():  # built by the process this one waited for
            return False
        for abandoned in folder.glob("build-*"):  # left by builders that died: no live build uses them now
            shutil.rmtree(abandoned, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
        try:
            _build_in_child(build, work, timeout)
            os.replace(work / build.library.name, build.library)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return True


@contextlib.contextmanager
def _build_lock(folder: Path, timeout: float) -> Iterator[None]:
    """Hold ``folder``'s build lock, waiting at most ``timeout`` seconds for the process that holds it."""
    with open(folder / "build.lock", "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _BuildFailed(
                        f"another process has been building them for more than {timeout:.0f} s ({BUILD_TIMEOUT_ENV})"
                    ) from None
                time.sleep(0.2)
        yield


def _build_in_child(build: Build, folder: Path, timeout: float) -> None:
    """Compile ``build`` into ``folder`` in a child process (and its own process group, so a build past ``timeout``
    is killed with its compilers)."""
    recipe = json.dumps(
        {"name": build.name, "source": str(build.source), "cflags": build.cflags, "ldflags": build.ldflags}
    )
    env = child_environment()
    env["PATH"] = _path_with_ninja(env.get("PATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-m", "phitune.trainer.fused", str(folder), recipe],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise _BuildFailed(f"the build took more than {timeout:.0f} s ({BUILD_TIMEOUT_ENV})") from None
    if child.returncode != 0:
        tail = "\n".join(output.decode("utf-8", "replace").strip().splitlines()[-12:])
        raise _BuildFailed(f"the build failed (exit code {child.returncode}):\n{tail}")


def _path_with_ninja(path: str) -> str:
    """cpp_extension runs ``ninja`` from ``$PATH``: add the folder of the ``ninja`` wheel's binary (a virtual
    environment's ``bin``, absent from ``$PATH`` when its Python runs without activating it) where none is found."""
    if shutil.which("ninja", path=path) is None:
        import ninja

        return os.pathsep.join([ninja.BIN_DIR, path])
    return path


def operators_for(*tensors: torch.Tensor) -> Any | None:
    """The kernels' operators where all ``tensors`` are plain bf16 CPU tensors and the kernels are available; not
    under ``torch.compile``, which fuses torch's ops itself."""
    if torch.compiler.is_compiling():
        return None
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.dtype != torch.bfloat16 or type(tensor) not in _PLAIN:
            return None
    return operators()


def _build_here(folder: str, recipe: str) -> None:
    """The build child: compile the recipe's source into ``folder``, dying with the process that waits for it."""
    die_with_parent()
    from torch.utils import cpp_extension

    options = json.loads(recipe)
    cpp_extension.load(
        name=options["name"],
        sources=[options["source"]],
        extra_cflags=options["cflags"],
        extra_ldflags=options["ldflags"],
        build_directory=folder,
        is_python_module=False,
    )


if __name__ == "__main__":
    _build_here(*sys.argv[1:3])
