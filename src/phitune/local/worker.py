"""The local worker: one process per home folder that runs queued jobs, one at a time, each in a trainer subprocess.

Started on demand and detached by the client (``ensure_worker``), or by hand with ``phitune worker --home DIR``.
An exclusive ``flock`` on ``worker.lock`` makes it a singleton; the kernel releases the lock when the process dies,
even by ``kill -9``, so the next client call starts a new worker, which puts the orphaned job back in the queue: it
resumes from its last checkpoint. The trainer subprocess dies with its worker (``PR_SET_PDEATHSIG``) and checks its
attempt number every step, so a superseded trainer never writes over a newer one. A distributed job's trainer is
torchrun, whose ranks set the same death signal on themselves: a dead worker takes the launcher and every rank along.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .._process import die_with_parent
from ..errors import PhituneError
from ..trainer import allocator
from ..types import Distributed, JobError
from .store import Store

HEARTBEAT_SECONDS = 1.0
CANCEL_GRACE_SECONDS = 15.0


@contextlib.contextmanager
def _worker_lock(home: Path) -> Iterator[bool]:
    """Yield True while holding the home's worker lock, False if another process holds it."""
    with open(home / "worker.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def worker_alive(home: Path) -> bool:
    """True if a worker process holds this home's lock."""
    with _worker_lock(home) as acquired:
        return not acquired


def ensure_worker(home: Path) -> None:
    """Start a detached worker for ``home`` unless one is running."""
    if worker_alive(home):
        return
    log = home / "logs" / "worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "phitune.local.worker", "--home", str(home)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def trainer_command(job_id: str, attempt: int, home: Path, layout: Distributed) -> list[str]:
    """The command line that trains one attempt of a job: the trainer module, under torchrun for a distributed job
    (``--standalone``: a local rendezvous on a free port chosen by torchrun itself, so concurrent jobs never clash)."""
    trainer = ["-m", "phitune.trainer.run", "--home", str(home), "--job", job_id, "--attempt", str(attempt)]
    if layout.strategy == "none":
        return [sys.executable, *trainer]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(layout.nproc)]
    return [sys.executable, *launcher, *trainer]


def trainer_env(layout: Distributed) -> dict[str, str]:
    """The trainer's environment: the allocator of :mod:`phitune.trainer.allocator` preloaded, and the ranks of a
    distributed job sharing this machine's cores (torchrun would give each rank one thread) unless
    ``OMP_NUM_THREADS`` is set."""
    env = allocator.preload(dict(os.environ))
    if layout.strategy != "none" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // layout.nproc))
    return env


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_job(store: Store, job_id: str, attempt: int) -> None:
    """Run one attempt of a job in a trainer subprocess; record failure if it dies without finishing."""
    log_path = store.job_dir(job_id) / "train.log"
    spec = store.get_job(job_id).spec
    assert spec is not None
    log: IO[bytes]
    try:
        env = trainer_env(spec.distributed)
    except PhituneError as exc:  # this worker's environment (set by the client that started it) asks the impossible
        store.transition(job_id, "failed", when=("running",), error=JobError(code="invalid_setting", message=str(exc)))
        return
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            trainer_command(job_id, attempt, store.home, spec.distributed),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        stop_sent_at: float | None = None
        while proc.poll() is None:
            store.worker_heartbeat(os.getpid())
            status, current = store.job_attempt(job_id)
            if (status not in ("running",) or current != attempt) and stop_sent_at is None:
                stop_sent_at = time.monotonic()  # the trainer stops by itself at its next step; this is the backstop
            if stop_sent_at is not None and time.monotonic() - stop_sent_at > CANCEL_GRACE_SECONDS:
                proc.kill()
            time.sleep(HEARTBEAT_SECONDS / 4)
    if proc.returncode != 0:
        tail = _log_tail(log_path)
        message = f"trainer exited with code {proc.returncode}; last lines of {log_path}:\n{tail}"
        if store.transition(
            job_id, "failed", when=("running",), error=JobError(code="trainer_error", message=message[-4000:])
        ):
            store.add_event(job_id, message[-4000:], level="error")


def run_worker(home: Path, *, idle_timeout: float) -> int:
    """Serve the home's queue until idle for ``idle_timeout`` seconds. Returns 0 (also when another worker runs)."""
    with _worker_lock(home) as acquired:
        if not acquired:
            return 0
        store = Store(home)
        for job_id in store.requeue_orphans():
            store.add_event(job_id, "worker restarted: the job resumes from its last checkpoint", level="warn")
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < idle_timeout:
            store.worker_heartbeat(os.getpid())
            claimed = store.claim_next_job()
            if claimed is None:
                time.sleep(HEARTBEAT_SECONDS / 2)
                continue
            job, attempt = claimed
            run_job(store, job.id, attempt)
            idle_since = time.monotonic()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phitune worker", description="Run queued local fine-tuning jobs.")
    parser.add_argument("--home", required=True)
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=float(os.environ.get("PHITUNE_WORKER_IDLE_TIMEOUT", "300")),
        help="exit after this many idle seconds (default 300, or $PHITUNE_WORKER_IDLE_TIMEOUT)",
    )
    args = parser.parse_args(argv)
    return run_worker(Path(args.home).expanduser().resolve(), idle_timeout=args.idle_timeout)


if __name__ == "__main__":
    sys.exit(main())
