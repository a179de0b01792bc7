"""The local worker: one process per home folder that runs queued jobs, one at a time, each in a trainer subprocess.

Started on demand and detached by the client (``ensure_worker``), or by hand with ``phitune worker --home DIR``.
An exclusive ``flock`` on ``worker.lock`` makes it a singleton; the kernel releases the lock when the process dies,
even by ``kill -9``, so the next client call (``get``, ``list``, ``wait``, ``create``) finds the lock free, puts the
orphaned job back in the queue and starts a new worker: the job resumes from its last checkpoint. A trainer that
dies alone (killed, out of memory, a crash of native code) is restarted the same way by its worker; a trainer that
fails with an error of its own records it and the job fails. Either restart counts, and the one past
``$PHITUNE_MAX_RESTARTS`` (default 3) fails the job with the reason instead; the job's events say each restart.
The trainer subprocess dies with its worker (``PR_SET_PDEATHSIG``) and checks its attempt number every step, so a
superseded trainer never writes over a newer one. A distributed job's trainer is torchrun, whose ranks set the same
death signal on themselves: a dead worker takes the launcher and every rank along. No child process gets the
server's API key (:func:`phitune._process.child_environment`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .. import _allocator as allocator
from .._process import child_environment, die_with_parent
from ..errors import PhituneError, scrub_paths
from ..types import Distributed, JobError
from .store import Store

HEARTBEAT_SECONDS = 1.0
CANCEL_GRACE_SECONDS = 15.0
MAX_RESTARTS_ENV = "PHITUNE_MAX_RESTARTS"
DEFAULT_MAX_RESTARTS = 3
WORKER_STOPPED = "worker restarted: the previous one stopped while running the job"


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


def ensure_worker(store: Store) -> None:
    """Start a detached worker for the store's home unless one is running; first, under the worker lock, the jobs a
    dead worker left running go back in the queue, so that every listing shows them queued at once."""
    home = store.home
    with _worker_lock(home) as acquired:
        if not acquired:
            return
        recover_orphans(store)
    log = home / "logs" / "worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "phitune.local.worker", "--home", str(home)],
            env=child_environment(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def trainer_command(job_id: str, attempt: int, home: Path, layout: Distributed) -> list[str]:
    """The command line that trains one attempt of a job: the trainer module, under torchrun for a distributed job
    (``--standalone``: a local rendezvous on a free port chosen by torchrun itself, so concurrent jobs never clash)."""
    trainer = ["-m", "phitune.local.attempt", "--home", str(home), "--job", job_id, "--attempt", str(attempt)]
    if layout.strategy == "none":
        return [sys.executable, *trainer]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(layout.nproc)]
    return [sys.executable, *launcher, *trainer]


def trainer_env(layout: Distributed) -> dict[str, str]:
    """The trainer's environment: the allocator of :mod:`phitune._allocator` preloaded, and the ranks of a
    distributed job sharing this machine's cores (torchrun would give each rank one thread) unless
    ``OMP_NUM_THREADS`` is set."""
    env = allocator.preload(child_environment())
    if layout.strategy != "none" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // layout.nproc))
    return env


def max_restarts() -> int:
    """How many times a job's trainer may be restarted after dying: ``$PHITUNE_MAX_RESTARTS``, default 3."""
    value = os.environ.get(MAX_RESTARTS_ENV, "")
    return int(value) if value.isdigit() else DEFAULT_MAX_RESTARTS


def recover_orphans(store: Store) -> None:
    """Under the worker lock: the jobs marked running have lost their worker; each resumes from its last checkpoint
    (a restart)."""
    for job_id in store.running_jobs():
        restart(store, job_id, None, WORKER_STOPPED)


def restart(store: Store, job_id: str, attempt: int | None, reason: str, log_tail: str = "") -> None:
    """Queue a job whose trainer died again, saying from which checkpoint it resumes; past :func:`max_restarts`,
    fail it with ``reason`` and the scrubbed ``log_tail`` (the trainer's last words)."""
    limit = max_restarts()
    message = f"{reason}, after {limit} restart{'' if limit == 1 else 's'}: the job stops here"
    if log_tail:
        message += f"; the last lines of its log (train.log in the job's folder):\n{log_tail}"
    restarts = store.restart_crashed(
        job_id, attempt, max_restarts=limit, failure=JobError(code="trainer_crashed", message=message)
    )
    if restarts is None:  # the trainer recorded how it ended, or the job was cancelled or paused meanwhile
        return
    if restarts > limit:
        store.add_event(job_id, f"job failed: {message}", level="error", data={"restarts": limit})
        return
    kept = [checkpoint.step_number for checkpoint in store.list_checkpoints(job_id)]
    whence = f"it resumes from its checkpoint at step {max(kept)}" if kept else "no checkpoint yet: it starts over"
    store.add_event(
        job_id,
        f"{reason}; {whence} (restart {restarts} of at most {limit})",
        level="warn",
        data={"restart": restarts, "max_restarts": limit, "step": max(kept, default=0)},
    )


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log, without any path of this machine."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return scrub_paths("\n".join(text.splitlines()[-lines:]))


def run_job(store: Store, job_id: str, attempt: int) -> None:
    """Run one attempt of a job in a trainer subprocess; restart the job if the trainer dies without recording how
    it ended (:func:`restart`)."""
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
        restart(store, job_id, attempt, f"the trainer {_exit_description(proc.returncode)}", _log_tail(log_path, 8))


def run_worker(home: Path, *, idle_timeout: float) -> int:
    """Serve the home's queue until idle for ``idle_timeout`` seconds. Returns 0 (also when another worker runs)."""
    with _worker_lock(home) as acquired:
        if not acquired:
            return 0
        store = Store(home)
        store.sweep()
        recover_orphans(store)
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
