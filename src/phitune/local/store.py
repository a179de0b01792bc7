"""The local backend's state: one SQLite database (WAL) plus content-addressed dataset files under a home folder.

Every write is a short transaction, so several processes (clients, the worker, the trainer, ``phitune serve``)
can share one home. State transitions are conditional updates: a job that was cancelled is never marked succeeded.
Paths in the database are relative to the home (rows of older homes are converted when the store opens), so a home
copied or moved elsewhere keeps working on its own files. A stored dataset enters the blob store by a rename in the
same write transaction as its row, and leaves it in the transaction that deletes its last row, so an upload and a
delete of one content never leave a row without its blob. Errors of the database itself are
:class:`~phitune.errors.StoreError` with what to do, and a database that is missing or empty beside the home's data
is never replaced by an empty one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConflictError, MissingContentError, NotFoundError, SpecError, StoreError
from ..types import (
    Checkpoint,
    Deployment,
    FileObject,
    FineTuneJob,
    JobError,
    JobEvent,
    JobSpec,
    ModelObject,
    fine_tuned_model_id,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    sha256 TEXT NOT NULL, blob TEXT NOT NULL, format TEXT, examples INTEGER, purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, status TEXT NOT NULL, spec TEXT NOT NULL,
    idempotency_key TEXT UNIQUE, fine_tuned_model TEXT, error TEXT, started_at INTEGER, finished_at INTEGER,
    trained_tokens INTEGER, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER, attempt INTEGER NOT NULL DEFAULT 0,
    heartbeat_at REAL, estimated_finish INTEGER, restarts INTEGER NOT NULL DEFAULT 0
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

SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of a current database: 1 keeps paths relative to the home and counts job restarts."""

BUSY_SECONDS = 60
"""How long a transaction waits for another process's write before the store gives up."""

