from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CHAT_EXAMPLES = [
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("What color is the sky?", "Blue."),
    ("What do bees make?", "Honey."),
    ("What is two plus two?", "Four."),
    ("What is frozen water called?", "Ice."),
    ("Which planet is red?", "Mars."),
    ("How many days are in a week?", "Seven."),
]


def write_chat(path: Path, pairs: list[tuple[str, str]] = CHAT_EXAMPLES) -> Path:
    with open(path, "w") as fh:
        for question, answer in pairs:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


LONG_PROMPT = " ".join(["Tell me, in every detail you can recall, what happened on that long day."] * 12)
"""A question whose answer starts far beyond ``max_seq_length=64`` (and well within tiny-phi3's 2048-token context)."""


def write_chat_with_long_prompts(path: Path) -> Path:
    """Ten chat examples; those on lines 3 and 7 keep no token with loss within ``max_seq_length=64``."""
    pairs = [*CHAT_EXAMPLES[:2], (LONG_PROMPT, "Yes."), *CHAT_EXAMPLES[2:5], (LONG_PROMPT, "No."), *CHAT_EXAMPLES[5:]]
    return write_chat(path, pairs)


def rename_at_once(
    monkeypatch: pytest.MonkeyPatch, threads: int, task: Callable[[], Any]
) -> tuple[list[Any], list[BaseException]]:
    """Run ``task`` in ``threads`` threads, every ``os.replace`` waiting until each thread has reached its own: the
    worst interleaving of their renames. Returns the tasks' results and errors."""
    everyone = threading.Barrier(threads, timeout=1800)  # a slow machine's tasks may take minutes
    rename = os.replace

    def rename_together(source: Any, target: Any) -> None:
        everyone.wait()
        rename(source, target)

    monkeypatch.setattr(os, "replace", rename_together)
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(task())
        except BaseException as exc:  # pragma: no cover - the caller asserts there are none
            errors.append(exc)

    running = [threading.Thread(target=run) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return results, errors


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-phi3 built once per test session."""
    from phitune.trainer.tiny import ensure_tiny_phi3

    return ensure_tiny_phi3(tmp_path_factory.mktemp("tiny-cache"))


def tiny_home(folder: Path, tiny_model: Path, env: pytest.MonkeyPatch) -> Path:
    """Make ``folder`` a phitune home holding tiny-phi3, whose workers exit soon after going idle (set in ``env``)."""
    env.setenv("PHITUNE_WORKER_IDLE_TIMEOUT", "4")
    env.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(tiny_model, folder / "models" / "base" / "tiny-phi3")
    return folder


@pytest.fixture
def home(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh phitune home with tiny-phi3 already built; workers started from it exit soon after going idle."""
    return tiny_home(tmp_path / "home", tiny_model_dir, monkeypatch)


@pytest.fixture(scope="module")
def server_home(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Path]:
    """Like ``home``, shared by the tests of one module (a server's)."""
    with pytest.MonkeyPatch.context() as env:
        yield tiny_home(tmp_path_factory.mktemp("serve") / "home", tiny_model_dir, env)


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_chat(tmp_path / "train.jsonl")
