"""The local backend's state: one SQLite database (WAL) plus content-addressed dataset files under a home folder.

Every write is a short transaction, so several processes (clients, the worker, the trainer, ``phitune serve``)
can share one home. State transitions are conditional updates: a job that was cancelled is never marked succeeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConflictError, NotFoundError
from ..types import Checkpoint, Deployment, FileObject, FineTuneJob, JobError, JobEvent, JobSpec, ModelObject

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    sha256 TEXT NOT NULL, blob TEXT NOT NULL, format TEXT, examples INTEGER, purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, status TEXT NOT NULL, spec TEXT NOT NULL,
    idempotency_key TEXT UNIQUE, fine_tuned_model TEXT, error TEXT, started_at INTEGER, finished_at INTEGER,
    trained_tokens INTEGER, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER, attempt INTEGER NOT NULL DEFAULT 0,
    heartbeat_at REAL, estimated_finish INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL,
    type TEXT NOT NULL, message TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, created_at INTEGER NOT NULL, metrics TEXT NOT NULL,
    path TEXT NOT NULL, PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, created INTEGER NOT NULL, kind TEXT NOT NULL, base_model TEXT, job_id TEXT, path TEXT
);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY, model TEXT NOT NULL, created_at INTEGER NOT NULL, engine TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS worker (id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER, heartbeat_at REAL);
"""

