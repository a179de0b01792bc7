"""Every change phitune makes to a third-party model class, with the package versions it was verified on.

The trainer gives some modules of a loaded model a faster forward by swapping their class for a subclass
(``module.__class__ = ...``), and one of those forwards asks torch a private question. Each relies on its parent's
attributes and on what its forward is given, which a release of the package may change without notice. So each is
registered here with the versions the test suite runs it on (``pyproject.toml`` bounds the packages the same way).
Where an installed version is outside them the patch is left out: the modules keep the library's own class and
forward (the same results, slower), and :func:`left_out` says which and why; the trainer reports it as a warning
event of the job. ``PHITUNE_PATCHES=force`` applies them anyway (to verify a new release).

Light: no torch, no transformers (the patches themselves live in :mod:`.norm`, :mod:`.decoder`, :mod:`.lora` and
:mod:`.quantized`, imported only where their patch applies).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from dataclasses import dataclass

_LOG = logging.getLogger(__name__)

PATCHES_ENV = "PHITUNE_PATCHES"
"""``force``: apply every patch whatever the installed versions."""

TORCH = ">=2.13,<2.14"
TRANSFORMERS = ">=5.24,<5.26"
PEFT = ">=0.21,<0.22"
BITSANDBYTES = ">=0.50,<0.51"


@dataclass(frozen=True)
class Patch:
    """One change to third-party classes: what it replaces, where it lives and the versions it was verified on."""

    name: str
    replaces: str
    module: str
    verified: tuple[tuple[str, str], ...]
    """(distribution, version specifier) pairs."""


PATCHES = {
    patch.name: patch
    for patch in (
        Patch(
            "rms_norm",
            "transformers' Phi3RMSNorm and LlamaRMSNorm become TrainingRMSNorm (a backward written out)",
            "phitune.trainer.norm",
            (("transformers", TRANSFORMERS),),
        ),
        Patch(
            "phi3_decoder",
            "transformers' Phi3Attention and Phi3MLP become TrainingPhi3Attention and TrainingPhi3MLP (fused rotary "
            "and SwiGLU)",
            "phitune.trainer.decoder",
            (("transformers", TRANSFORMERS),),
        ),
        Patch(
            "lora_linear",
            "peft's lora.Linear becomes FusedLoraLinear (the adapter inside one GEMM), which asks torch's private "
            "torch.utils._python_dispatch._get_current_dispatch_mode",
            "phitune.trainer.lora",
            (("peft", PEFT), ("torch", TORCH)),
        ),
        Patch(
            "linear_4bit",
            "bitsandbytes' Linear4bit becomes BufferedLinear4bit (dequantises into a reused buffer on CPU)",
            "phitune.trainer.quantized",
            (("bitsandbytes", BITSANDBYTES),),
        ),
    )
}


def outside(name: str) -> list[str]:
    """The installed packages outside patch ``name``'s verified versions, each as ``package version (verified:
    specifier)``; a package that is not installed is not listed (nothing of it gets patched)."""
    from packaging.specifiers import SpecifierSet

    found = []
    for package, specifier in PATCHES[name].verified:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not SpecifierSet(specifier).contains(version, prereleases=True):
            found.append(f"{package} {version} (verified: {specifier})")
    return found


@functools.cache
def applies(name: str) -> bool:
    """Whether patch ``name`` is applied in this process: its packages are within the verified versions, or
    ``PHITUNE_PATCHES=force``. A patch left out is logged once."""
    problems = outside(name)
    if not problems:
        return True
    if os.environ.get(PATCHES_ENV, "").strip().lower() == "force":
        _LOG.warning("applying the %s patch outside its verified versions (%s=force): %s", name, PATCHES_ENV, problems)
        return True
    _LOG.warning("%s", _left_out_message(name, problems))
    return False


def left_out() -> list[str]:
    """Why each patch that does not apply in this process is left out (empty where all apply)."""
    return [_left_out_message(name, outside(name)) for name in PATCHES if not applies(name)]


def _left_out_message(name: str, problems: list[str]) -> str:
    patch = PATCHES[name]
    return (
        f"the trainer's {name} patch is left out, the library's own forward runs instead (slower, the same results): "
        f"{', '.join(problems)}; it makes {patch.replaces}. {PATCHES_ENV}=force applies it anyway"
    )
