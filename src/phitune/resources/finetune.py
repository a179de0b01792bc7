from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .. import catalog
from .. import estimate as _estimate
from .._ops import Emit, Op
from .._specs import build_spec
from ..backends.base import PausingBackend, StoredFilesBackend
from ..errors import PhituneError, SpecError, WaitTimeoutError
from ..types import Checkpoint, FineTuneJob, JobEvent, JobOptions, JobSpec
from ._base import AsyncResource, Blocking, Call, Resource, Sleep, SyncResource, call

if TYPE_CHECKING:
    from typing_extensions import Unpack


def model_argument(model: str) -> str:
    """A model folder given relative to the working directory, as an absolute path (the worker and trainer have
    other working directories, and read a relative name as a Hugging Face id); anything else as it is."""
    folder = Path(model).expanduser()
    if catalog.find(model) is None and not folder.is_absolute() and folder.is_dir():
        return str(folder.resolve())
    return model


class _FineTuning(Resource):
    """The behaviour of ``finetune``, written once for :class:`FineTuning` and :class:`AsyncFineTuning`."""

    def _create(
        self,
        model: str,
        training_file: str | os.PathLike[str],
        validation_file: str | os.PathLike[str] | None,
        idempotency_key: str | None,
        options: JobOptions,
    ) -> Op[FineTuneJob]:
        uploaded: builtins.list[str] = []
        try:
            training = yield from self._file_id(training_file, model, uploaded)
            validation = yield from self._file_id(validation_file, model, uploaded)
            spec = build_spec(
                **options, model=model_argument(model), training_file=training, validation_file=validation
            )
            yield Call(lambda b: b.check_spec(spec))
        except PhituneError:
            for file_id in uploaded:
                with contextlib.suppress(PhituneError):
                    yield _deletion(file_id)
            raise
        return (yield from self._created(spec, idempotency_key))

    def _submit(self, spec: JobSpec, idempotency_key: str | None) -> Op[FineTuneJob]:
        yield Call(lambda b: b.check_spec(spec))
        return (yield from self._created(spec, idempotency_key))

    def _created(self, spec: JobSpec, idempotency_key: str | None) -> Op[FineTuneJob]:
        key = idempotency_key or uuid.uuid4().hex
        job: FineTuneJob = yield Call(lambda b: b.create_job(spec, idempotency_key=key))
        return job

    def _file_id(
        self, value: str | os.PathLike[str] | None, model: str, uploaded: builtins.list[str]
    ) -> Op[str | None]:
        """A file id as is; an existing local path is validated and uploaded first (its id added to ``uploaded``)."""
        if value is None:
            return None
        if isinstance(value, os.PathLike) or Path(value).is_file():
            stored = yield from self._client.files._upload(value, model)
            uploaded.append(stored.id)
            return stored.id
        return value

    def _estimate(
        self,
        spec: JobSpec | None,
        model: str | None,
        training_file: str | os.PathLike[str] | None,
        validation_file: str | os.PathLike[str] | None,
        available_bytes: int | None,
        options: JobOptions,
    ) -> Op[_estimate.Estimate]:
        if spec is None:
            if model is None or training_file is None:
                raise SpecError("model", "give a JobSpec, or model= and training_file=")
            spec = build_spec(
                **options,
                model=model_argument(model),
                training_file=os.fspath(training_file),
                validation_file=os.fspath(validation_file) if validation_file is not None else None,
            )
        given = spec
        dataset: Path | None = Path(given.training_file)
        if not Path(given.training_file).is_file():
            dataset = None
            if self._capabilities.stored_files:  # the local backend's stored files
                dataset = yield Call(lambda b: cast(StoredFilesBackend, b).file_content(given.training_file))
        estimated: _estimate.Estimate = yield Blocking(
            lambda: _estimate.estimate(given, home=self._client.home, dataset=dataset, available_bytes=available_bytes)
        )
        return estimated

    def _pausing(self, operation: str, fn: Callable[[PausingBackend], FineTuneJob]) -> Op[FineTuneJob]:
        self._require("pause", operation)
        job: FineTuneJob = yield Call(lambda b: fn(cast(PausingBackend, b)))
        return job

    def _wait(self, job_id: str, poll_interval: float, timeout: float | None, progress: bool | None) -> Op[FineTuneJob]:
        show = sys.stderr.isatty() if progress is None else progress
        deadline = None if timeout is None else time.monotonic() + timeout
        with _Progress(job_id, enabled=show) as bar:
            cursor: str | None = None
            while True:
                job: FineTuneJob = yield Call(lambda b: b.get_job(job_id))
                if show:
                    events: builtins.list[JobEvent] = yield _events(job_id, cursor)
                    cursor = events[-1].id if events else cursor
                    bar.update(job, events)
                if job.done or job.status == "paused":
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
                yield Sleep(poll_interval)

    def _stream_events(self, job_id: str, after: str | None, poll_interval: float) -> Op[None]:
        """Every event from ``after`` on, as it is written, until the job has succeeded, failed, been cancelled or
        paused; once it has, the events it writes within one more ``poll_interval`` (its closing message)."""
        cursor, ended = after, False
        while True:
            events: builtins.list[JobEvent] = yield _events(job_id, cursor)
            for event in events:
                yield Emit(event)
            cursor = events[-1].id if events else cursor
            if len(events) == _PAGE:
                continue
            if ended:
                return
            job: FineTuneJob = yield Call(lambda b: b.get_job(job_id))
            ended = job.done or job.status == "paused"
            yield Sleep(poll_interval)


