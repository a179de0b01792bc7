from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import phitune
from phitune.types import JobSpec

if TYPE_CHECKING:
    from phitune.export import ExportSource

SOURCE = str(Path(phitune.__file__).parents[1])
"""The folder this checkout's phitune is imported from, for the child processes tests start."""

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


def train_tiny_adapter(work: Path, name: str, bases: Path) -> ExportSource:
    """A LoRA fine-tune of the built-in tiny model ``name`` (its base built under ``bases``), trained in this process
    for 3 steps in ``work``: an export source named ``<name>:ft``."""
    from phitune.export import ExportSource
    from phitune.tiny import ensure_tiny
    from phitune.trainer import loop
    from recording_control import RecordingControl

    base = ensure_tiny(bases, name)
    (work / "checkpoints").mkdir(parents=True)
    spec = JobSpec(
        model=name,
        training_file="train.jsonl",
        method={"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        hyperparameters={"max_steps": 3, "batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128},
    )
    run = loop.TrainRun(
        spec=spec,
        base_path=str(base),
        train_path=write_chat(work / "train.jsonl"),
        valid_path=None,
        output_dir=work / "adapter",
        checkpoint_dir=work / "checkpoints",
    )
    assert loop.train(run, RecordingControl()).status == "succeeded"
    return ExportSource(f"{name}:ft", name, str(base), str(work / "adapter"))


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
    from phitune.tiny import ensure_tiny_phi3

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


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout's phitune first on its path, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")]), **extra}


@contextlib.contextmanager
def running(app: Any, **options: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free loopback port in a background thread (``options`` go to
    ``uvicorn.Config``); yields the /v1 base URL."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **{"log_level": "warning", **options}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ---------------------------------------------------------------------- the fault and abuse suite's ledger
@dataclass
class Row:
    """One line of the reliability ledger (tests/reliability): of ``tried`` attempts at breaking something, how many
    it ``survived``, and how many ``lost`` data or answered wrong, left something ``stuck`` (a job that never ends, a
    hung call) or ``leaked`` (a path in an answer, a file or process left behind)."""

    area: str
    tried: int = 0
    survived: int = 0
    lost: int = 0
    stuck: int = 0
    leaked: int = 0

    def check(self) -> None:
        assert self.tried > 0, f"{self.area}: nothing was tried"
        assert (self.lost, self.stuck, self.leaked) == (0, 0, 0), self
        assert self.survived == self.tried, self


_LEDGER: list[Row] = []


@pytest.fixture
def ledger() -> Iterator[Callable[[str], Row]]:
    """Open rows of the ledger (``row = ledger("area")``); every row is checked when the test ends, and all of them
    are printed at the end of the session."""
    opened: list[Row] = []

    def open_row(area: str) -> Row:
        row = Row(area)
        opened.append(row)
        _LEDGER.append(row)
        return row

    yield open_row
    for row in opened:
        row.check()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _LEDGER:
        return
    terminalreporter.section("reliability: tried / survived / lost / stuck / leaked")
    width = max(len(row.area) for row in _LEDGER)
    for row in _LEDGER:
        terminalreporter.write_line(
            f"{row.area:<{width}}  {row.tried:>6} tried  {row.survived:>6} survived  {row.lost:>3} lost  "
            f"{row.stuck:>3} stuck  {row.leaked:>3} leaked"
        )