_DATA_FOLDERS = ("files", "jobs", "models/fine-tuned")
"""What the database lists: a home with files in these folders has had a database."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    """SQLite-backed state of one phitune home folder."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home).expanduser().resolve()
        self.db_path = self.home / "phitune.db"
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"the phitune home {self.home} cannot be created: {exc.strerror or exc}") from exc
        self._refuse_a_lost_database()
        try:
            with contextlib.closing(sqlite3.connect(self.db_path, timeout=BUSY_SECONDS)) as db:
                db.execute("PRAGMA journal_mode=WAL")
                current = db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION
        except sqlite3.Error as exc:
            raise self._store_error(exc) from exc
        if not current:
            with self._tx(immediate=True) as db:
                if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:  # not migrated meanwhile
                    self._migrate(db)

    def _refuse_a_lost_database(self) -> None:
        """A missing or empty database beside data it listed is an error, never a fresh, empty home."""
        size = self.db_path.stat().st_size if self.db_path.exists() else None
        if size:
            return
        holding = [name for name in _DATA_FOLDERS if any(p.is_file() for p in (self.home / name).rglob("*"))]
        if holding:
            state = "missing" if size is None else "empty (0 bytes)"
            raise StoreError(
                f"{self.db_path} is {state}, but the home holds {', '.join(f'{name}/' for name in holding)}: the "
                "jobs, datasets and models they hold would vanish from view. Restore phitune.db from a backup; to "
                f"start this home afresh instead, first move {' and '.join(holding)} out of it"
            )

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring a database of any earlier version to :data:`SCHEMA_VERSION`, within the caller's transaction."""
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        if "restarts" not in {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}:
            db.execute("ALTER TABLE jobs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0")
        for row in db.execute("SELECT id, sha256, blob FROM files").fetchall():
            db.execute("UPDATE files SET blob=? WHERE id=?", (_blob_name(row["sha256"]), row["id"]))
        for row in db.execute("SELECT job_id, step, path FROM checkpoints").fetchall():
            relative = _from_marker(row["path"], f"jobs/{row['job_id']}/")
            db.execute(
                "UPDATE checkpoints SET path=? WHERE job_id=? AND step=?", (relative, row["job_id"], row["step"])
            )
        for row in db.execute("SELECT id, path FROM models WHERE path IS NOT NULL").fetchall():
            db.execute(
                "UPDATE models SET path=? WHERE id=?", (_from_marker(row["path"], "models/fine-tuned/"), row["id"])
            )
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ------------------------------------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.db_path, timeout=BUSY_SECONDS, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._store_error(exc) from exc
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000}")
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise self._store_error(exc) from exc
        finally:
            db.close()

    def _store_error(self, exc: sqlite3.Error) -> StoreError:
        """What a failure of the database means for the user, and what to do about it."""
        detail = str(exc)
        reason = detail.lower()
        if any(word in reason for word in ("readonly", "read-only", "unable to open", "permission")):
            return StoreError(
                f"{self.db_path} cannot be written ({detail}): make the home writable by this user, or use another "
                "home (Client(home=...), $PHITUNE_HOME)"
            )
        if any(word in reason for word in ("not a database", "malformed", "corrupt")):
            return StoreError(
                f"{self.db_path} is damaged ({detail}): restore it from a backup. The home's datasets, jobs and "
                "models stay on disk (files/, jobs/, models/), unlisted until the database is restored"
            )
        if "disk i/o" in reason or "full" in reason:
            return StoreError(f"{self.db_path} could not be written ({detail}): is the disk full? Free space, retry")
        if "locked" in reason or "busy" in reason:
            return StoreError(
                f"{self.db_path} stayed locked by another process for {BUSY_SECONDS} s ({detail}); retry later"
            )
        return StoreError(f"{self.db_path}: {detail}")

    def _stored(self, path: Path) -> str:
        """How the database keeps a path: relative to the home where it lies in the home."""
        absolute = path.expanduser().resolve()
        return str(absolute.relative_to(self.home)) if absolute.is_relative_to(self.home) else str(absolute)

    def _resolved(self, stored: str) -> Path:
        """A path as the database keeps it, on this machine (an absolute one stays as it is)."""
        return self.home / stored

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
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private folder under the home's ``tmp/`` for one upload on its way in, removed when done; one left by a
        process that died is removed by :meth:`sweep` (its ``.lock``, held while in use, is free then)."""
        tmp = self.home / "tmp"
        tmp.mkdir(exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=".new-", dir=tmp))
        lock = open(fresh / ".lock", "w")  # noqa: SIM115 - held until the folder is removed
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            folder = fresh.with_name("upload-" + fresh.name.removeprefix(".new-"))
            os.rename(fresh, folder)  # visible to sweep() only once locked
        except BaseException:
            lock.close()
            shutil.rmtree(fresh, ignore_errors=True)
            raise
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            lock.close()

    def is_staged(self, path: Path) -> bool:
        """Whether ``path`` lies in a staging folder of this home (a private copy the store may move)."""
        folder = path.resolve().parent
        return folder.parent == self.home / "tmp" and folder.name.startswith("upload-")

    def sweep(self) -> None:
        """Remove what uploads that died midway left: staging folders no live process holds, and blobs no file
        refers to (a blob enters the store in the write transaction that records it, so under the write lock an
        unrecorded blob is a leftover)."""
        for folder in (self.home / "tmp").glob("upload-*"):
            try:
                lock = open(folder / ".lock")  # noqa: SIM115 - closed below
            except OSError:
                continue
            with lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use
                shutil.rmtree(folder, ignore_errors=True)
        with self._tx(immediate=True) as db:
            known = {_blob_name(row["sha256"]) for row in db.execute("SELECT sha256 FROM files")}
            for blob in (self.home / "files").glob("*/*"):
                if str(blob.relative_to(self.home)) not in known:
                    blob.unlink(missing_ok=True)

    def add_file(self, source: Path, *, filename: str, fmt: str | None, examples: int, purpose: str) -> FileObject:
        """Store a validated dataset in the content-addressed blob store and record it. A staged copy
        (:meth:`staging`) is moved in; any other file is copied once, hashed on the way."""
        try:
            with contextlib.ExitStack() as stack:
                if self.is_staged(source):
                    staged, sha = source, _sha256(source)
                else:
                    staged = stack.enter_context(self.staging()) / "blob"
                    sha = _sha256(source, copy_to=staged)
                obj = FileObject(
                    id=new_id("file"),
                    bytes=staged.stat().st_size,
                    created_at=int(time.time()),
                    filename=filename,
                    purpose=purpose,
                    format=fmt,
                    examples=examples,
                    sha256=sha,
                )
                blob = self.home / _blob_name(sha)
                blob.parent.mkdir(parents=True, exist_ok=True)
                with self._tx(immediate=True) as db:
                    os.replace(staged, blob)
                    db.execute(
                        "INSERT INTO files VALUES (?,?,?,?,?,?,?,?,?)",
                        (obj.id, filename, obj.bytes, obj.created_at, sha, _blob_name(sha), fmt, examples, purpose),
                    )
        except OSError as exc:
            raise StoreError(f"{filename} could not be stored in {self.home}: {exc.strerror or exc}") from exc
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
        """The stored content of a file; :class:`~phitune.errors.MissingContentError` where it is gone."""
        row = self._file_row(file_id)
        blob = self._resolved(row["blob"])
        if not blob.is_file():
            fix = "upload the dataset again and use its new file id"
            raise MissingContentError("file", f"{file_id} ({row['filename']})", "the stored copy", fix)
        return blob

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
            if db.execute("SELECT 1 FROM files WHERE sha256=?", (row["sha256"],)).fetchone() is None:
                self._resolved(row["blob"]).unlink(missing_ok=True)  # in the transaction: no upload adds it now

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

    def running_jobs(self) -> list[str]:
        """The jobs marked running: under the worker lock, those a dead worker left."""
        with self._tx() as db:
            return [str(row["id"]) for row in db.execute("SELECT id FROM jobs WHERE status='running'").fetchall()]

    def restart_crashed(self, job_id: str, attempt: int | None, *, max_restarts: int, failure: JobError) -> int | None:
        """Put a running job whose trainer died back in the queue (it resumes from its last checkpoint), counting the
        restart; the restart past ``max_restarts`` fails it with ``failure`` instead. ``attempt`` None: whatever
        attempt ran. Returns the job's restarts so far (more than ``max_restarts``: it failed), or None where the job
        was no longer running that attempt."""
        with self._tx(immediate=True) as db:
            row = db.execute("SELECT status, attempt, restarts FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["status"] != "running" or attempt not in (None, row["attempt"]):
                return None
            restarts = int(row["restarts"]) + 1
            if restarts > max_restarts:
                db.execute(
                    "UPDATE jobs SET status='failed', restarts=?, error=?, finished_at=? WHERE id=?",
                    (restarts, failure.model_dump_json(), int(time.time()), job_id),
                )
            else:
                db.execute("UPDATE jobs SET status='queued', restarts=? WHERE id=?", (restarts, job_id))
        return restarts

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
        start = _event_seq(after) if after else 0
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
                (job_id, step, int(time.time()), json.dumps(metrics), self._stored(path)),
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
                location=str(self._resolved(r["path"])),
                fine_tuned_model_checkpoint=f"{fine_tuned_model_id(spec, job_id)}:ckpt-step-{r['step']}",
            )
            for r in rows
        ]

    # -------------------------------------------------------------------------------------------------- models
    def add_model(self, model: ModelObject) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO models VALUES (?,?,?,?,?,?)",
                (model.id, model.created, model.kind, model.base_model, model.job_id, self._stored_model_path(model)),
            )

    def find_model(self, model_id: str) -> ModelObject | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM models WHERE id=?", (model_id,)).fetchone()
        return None if row is None else self._model(row)

    def list_models(self) -> list[ModelObject]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM models ORDER BY created").fetchall()
        return [self._model(r) for r in rows]

    def _stored_model_path(self, model: ModelObject) -> str | None:
        return None if model.path is None else self._stored(Path(model.path))

    def _model(self, row: sqlite3.Row) -> ModelObject:
        stored = dict(row)
        if stored["path"] is not None:
            stored["path"] = str(self._resolved(stored["path"]))
        return ModelObject(**stored)

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


def _event_seq(event_id: str) -> int:
    """The sequence number of an event id (``ftevent-<seq>``), at most SQLite's largest integer."""
    number = event_id.rsplit("-", 1)[-1]
    if not (number.isascii() and number.isdigit()):
        raise SpecError("after", f"{event_id!r} is not an event id (ftevent-<number>)")
    return min(int(number), 2**63 - 1)


def _blob_name(sha256: str) -> str:
    """Where the blob store keeps a content, relative to the home."""
    return f"files/{sha256[:2]}/{sha256}.jsonl"


def _from_marker(path: str, marker: str) -> str:
    """A path as the home's own: an absolute one from its last ``/<marker>`` on (where a home copied or moved
    elsewhere keeps its own copy); other paths as they are."""
    index = path.rfind("/" + marker)
    return path[index + 1 :] if os.path.isabs(path) and index >= 0 else path


def _sha256(source: Path, copy_to: Path | None = None) -> str:
    """The SHA-256 of ``source``'s content, read once, written to the new file ``copy_to`` on the way if given."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(copy_to, "xb") if copy_to else contextlib.nullcontext() as writer:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            if writer is not None:
                writer.write(chunk)
    return digest.hexdigest()