_PAGE = 1000


def _events(job_id: str, after: str | None) -> Call:
    return Call(lambda b: b.list_events(job_id, after=after, limit=_PAGE))


def _deletion(file_id: str) -> Call:
    return Call(lambda b: b.delete_file(file_id))


class FineTuning(_FineTuning, SyncResource):
    """Fine-tuning jobs, with the same shapes on every backend."""

    def create(
        self,
        *,
        model: str,
        training_file: str | os.PathLike[str],
        validation_file: str | os.PathLike[str] | None = None,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> FineTuneJob:
        """Submit a job and return it at once (``queued``). Files may be ids or local paths (uploaded first); the
        other options are those of :class:`~phitune.types.JobOptions` (``method``, ``hyperparameters``,
        ``distributed``, ``suffix``, ``task``, ``compute``, ``integrations``).

        Every option is checked before the job is created: invalid values and options the backend cannot honour
        raise :class:`~phitune.errors.SpecError` naming the field, a local job that cannot fit the machine
        :class:`~phitune.errors.WontFitError`, a local job whose base cannot be loaded a ``SpecError`` on ``model``
        and one whose examples cannot train :class:`~phitune.errors.DatasetError` with the lines and the fixes;
        files this call uploaded are then deleted again. A retried call with
        the same ``idempotency_key`` returns the first job instead of starting a second one. ``integrations``
        (``[phitune.MLflow(...), phitune.TensorBoard(...)]``) log the job to experiment trackers where it trains.
        """
        return self._run(self._create(model, training_file, validation_file, idempotency_key, options))

    def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> FineTuneJob:
        """Submit a ready :class:`JobSpec`."""
        return self._run(self._submit(spec, idempotency_key))

    def estimate(
        self,
        spec: JobSpec | None = None,
        *,
        model: str | None = None,
        training_file: str | os.PathLike[str] | None = None,
        validation_file: str | os.PathLike[str] | None = None,
        available_bytes: int | None = None,
        **options: Unpack[JobOptions],
    ) -> _estimate.Estimate:
        """Will it fit? Predict a job's peak memory, tokens and time per epoch with the local trainer on this machine,
        submitting nothing. Takes a ready ``spec`` or the keyword arguments of :meth:`create`; ``training_file`` may
        be a local path (read, not uploaded) or a stored file id. ``available_bytes`` defaults to
        ``$PHITUNE_MEMORY_LIMIT`` where set, else the memory available now, as in the fit check of :meth:`create`.
        See :mod:`phitune.estimate` for the model behind the numbers."""
        return self._run(self._estimate(spec, model, training_file, validation_file, available_bytes, options))

    def get(self, job_id: str) -> FineTuneJob:
        """A job by id, with its current status."""
        return self._run(call(lambda b: b.get_job(job_id)))

    def list(self, *, limit: int = 20, after: str | None = None) -> builtins.list[FineTuneJob]:
        """Jobs, newest first; ``after`` is the last id of the previous page."""
        return self._run(call(lambda b: b.list_jobs(limit=limit, after=after)))

    def cancel(self, job_id: str) -> FineTuneJob:
        """Stop a job; what it produced (events, checkpoints, logs) is kept."""
        return self._run(call(lambda b: b.cancel_job(job_id)))

    def pause(self, job_id: str) -> FineTuneJob:
        """Stop a queued or running job after it saves a checkpoint; :meth:`resume` continues it from there. Raises
        :class:`~phitune.errors.UnsupportedOptionError` on a backend that cannot pause jobs (Azure)."""
        return self._run(self._pausing("pause", lambda b: b.pause_job(job_id)))

    def resume(self, job_id: str) -> FineTuneJob:
        """Continue a paused job from its last checkpoint."""
        return self._run(self._pausing("resume", lambda b: b.resume_job(job_id)))

    def events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> builtins.list[JobEvent]:
        """Events oldest first; metrics events carry step, train_loss, learning_rate, tokens_per_second."""
        return self._run(call(lambda b: b.list_events(job_id, after=after, limit=limit)))

    def stream_events(self, job_id: str, *, after: str | None = None, poll_interval: float = 1.0) -> Iterator[JobEvent]:
        """Every event after ``after`` (from the first, without it), as the job writes them, until it succeeds,
        fails, is cancelled or is paused, and the events it writes within one ``poll_interval`` after that (its
        closing message): ``for event in client.finetune.stream_events(job.id)``."""
        return self._iterate(self._stream_events(job_id, after, poll_interval))

    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        """A job's saved checkpoints (step, metrics and, on the local backend, the folder)."""
        return self._run(call(lambda b: b.list_checkpoints(job_id)))

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
        return self._run(self._wait(job_id, poll_interval, timeout, progress))


class AsyncFineTuning(_FineTuning, AsyncResource):
    """:class:`FineTuning` for ``AsyncClient``: the same calls, awaited."""

    async def create(
        self,
        *,
        model: str,
        training_file: str | os.PathLike[str],
        validation_file: str | os.PathLike[str] | None = None,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> FineTuneJob:
        """:meth:`FineTuning.create`."""
        return await self._run(self._create(model, training_file, validation_file, idempotency_key, options))

    async def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> FineTuneJob:
        """:meth:`FineTuning.submit`."""
        return await self._run(self._submit(spec, idempotency_key))

    async def estimate(
        self,
        spec: JobSpec | None = None,
        *,
        model: str | None = None,
        training_file: str | os.PathLike[str] | None = None,
        validation_file: str | os.PathLike[str] | None = None,
        available_bytes: int | None = None,
        **options: Unpack[JobOptions],
    ) -> _estimate.Estimate:
        """:meth:`FineTuning.estimate`, on a worker thread."""
        return await self._run(self._estimate(spec, model, training_file, validation_file, available_bytes, options))

    async def get(self, job_id: str) -> FineTuneJob:
        """A job by id, with its current status."""
        return await self._run(call(lambda b: b.get_job(job_id)))

    async def list(self, *, limit: int = 20, after: str | None = None) -> builtins.list[FineTuneJob]:
        """:meth:`FineTuning.list`."""
        return await self._run(call(lambda b: b.list_jobs(limit=limit, after=after)))

    async def cancel(self, job_id: str) -> FineTuneJob:
        """:meth:`FineTuning.cancel`."""
        return await self._run(call(lambda b: b.cancel_job(job_id)))

    async def pause(self, job_id: str) -> FineTuneJob:
        """:meth:`FineTuning.pause`."""
        return await self._run(self._pausing("pause", lambda b: b.pause_job(job_id)))

    async def resume(self, job_id: str) -> FineTuneJob:
        """:meth:`FineTuning.resume`."""
        return await self._run(self._pausing("resume", lambda b: b.resume_job(job_id)))

    async def events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> builtins.list[JobEvent]:
        """:meth:`FineTuning.events`."""
        return await self._run(call(lambda b: b.list_events(job_id, after=after, limit=limit)))

    def stream_events(
        self, job_id: str, *, after: str | None = None, poll_interval: float = 1.0
    ) -> AsyncIterator[JobEvent]:
        """:meth:`FineTuning.stream_events`: ``async for event in client.finetune.stream_events(job.id)``."""
        return self._iterate(self._stream_events(job_id, after, poll_interval))

    async def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        """A job's saved checkpoints (step, metrics and, on the local backend, the folder)."""
        return await self._run(call(lambda b: b.list_checkpoints(job_id)))

    async def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        progress: bool | None = None,
    ) -> FineTuneJob:
        """:meth:`FineTuning.wait`, awaitable: the event loop runs on between polls."""
        return await self._run(self._wait(job_id, poll_interval, timeout, progress))


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