ACTIVE_STATUSES = ("validating_files", "queued", "running", "paused")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    """SQLite-backed state of one phitune home folder."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home).expanduser().resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "phitune.db"
        db = sqlite3.connect(self.db_path, timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        finally:
            db.close()

    # ------------------------------------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=60000")
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def path(self, *parts: str) -> Path:
        """A path under the home folder (folders created)."""
        target = self.home.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def job_dir(self, job_id: str) -> Path:
        folder = self.home / "jobs" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # --------------------------------------------------------------------------------------------------- files
    def add_file(self, source: Path, *, filename: str, fmt: str | None, examples: int, purpose: str) -> FileObject:
        """Copy a validated dataset into the content-addressed blob store and record it."""
        digest = hashlib.sha256()
        with open(source, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        sha = digest.hexdigest()
        blob = self.path("files", sha[:2], f"{sha}.jsonl")
        if not blob.exists():  # a copy of this thread's own, then an atomic rename: uploads of one content may race
            tmp = blob.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, blob)
        obj = FileObject(
            id=new_id("file"),
            bytes=blob.stat().st_size,
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
            format=fmt,
            examples=examples,
            sha256=sha,
        )
        with self._tx() as db:
            db.execute(
                "INSERT INTO files VALUES (?,?,?,?,?,?,?,?,?)",
                (obj.id, obj.filename, obj.bytes, obj.created_at, sha, str(blob), fmt, examples, purpose),
            )
        return obj

    @staticmethod
    def _file(row: sqlite3.Row) -> FileObject:
        return FileObject(
            id=row["id"],
            bytes=row["bytes"],
            created_at=row["created_at"],
            filename=row["filename"],
            purpose=row["purpose"],
            format=row["format"],
            examples=row["examples"],
            sha256=row["sha256"],
        )

    def get_file(self, file_id: str) -> FileObject:
        return self._file(self._file_row(file_id))

    def _file_row(self, file_id: str) -> sqlite3.Row:
        with self._tx() as db:
            row = db.execute("SELECT * FROM files WHERE id=?", (file_id,)).fetchone()
        if row is None:
            raise NotFoundError("file", file_id)
        return row  # type: ignore[no-any-return]

    def file_blob(self, file_id: str) -> Path:
        """The stored content of a file."""
        return Path(self._file_row(file_id)["blob"])

    def file_label(self, file_id: str) -> str:
        """How messages name a stored file: its id and original filename, never its place in the store."""
        return f"{file_id} ({self._file_row(file_id)['filename']})"

    def list_files(self) -> list[FileObject]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM files ORDER BY created_at DESC, rowid DESC").fetchall()
        return [self._file(r) for r in rows]

    def delete_file(self, file_id: str) -> None:
        with self._tx(immediate=True) as db:
            row = db.execute("SELECT blob, sha256 FROM files WHERE id=?", (file_id,)).fetchone()
            if row is None:
                raise NotFoundError("file", file_id)
            for job in db.execute(
                f"SELECT id, spec FROM jobs WHERE status IN ({','.join('?' * len(ACTIVE_STATUSES))})",
                ACTIVE_STATUSES,
            ):
                spec = json.loads(job["spec"])
                if file_id in (spec.get("training_file"), spec.get("validation_file")):
                    raise ConflictError(f"file {file_id} is used by active job {job['id']}")
            db.execute("DELETE FROM files WHERE id=?", (file_id,))
            shared = db.execute("SELECT 1 FROM files WHERE sha256=?", (row["sha256"],)).fetchone()
        if shared is None:
            Path(row["blob"]).unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------------------- jobs
    def create_job(self, spec: JobSpec, *, idempotency_key: str) -> tuple[FineTuneJob, bool]:
        """Insert a queued job; a repeated idempotency key returns the first job. Returns (job, created)."""
        with self._tx(immediate=True) as db:
            row = db.execute("SELECT id FROM jobs WHERE idempotency_key=?", (idempotency_key,)).fetchone()
            if row is not None:
                job_id, created = str(row["id"]), False
            else:
                job_id, created = new_id("ftjob"), True
                db.execute(
                    "INSERT INTO jobs (id, created_at, status, spec, idempotency_key) VALUES (?,?,?,?,?)",
                    (job_id, int(time.time()), "queued", spec.model_dump_json(), idempotency_key),
                )
        return self.get_job(job_id), created

    @staticmethod
    def _job(row: sqlite3.Row) -> FineTuneJob:
        spec = JobSpec.model_validate_json(row["spec"])
        error = JobError.model_validate_json(row["error"]) if row["error"] else None
        return FineTuneJob(
            id=row["id"],
            created_at=row["created_at"],
            status=row["status"],
            model=spec.model,
            training_file=spec.training_file,
            validation_file=spec.validation_file,
            fine_tuned_model=row["fine_tuned_model"],
            finished_at=row["finished_at"],
            started_at=row["started_at"],
            error=error,
            trained_tokens=row["trained_tokens"],
            seed=spec.hyperparameters.seed,
            suffix=spec.suffix,
            estimated_finish=row["estimated_finish"],
            backend="local",
            spec=spec,
            step=row["step"],
            total_steps=row["total_steps"],
        )

    def get_job(self, job_id: str) -> FineTuneJob:
        return self._job(self._job_row(job_id))

    def _job_row(self, job_id: str) -> sqlite3.Row:
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError("fine-tuning job", job_id)
        return row  # type: ignore[no-any-return]

    def job_attempt(self, job_id: str) -> tuple[str, int]:
        """(status, attempt) of a job: the trainer reads this every step to stop when cancelled or superseded."""
        row = self._job_row(job_id)
        return str(row["status"]), int(row["attempt"])

    def list_jobs(self, *, limit: int = 20, after: str | None = None) -> list[FineTuneJob]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        with self._tx() as db:
            if after is None:
                rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))
            else:
                anchor = db.execute("SELECT rowid, created_at FROM jobs WHERE id=?", (after,)).fetchone()
                if anchor is None:
                    raise NotFoundError("fine-tuning job", after)
                rows = db.execute(
                    "SELECT * FROM jobs WHERE (created_at, rowid) < (?, ?) ORDER BY created_at DESC, rowid DESC "
                    "LIMIT ?",
                    (anchor["created_at"], anchor["rowid"], limit),
                )
            return [self._job(r) for r in rows.fetchall()]

    def has_active_jobs(self) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT 1 FROM jobs WHERE status IN ('queued', 'running') LIMIT 1").fetchone()
        return row is not None

    def transition(self, job_id: str, to: str, *, when: tuple[str, ...], **fields: Any) -> bool:
        """Set a job's status to ``to`` only if its status is one of ``when``; also set ``fields``. True if done."""
        fields["status"] = to
        if to in ("succeeded", "failed", "cancelled"):
            fields.setdefault("finished_at", int(time.time()))
        if isinstance(fields.get("error"), JobError):
            fields["error"] = fields["error"].model_dump_json()
        assignments = ", ".join(f"{k}=?" for k in fields)
        with self._tx(immediate=True) as db:
            cur = db.execute(
                f"UPDATE jobs SET {assignments} WHERE id=? AND status IN ({','.join('?' * len(when))})",
                (*fields.values(), job_id, *when),
            )
            return cur.rowcount == 1

    def update_progress(self, job_id: str, attempt: int, **fields: Any) -> None:
        """Record progress (step, heartbeat, ...) of the given attempt; a superseded attempt writes nothing."""
        assignments = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id=? AND attempt=?", (*fields.values(), job_id, attempt))

    def claim_next_job(self) -> tuple[FineTuneJob, int] | None:
        """Mark the oldest queued job running under a new attempt number and return it."""
        with self._tx(immediate=True) as db:
            row = db.execute("SELECT id FROM jobs WHERE status='queued' ORDER BY created_at, rowid LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status='running', attempt=attempt+1, heartbeat_at=?, "
                "started_at=COALESCE(started_at, ?) WHERE id=?",
                (time.time(), int(time.time()), row["id"]),
            )
            attempt = db.execute("SELECT attempt FROM jobs WHERE id=?", (row["id"],)).fetchone()["attempt"]
        return self.get_job(row["id"]), int(attempt)

    def requeue_orphans(self) -> list[str]:
        """Put jobs left 'running' by a dead worker back in the queue (they resume from their last checkpoint)."""
        with self._tx(immediate=True) as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status='running'").fetchall()]
            db.execute("UPDATE jobs SET status='queued' WHERE status='running'")
        return ids

    # -------------------------------------------------------------------------------------------------- events
    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (job_id, created_at, level, type, message, data) VALUES (?,?,?,?,?,?)",
                (job_id, int(time.time()), level, type, message, json.dumps(data) if data is not None else None),
            )

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> list[JobEvent]:
        """Oldest first. Event ids are ``ftevent-<seq>``; ``after`` continues from one."""
        self._job_row(job_id)
        start = int(after.rsplit("-", 1)[-1]) if after else 0
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM events WHERE job_id=? AND seq>? ORDER BY seq LIMIT ?", (job_id, start, limit)
            ).fetchall()
        return [
            JobEvent(
                id=f"ftevent-{r['seq']}",
                created_at=r["created_at"],
                level=r["level"],
                type=r["type"],
                message=r["message"],
                data=json.loads(r["data"]) if r["data"] else None,
            )
            for r in rows
        ]

    # --------------------------------------------------------------------------------------------- checkpoints
    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, float], path: Path) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?)",
                (job_id, step, int(time.time()), json.dumps(metrics), str(path)),
            )

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """Newest first (OpenAI order)."""
        row = self._job_row(job_id)
        with self._tx() as db:
            rows = db.execute("SELECT * FROM checkpoints WHERE job_id=? ORDER BY step DESC", (job_id,)).fetchall()
        spec = JobSpec.model_validate_json(row["spec"])
        return [
            Checkpoint(
                id=f"ftckpt-{job_id.split('-', 1)[-1]}-{r['step']}",
                created_at=r["created_at"],
                fine_tuning_job_id=job_id,
                step_number=r["step"],
                metrics=json.loads(r["metrics"]),
                location=r["path"],
                fine_tuned_model_checkpoint=f"{fine_tuned_model_id(spec, job_id)}:ckpt-step-{r['step']}",
            )
            for r in rows
        ]

    # -------------------------------------------------------------------------------------------------- models
    def add_model(self, model: ModelObject) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO models VALUES (?,?,?,?,?,?)",
                (model.id, model.created, model.kind, model.base_model, model.job_id, model.path),
            )

    def find_model(self, model_id: str) -> ModelObject | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM models WHERE id=?", (model_id,)).fetchone()
        return None if row is None else ModelObject(**dict(row))

    def list_models(self) -> list[ModelObject]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM models ORDER BY created").fetchall()
        return [ModelObject(**dict(r)) for r in rows]

    # --------------------------------------------------------------------------------------------- deployments
    def add_deployment(self, name: str, model: str, engine: str) -> Deployment:
        with self._tx(immediate=True) as db:
            if db.execute("SELECT 1 FROM deployments WHERE name=?", (name,)).fetchone() is not None:
                raise ConflictError(f"a deployment named {name!r} already exists")
            db.execute("INSERT INTO deployments VALUES (?,?,?,?)", (name, model, int(time.time()), engine))
        return self.get_deployment(name)

    def get_deployment(self, name: str) -> Deployment:
        with self._tx() as db:
            row = db.execute("SELECT * FROM deployments WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFoundError("deployment", name)
        return Deployment(**dict(row))

    def list_deployments(self) -> list[Deployment]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM deployments ORDER BY created_at").fetchall()
        return [Deployment(**dict(r)) for r in rows]

    def delete_deployment(self, name: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM deployments WHERE name=?", (name,)).rowcount == 0:
                raise NotFoundError("deployment", name)

    # -------------------------------------------------------------------------------------------------- worker
    def worker_heartbeat(self, pid: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO worker VALUES (1, ?, ?)", (pid, time.time()))


def fine_tuned_model_id(spec: JobSpec, job_id: str) -> str:
    """``ft:<base>:<suffix>:<short job id>`` (the OpenAI shape)."""
    base = Path(spec.model.rstrip("/")).name
    return f"ft:{base}:{spec.suffix or ''}:{job_id.split('-', 1)[-1][:8]}"
