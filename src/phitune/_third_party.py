"""What phitune does about the libraries under it, so that their noise stays out of its output.

Each message traced to its source in a ``phitune demo``, ``chat`` and ``export`` run:

``Failed to load CPU gemm_4bit_forward from kernels-community``
    peft imports bitsandbytes on its own import, so every LoRA job and every chat imports it. On a CPU with
    AVX512-BF16, bitsandbytes' import (its CPU backend, ``bitsandbytes/backends/cpu/ops.py``) calls
    ``kernels.get_kernel("kernels-community/quantization-bitsandbytes")``: a download from the Hugging Face Hub, and
    this warning where that fails. bitsandbytes has no switch for it. :func:`guard_imports`, run by ``import phitune``,
    lets bitsandbytes' import find no ``kernels`` package, so it keeps its bundled kernels and never reaches for the
    network; phitune does not use that kernel (QLoRA dequantises with :mod:`phitune.trainer.quantized`).
``Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.``
    accelerate imports DeepSpeed inside every ``save_pretrained`` (to recognise a DeepSpeed engine) wherever DeepSpeed
    is installed, and DeepSpeed's import logs this to stdout. Leaving it unimported would make DeepSpeed look
    uninstalled to the checks of a DeepSpeed job, so :func:`quiet_libraries` drops the record instead, with a filter on
    DeepSpeed's logger (DeepSpeed's own set-up of that logger keeps it).
transformers' ``FutureWarning``\\ s (peft calls APIs transformers deprecates) and progress bars (``Loading weights``,
``Writing model shards``)
    :func:`quiet_libraries` ignores Python warnings and turns transformers' verbosity down to errors, without progress
    bars, when transformers is imported.

phitune's commands (the CLI, ``phitune serve``) call :func:`quiet_libraries` unless ``--verbose``; a script may call
it too (``phitune.quiet_libraries()``), as the samples do. A job's trainer process keeps everything: it goes to the
job's log, ``jobs/<id>/train.log``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""What bitsandbytes logs when it cannot fetch its CPU kernel from the Hub."""
DEEPSPEED_ACCELERATOR_BANNER = "Setting accelerator to CPU"
"""What DeepSpeed logs on import where it finds no GPU."""


def guard_imports() -> None:
    """Make bitsandbytes, when first imported in this process, find no ``kernels`` package (so no Hub download).
    Idempotent; ``import phitune`` calls it."""
    if not _hooked("bitsandbytes"):
        sys.meta_path.insert(0, _AroundImport("bitsandbytes", _without_hub_kernels))


def quiet_libraries(*, verbose: bool = False) -> None:
    """Keep the warnings, banners and progress bars of the libraries under phitune out of this process's output
    (Python warnings are ignored; transformers logs errors only). Nothing changes with ``verbose``, nor when called
    again."""
    if verbose:
        return
    warnings.simplefilter("ignore")
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in deepspeed.filters):
        deepspeed.addFilter(_DropMessages(DEEPSPEED_ACCELERATOR_BANNER))
    if "transformers" in sys.modules:
        _quiet_transformers()
    elif not _hooked("transformers"):
        sys.meta_path.insert(0, _AroundImport("transformers", contextlib.nullcontext, after=_quiet_transformers))


def _hooked(name: str) -> bool:
    return any(isinstance(finder, _AroundImport) and finder.name == name for finder in sys.meta_path)


def _quiet_transformers(_: ModuleType | None = None) -> None:
    hf_logging = importlib.import_module("transformers.utils.logging")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def _without_hub_kernels() -> Iterator[None]:
    """``import kernels`` fails inside, and bitsandbytes' warning about the kernel it then cannot fetch is dropped."""
    kernels = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  # what sys.modules holds for a module known absent
    cpu_backend = logging.getLogger("bitsandbytes.backends.cpu.ops")
    dropped = _DropMessages(HUB_KERNEL_WARNING)
    cpu_backend.addFilter(dropped)
    try:
        yield
    finally:
        cpu_backend.removeFilter(dropped)
        if kernels is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels


class _DropMessages(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class _AroundImport(importlib.abc.MetaPathFinder):
    """Runs the first import of the module ``name`` inside ``context()``, then ``after(module)``. It finds the module
    with the other finders and only wraps the loader they return (so a mere ``importlib.util.find_spec`` probe changes
    nothing); it takes itself out once the module is loaded."""

    def __init__(
        self,
        name: str,
        context: Callable[[], contextlib.AbstractContextManager[Any]],
        *,
        after: Callable[[ModuleType], None] | None = None,
    ) -> None:
        self.name = name
        self.context = context
        self.after = after

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _WrappedLoader(spec.loader, self)
                return spec
        return None


class _WrappedLoader(importlib.abc.Loader):
    """A module's own loader, its ``exec_module`` run the way an :class:`_AroundImport` asks."""

    def __init__(self, loader: importlib.abc.Loader, around: _AroundImport) -> None:
        self._loader = loader
        self._around = around

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with self._around.context():
            self._loader.exec_module(module)
        with contextlib.suppress(ValueError):  # a concurrent import took it out already
            sys.meta_path.remove(self._around)
        if self._around.after is not None:
            self._around.after(module)

    def __getattr__(self, name: str) -> Any:  # resource readers, get_data, ...: the module's own loader answers
        return getattr(self._loader, name)
