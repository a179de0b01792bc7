"""The C allocator of the trainer process: mimalloc where its wheel is installed, else the C library's malloc.

glibc's malloc fragments under a training step's pattern. Each checkpointed decoder layer allocates tens of MB of
short-lived activations and, between them, small long-lived allocations (autograd's graph nodes, kept layer inputs)
that glibc carves out of the freed activations' space, so the next layer's activations no longer fit there and the
heap grows: 0.4-0.9 GB of free holes at the peak of a Phi-3-mini step. mimalloc keeps sizes apart and avoids most of
it (same speed, measured in ``docs/sizing.md``). It has to be loaded before the process starts (``LD_PRELOAD``), so
the worker starts each trainer with it (:func:`preload`), the way CPU training launchers preload jemalloc or tcmalloc.
``$PHITUNE_ALLOCATOR=system`` keeps the C library's.

mimalloc hands memory that stays free for 10 ms back to the OS, and every page of it comes back by a fault when the
next layer or step allocates again. A training step allocates the same sizes over and over, so the trainer asks it to
keep what it frees instead (:func:`keep_freed_memory`), as PyTorch's CUDA caching allocator does on a GPU.

Light: no torch.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Literal

from .errors import MissingDependencyError, SpecError

ALLOCATOR_ENV = "PHITUNE_ALLOCATOR"
"""``mimalloc`` (the default, where ``cmeel-mimalloc`` is installed) or ``system``."""
_WHEEL = "cmeel-mimalloc"
_LIBRARY = "cmeel.prefix/lib/libmimalloc.so"
_PURGE_DELAY = 15
"""``mi_option_purge_delay`` in ``mimalloc.h`` (the same index in 2.1 and 3.x)."""


def for_trainers() -> Literal["mimalloc", "system"]:
    """The allocator the worker's trainers get: mimalloc unless ``$PHITUNE_ALLOCATOR`` is ``system`` or (where it
    is unset) the wheel is not installed. A clear error for any other value, and for ``mimalloc`` asked for but not
    installed."""
    return "mimalloc" if _trainers_library() is not None else "system"


def preload(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the trainers' allocator preloaded into the processes started with it."""
    library = _trainers_library()
    preloaded = [entry for entry in env.get("LD_PRELOAD", "").split(":") if entry]
    if library is None or str(library) in preloaded:
        return env
    return {**env, "LD_PRELOAD": ":".join([str(library), *preloaded])}


def mimalloc_library() -> Path | None:
    """The shared library of the installed ``cmeel-mimalloc`` wheel; None where it is not installed (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        path = Path(str(importlib.metadata.distribution(_WHEEL).locate_file(_LIBRARY)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _trainers_library() -> Path | None:
    value = os.environ.get(ALLOCATOR_ENV, "").strip().lower()
    if value not in ("", "mimalloc", "system"):
        raise SpecError(ALLOCATOR_ENV, f"{value!r} is not an allocator: use mimalloc or system")
    library = mimalloc_library() if value != "system" else None
    if library is None and value == "mimalloc":
        if not sys.platform.startswith("linux"):
            raise SpecError(ALLOCATOR_ENV, "mimalloc is preloaded on Linux only: unset it or use system")
        raise MissingDependencyError(_WHEEL, "local")
    return library


def in_use() -> Literal["mimalloc", "system"]:
    """The allocator this process runs on: mimalloc where its library is mapped (Linux), else the C library's."""
    return "mimalloc" if _mapped_mimalloc() is not None else "system"


def keep_freed_memory() -> bool:
    """Where this process runs on mimalloc: return what is free now to the OS (a loader's scratch memory), then keep
    what is freed from here on for reuse instead of returning it. The peak grows by what fragmentation strands; reused
    pages cost no faults. Returns whether mimalloc was there to tell (False on the C library's malloc)."""
    path = _mapped_mimalloc()
    if path is None:
        return False
    library = ctypes.CDLL(path)  # the preloaded copy: the loader hands back the library already mapped
    library.mi_collect(ctypes.c_bool(True))
    library.mi_option_set(ctypes.c_int(_PURGE_DELAY), ctypes.c_long(-1))
    return True


def _mapped_mimalloc() -> str | None:
    """The path of the mimalloc library mapped into this process, if any."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if "libmimalloc" in path:
                    return path
    except OSError:
        return None
    return None
