"""Workers and trainers killed (SIGKILL) at random points across several jobs, and a trainer killed while it builds
the fused kernels: every job finishes, with the losses of an uninterrupted run, and nothing is left behind."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import phitune
from conftest import Row

pytestmark = pytest.mark.reliability

FAST = {"batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128, "seed": 0}
BOUND = 1800.0
"""Seconds any job may take to finish, however often it is killed: past it, the job counts as stuck."""


def _processes(home: Path) -> dict[str, psutil.Process]:
    """The home's worker and the trainer it runs now (by role), where they are alive."""
    with contextlib.closing(sqlite3.connect(home / "phitune.db")) as db:
        row = db.execute("SELECT pid FROM worker").fetchone()
    found: dict[str, psutil.Process] = {}
    with contextlib.suppress(psutil.Error, TypeError):
        worker = psutil.Process(int(row[0]))
        if "phitune.local.worker" in worker.cmdline():
            found["worker"] = worker
            for child in worker.children():
                if "phitune.local.attempt" in child.cmdline():
                    found["trainer"] = child
    return found


def _losses(client: phitune.Client, job_id: str) -> dict[int, float]:
    """Each step's training loss, as the run of the highest attempt recorded it."""
    best: dict[int, tuple[int, float]] = {}
    for event in client.finetune.events(job_id):
        data = event.data or {}
        if event.type == "metrics" and "train_loss" in data:
            step, attempt = int(data["step"]), int(data["attempt"])
            if step not in best or attempt >= best[step][0]:
                best[step] = (attempt, float(data["train_loss"]))
    return {step: loss for step, (_, loss) in best.items()}


def _same_losses(got: dict[int, float], expected: dict[int, float]) -> bool:
    return got.keys() == expected.keys() and all(abs(got[s] - expected[s]) <= 1e-5 * abs(expected[s]) for s in got)


def test_jobs_survive_workers_and_trainers_killed_at_random_points(
    home: Path, chat_file: Path, ledger: Callable[[str], Row], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = int(os.environ.get("PHITUNE_CHAOS_SEED", "23"))
    chaos = random.Random(seed)
    monkeypatch.setenv("PHITUNE_MAX_RESTARTS", "20")  # the kills here are many; the bound itself is tested elsewhere
    kills = ledger(f"local jobs: workers and trainers killed at random points (seed {seed})")
    jobs_row = ledger("local jobs: finished with the uninterrupted losses")
    client = phitune.Client(home=home)
    options: dict[str, Any] = {
        "model": "tiny-phi3",
        "training_file": client.files.upload(chat_file).id,
        "hyperparameters": {**FAST, "max_steps": 12, "checkpoint_every": 3},
    }
    reference = client.finetune.wait(client.finetune.create(**options).id, timeout=BOUND, progress=False)
    assert reference.status == "succeeded", reference.error
    expected = _losses(client, reference.id)

    jobs = [client.finetune.create(**options).id for _ in range(3)]
    victims: list[tuple[str, str]] = []  # (job, role) of each kill
    deadline = time.monotonic() + BOUND
    while len(victims) < 8 and time.monotonic() < deadline:
        time.sleep(chaos.uniform(0.2, 4.0))
        running = [job for job in client.finetune.list(limit=10) if job.status == "running" and job.id in jobs]
        alive = _processes(home)
        role = chaos.choice(["worker", "trainer"])
        if not running or role not in alive:
            if all(client.finetune.get(job_id).done for job_id in jobs):
                break
            continue
        alive[role].kill()
        victims.append((running[0].id, role))
        kills.tried += 1

    finished = {job_id: None for job_id in jobs}
    while time.monotonic() < deadline and any(state is None for state in finished.values()):
        for job_id in finished:
            job = client.finetune.get(job_id)  # restarts a dead worker, as any client call does
            if job.done:
                finished[job_id] = job.status == "succeeded" and _same_losses(_losses(client, job_id), expected)
        time.sleep(0.2)

    for state in finished.values():
        jobs_row.tried += 1
        if state is None:
            jobs_row.stuck += 1
        elif state:
            jobs_row.survived += 1
        else:
            jobs_row.lost += 1
    for job_id, _ in victims:
        state = finished[job_id]
        kills.survived += state is True
        kills.stuck += state is None
        kills.lost += state is False
    _wait_until_no_process_of(home)
    assert kills.tried >= 3, f"only {kills.tried} kills landed while jobs ran"


def _wait_until_no_process_of(home: Path) -> None:
    """Bounded: the home's worker goes idle and exits ($PHITUNE_WORKER_IDLE_TIMEOUT); no trainer outlives it."""
    deadline = time.monotonic() + 600
    while _processes(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes(home) == {}, "a worker or trainer of the home is still running"


def test_a_trainer_killed_while_it_builds_the_kernels_holds_no_later_job_up(
    home: Path, chat_file: Path, tmp_path: Path, ledger: Callable[[str], Row], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 job on a CPU builds the fused kernels in its first attempt; the trainer is killed in the middle of the
    build. The restarted attempt builds them and trains: no lock is left for anyone to wait on."""
    from phitune.trainer import fused

    row = ledger("fused kernels: trainer killed during the build")
    extensions = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.setenv("PHITUNE_FUSED_KERNELS", "1")
    client = phitune.Client(home=home)
    hyperparameters = {**FAST, "max_steps": 2, "precision": "bf16"}
    job = client.finetune.create(model="tiny-phi3", training_file=chat_file, hyperparameters=hyperparameters)
    build_folder = extensions / fused.this_build().name
    deadline = time.monotonic() + BOUND
    while not list(build_folder.glob("build-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    trainer = _processes(home).get("trainer")
    assert trainer is not None, "no trainer was building the kernels"
    trainer.send_signal(signal.SIGKILL)
    row.tried += 1
    job = _wait_done(client, job.id)
    messages = [event.message for event in client.finetune.events(job.id)]
    if job.status != "succeeded":
        row.lost += 1
    elif not any(message.startswith("fused CPU kernels built in") for message in messages):
        row.lost += 1  # trained, but without the kernels
    else:
        row.survived += 1
    assert any("the trainer was killed by SIGKILL" in message for message in messages), messages
    row.leaked += len(list(extensions.rglob("lock")))  # a torch baton where a build could wait on it


def _wait_done(client: phitune.Client, job_id: str) -> phitune.FineTuneJob:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        job = client.finetune.get(job_id)
        if job.done:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {client.finetune.get(job_id).status} after {BOUND} s")
