"""The trainer's C allocator: mimalloc preloaded into the processes the worker starts, the opt-out, and the refusal of
a setting it does not know."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import phitune
from phitune import _allocator as allocator
from phitune.errors import SpecError
from phitune.local.worker import trainer_env
from phitune.trainer.loop import _autocast
from phitune.types import Distributed

LIBRARY = allocator.mimalloc_library()


def allocator_of(env: dict[str, str]) -> str:
    """The allocator a fresh Python process started with ``env`` runs on, as the trainer reports it."""
    code = "from phitune import _allocator as allocator; print(allocator.in_use())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(LIBRARY is None, reason="cmeel-mimalloc is not installed (the 'local' extra brings it on Linux)")
def test_trainers_run_on_mimalloc_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(allocator.ALLOCATOR_ENV, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = trainer_env(Distributed())
    assert env["LD_PRELOAD"] == str(LIBRARY) and allocator_of(env) == "mimalloc"
    assert allocator.preload(env) == env  # preloaded once, however often asked
    assert allocator.in_use() == "system" and allocator_of(dict(os.environ)) == "system"  # nothing else changes

    other = "/opt/profiler/libtrace.so"
    assert allocator.preload({"LD_PRELOAD": other})["LD_PRELOAD"] == f"{LIBRARY}:{other}"  # a user's preload stays

    monkeypatch.setenv(allocator.ALLOCATOR_ENV, "mimalloc")  # asked for by name: the same
    assert trainer_env(Distributed())["LD_PRELOAD"] == str(LIBRARY) and allocator.for_trainers() == "mimalloc"

    monkeypatch.setenv(allocator.ALLOCATOR_ENV, "system")
    assert "LD_PRELOAD" not in trainer_env(Distributed()) and allocator_of(trainer_env(Distributed())) == "system"
    assert allocator.for_trainers() == "system"


def test_an_unknown_allocator_is_refused_before_anything_is_stored(
    home: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(allocator.ALLOCATOR_ENV, "jemalloc")
    client = phitune.Client(home=home)
    with pytest.raises(SpecError, match="PHITUNE_ALLOCATOR: 'jemalloc' is not an allocator: use mimalloc or system"):
        client.finetune.create(model="tiny-phi3", training_file=chat_file, hyperparameters={"max_steps": 1})
    assert client.finetune.list() == [] and client.files.list() == []


def test_the_trainer_casts_weights_at_each_use() -> None:
    """No autocast cache: cached casts sit among each layer's freed activations until the forward ends."""
    import torch

    with _autocast("cpu", True):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()


@pytest.mark.skipif(LIBRARY is None, reason="cmeel-mimalloc is not installed (the 'local' extra brings it on Linux)")
def test_the_trainer_keeps_freed_memory_on_mimalloc_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``keep_freed_memory`` sets mimalloc's purge delay to -1 (never return freed memory) in the process it runs in;
    the option's index is checked against the environment variable mimalloc reads at start."""
    monkeypatch.delenv(allocator.ALLOCATOR_ENV, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    code = (
        "import ctypes; from phitune import _allocator as allocator\n"
        "def delay(): return ctypes.CDLL(allocator._mapped_mimalloc()).mi_option_get(allocator._PURGE_DELAY)\n"
        "before = delay(); kept = allocator.keep_freed_memory(); print(before, kept, delay())"
    )
    env = {**trainer_env(Distributed()), "MIMALLOC_PURGE_DELAY": "1234"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1234", "True", "-1"]
    assert allocator.keep_freed_memory() is False  # this process runs on the C library's malloc: nothing to set
