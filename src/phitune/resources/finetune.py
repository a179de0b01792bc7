from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import catalog
from .. import estimate as _estimate
from .._specs import build_spec
from ..backends.base import PausingBackend
from ..errors import PhituneError, SpecError, UnsupportedOptionError, WaitTimeoutError
from ..types import (
    AzureCompute,
    Checkpoint,
    Distributed,
    FineTuneJob,
    Hyperparameters,
    Integration,
    JobEvent,
    JobSpec,
    Method,
    Task,
)
from ._base import Resource


def model_argument(model: str) -> str:
    """A model folder given relative to the working directory, as an absolute path (the worker and trainer have
    other working directories, and read a relative name as a Hugging Face id); anything else as it is."""
    folder = Path(model).expanduser()
    if catalog.find(model) is None and not folder.is_absolute() and folder.is_dir():
        return str(folder.resolve())
    return model


class FineTuning(Resource):
    """Fine-tuning jobs, with the same shapes on every backend."""

    def create(
        self,
        *,
        model: str,
        training_file: str | os.PathLike[str],
        validation_file: str | os.PathLike[str] | None = None,
        method: str | Method = "lora",
        hyperparameters: Hyperparameters | Mapping[str, Any] | None = None,
        distributed: Distributed | Mapping[str, Any] | None = None,
        suffix: str | None = None,
        task: Task | None = None,
        compute: AzureCompute | Mapping[str, Any] | None = None,
        integrations: Sequence[Integration | Mapping[str, Any]] | None = None,
        idempotency_key: str | None = None,
    ) -> FineTuneJob:
        """Submit a job and return it at once (``queued``). Files may be ids or local paths (uploaded first).

        Every option is checked before the job is created: invalid values and options the backend cannot honour
        raise :class:`~phitune.errors.SpecError` naming the field, a local job that cannot fit the machine
        :class:`~phitune.errors.WontFitError`, a local job whose base cannot be loaded a ``SpecError`` on ``model``
        and one whose examples cannot train :class:`~phitune.errors.DatasetError` with the lines and the fixes;
        files this call uploaded are then deleted again. A retried call with
        the same ``idempotency_key`` returns the first job instead of starting a second one. ``integrations``
        (``[phitune.MLflow(...), phitune.TensorBoard(...)]``) log the job to experiment trackers where it trains.
        """
        uploaded: builtins.list[str] = []
        try:
            spec = build_spec(
                model=model_argument(model),
                training_file=self._file_id(training_file, model, uploaded),
                validation_file=self._file_id(validation_file, model, uploaded),
                method=method,
                hyperparameters=hyperparameters,
                distributed=distributed,
                suffix=suffix,
                task=task,
                compute=compute,
                integrations=integrations,
            )
            self._backend.check_spec(spec)
        except PhituneError:
            for file_id in uploaded:
                with contextlib.suppress(PhituneError):
                    self._client.files.delete(file_id)
            raise
        return self._backend.create_job(spec, idempotency_key=idempotency_key or uuid.uuid4().hex)

    def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> FineTuneJob:
        """Submit a ready :class:`JobSpec`."""
        self._backend.check_spec(spec)
        return self._backend.create_job(spec, idempotency_key=idempotency_key or uuid.uuid4().hex)

    def estimate(
        self,
        spec: JobSpec | None = None,
        *,
        model: str | None = None,
        training_file: str | os.PathLike[str] | None = None,
        validation_file: str | os.PathLike[str] | None = None,
        method: str | Method = "lora",
        hyperparameters: Hyperparameters | Mapping[str, Any] | None = None,
        distributed: Distributed | Mapping[str, Any] | None = None,
        suffix: str | None = None,
        task: Task | None = None,
        compute: AzureCompute | Mapping[str, Any] | None = None,
        available_bytes: int | None = None,
    ) -> _estimate.Estimate:
        """Will it fit? Predict a job's peak memory, tokens and time per epoch with the local trainer on this machine,
        submitting nothing. Takes a ready ``spec`` or the keyword arguments of :meth:`create`; ``training_file`` may
        be a local path (read, not uploaded) or a stored file id. ``available_bytes`` defaults to
        ``$PHITUNE_MEMORY_LIMIT`` where set, else the memory available now, as in the fit check of :meth:`create`.
        See :mod:`phitune.estimate` for the model behind the numbers."""
        if spec is None:
            if model is None or training_file is None:
                raise SpecError("model", "give a JobSpec, or model= and training_file=")
            spec = build_spec(
                model=model_argument(model),
                training_file=os.fspath(training_file),
                validation_file=os.fspath(validation_file) if validation_file is not None else None,
                method=method,
                hyperparameters=hyperparameters,
                distributed=distributed,
                suffix=suffix,
                task=task,
                compute=compute,
            )
        dataset: Path | None = Path(spec.training_file)
        if dataset is not None and not dataset.is_file():
            stored = getattr(self._backend, "file_content", None)  # the local backend's stored files
            dataset = Path(stored(spec.training_file)) if stored is not None else None
        return _estimate.estimate(spec, home=self._client.home, dataset=dataset, available_bytes=available_bytes)

    def get(self, job_id: str) -> FineTuneJob:
        return self._backend.get_job(job_id)

    def list(self, *, limit: int = 20, after: str | None = None) -> builtins.list[FineTuneJob]:
        """Jobs, newest first; ``after`` is the last id of the previous page."""
        return self._backend.list_jobs(limit=limit, after=after)

    def cancel(self, job_id: str) -> FineTuneJob:
        """Stop a job; what it produced (events, checkpoints, logs) is kept."""
        return self._backend.cancel_job(job_id)

    def pause(self, job_id: str) -> FineTuneJob:
        """Stop a queued or running job after it saves a checkpoint; :meth:`resume` continues it from there. Raises
        :class:`~phitune.errors.UnsupportedOptionError` on a backend that cannot pause jobs (Azure)."""
        return self._pausing("pause").pause_job(job_id)

    def resume(self, job_id: str) -> FineTuneJob:
        """Continue a paused job from its last checkpoint."""
        return self._pausing("resume").resume_job(job_id)

    def events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> builtins.list[JobEvent]:
        """Events oldest first; metrics events carry step, train_loss, learning_rate, tokens_per_second."""
        return self._backend.list_events(job_id, after=after, limit=limit)

    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        return self._backend.list_checkpoints(job_id)

    def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        progress: bool | None = None,
    ) -> FineTuneJob:
        """Block until the job succeeds, fails, is cancelled or is paused (it then waits for you to resume it), and
        return it. A progress bar shows on a TTY (``progress=`` forces it on or off). Raises
        :class:`~phitune.errors.WaitTimeoutError` after ``timeout``."""
        show = sys.stderr.isatty() if progress is None else progress
        deadline = None if timeout is None else time.monotonic() + timeout
        with _Progress(job_id, enabled=show) as bar:
            cursor: str | None = None
            while True:
                job = self._backend.get_job(job_id)
                if show:
                    events = self._backend.list_events(job_id, after=cursor)
                    cursor = events[-1].id if events else cursor
                    bar.update(job, events)
                if job.done or job.status == "paused":
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
                time.sleep(poll_interval)

    def _pausing(self, operation: str) -> PausingBackend:
        backend = self._backend
        if not isinstance(backend, PausingBackend):
            raise UnsupportedOptionError(operation, backend.name, "this backend cannot pause and resume jobs")
        return backend

    def _file_id(self, value: str | os.PathLike[str] | None, model: str, uploaded: builtins.list[str]) -> str | None:
        """A file id as is; an existing local path is validated and uploaded first (its id added to ``uploaded``)."""
        if value is None:
            return None
        if isinstance(value, os.PathLike) or Path(value).is_file():
            uploaded.append(self._client.files.upload(value, model=model).id)
            return uploaded[-1]
        return value


class _Progress:
    """A rich progress bar over a job's steps, with the latest loss and the time left until the job's
    ``estimated_finish``."""

    def __init__(self, job_id: str, *, enabled: bool) -> None:
        self.enabled = enabled
        self.job_id = job_id
        self._progress: Any = None
        self._task: Any = None
        self._loss = ""

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[loss]}"),
                TextColumn("{task.fields[eta]}"),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.job_id, total=None, loss="", eta="")
        return self

    def update(self, job: FineTuneJob, events: list[JobEvent]) -> None:
        for event in events:
            if event.type == "metrics" and event.data and "train_loss" in event.data:
                self._loss = f"loss {event.data['train_loss']:.4f}"
        eta = ""
        if job.estimated_finish is not None and not job.done:
            eta = f"ETA {datetime.timedelta(seconds=max(0, round(job.estimated_finish - time.time())))}"
        self._progress.update(
            self._task,
            completed=job.step,
            total=job.total_steps,
            description=f"{job.id} {job.status}",
            loss=self._loss,
            eta=eta,
        )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
