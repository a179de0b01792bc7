"""One attempt of one job, trained in this process: the body of the trainer process that the local worker starts.

:func:`run_attempt` reads the job from its records, trains it (:func:`phitune.trainer.loop.train`) and records the
outcome. The records are the local store (:class:`phitune.local.store.Store`, opened by the process entry
:mod:`phitune.local.attempt`), seen here through :class:`JobRecords`: what an attempt reads and writes, nothing more.

For a distributed job the worker starts the process under torchrun, once per rank. Rank 0 alone records events,
checkpoints and the outcome, and reads the stop flag; the others train with a
:class:`~phitune.trainer.loop.NullControl`.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Protocol

from ..errors import scrub_paths
from ..integrations.tracking import TrackedControl
from ..trainer import distributed
from ..trainer.distributed import Ranks
from ..trainer.loop import Control, NullControl, StopReason, TrainRun, iter_checkpoints, train
from ..trainer.model import resolve_base
from ..types import Checkpoint, FineTuneJob, JobError, JobSpec, ModelObject, fine_tuned_model_id, metrics_message


class JobRecords(Protocol):
    """What an attempt reads and writes of its job's records (the local store implements it)."""

    home: Path

    def get_job(self, job_id: str) -> FineTuneJob: ...

    def job_attempt(self, job_id: str) -> tuple[str, int]: ...

    def job_dir(self, job_id: str) -> Path: ...

    def file_blob(self, file_id: str) -> Path: ...

    def file_label(self, file_id: str) -> str: ...

    def add_event(
        self, job_id: str, message: str, *, level: str = ..., type: str = ..., data: dict[str, Any] | None = ...
    ) -> None: ...

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, float], path: Path) -> None: ...

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]: ...

    def update_progress(self, job_id: str, attempt: int, **fields: Any) -> None: ...

    def transition(self, job_id: str, to: str, *, when: tuple[str, ...], **fields: Any) -> bool: ...

    def add_model(self, model: ModelObject) -> None: ...


class StoreControl:
    """The loop's :class:`~phitune.trainer.loop.Control` backed by the job's records, fenced by the attempt number."""

    def __init__(self, store: JobRecords, job_id: str, attempt: int) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.store.add_event(self.job_id, text, level=level, data=data)

    def metrics(self, data: dict[str, Any]) -> None:
        self.store.add_event(self.job_id, metrics_message(data), type="metrics", data=data)

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None:
        self.store.add_checkpoint(self.job_id, step, metrics, path)
        self.message(f"checkpoint saved at step {step}", data={"step": step})

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        finish = int(time.time() + eta_seconds) if eta_seconds is not None else None
        self.store.update_progress(
            self.job_id,
            self.attempt,
            step=step,
            total_steps=total_steps,
            trained_tokens=trained_tokens,
            heartbeat_at=time.time(),
            estimated_finish=finish,
        )

    def should_stop(self) -> StopReason | None:
        status, attempt = self.store.job_attempt(self.job_id)
        if attempt != self.attempt:
            return "superseded"
        if status in ("cancelled", "paused"):
            return status  # type: ignore[return-value]
        return None


def run_attempt(store: JobRecords, job_id: str, attempt: int) -> int:
    """Train one attempt (this process's rank of it); rank 0 records the outcome in the store. Returns the exit code."""
    job = store.get_job(job_id)
    assert job.spec is not None
    spec = job.spec
    ranks = distributed.setup(spec.distributed.strategy)
    try:
        control: Control = StoreControl(store, job_id, attempt) if ranks.main else NullControl()
        if ranks.main and spec.integrations:
            control = TrackedControl(control, spec, job_id=job_id, home=store.home)
        try:
            return _run(store, job_id, attempt, spec, ranks, control)
        finally:
            if isinstance(control, TrackedControl):
                control.close(store.job_attempt(job_id)[0])
    finally:
        distributed.teardown()


def _run(store: JobRecords, job_id: str, attempt: int, spec: JobSpec, ranks: Ranks, control: Control) -> int:
    job_dir = store.job_dir(job_id)
    checkpoints = list(iter_checkpoints(job_dir / "checkpoints"))
    model_id = fine_tuned_model_id(spec, job_id)
    output_dir = store.home / "models" / "fine-tuned" / model_id.replace(":", "_")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    (job_dir / "checkpoints").mkdir(exist_ok=True)
    try:
        base_path = resolve_base(spec.model, store.home)
        run = TrainRun(
            spec=spec,
            base_path=base_path,
            train_path=store.file_blob(spec.training_file),
            valid_path=store.file_blob(spec.validation_file) if spec.validation_file else None,
            output_dir=output_dir,
            checkpoint_dir=job_dir / "checkpoints",
            resume_from=checkpoints[-1] if checkpoints else None,
            train_name=store.file_label(spec.training_file),
            valid_name=store.file_label(spec.validation_file) if spec.validation_file else None,
            attempt=attempt,
        )
        if ranks.broadcast(control.should_stop()) is not None:
            return 0
        control.message(f"attempt {attempt} started", data={"attempt": attempt})
        result = train(run, control, ranks)
    except Exception as exc:  # the job fails with the reason; logs and checkpoints stay
        traceback.print_exc()
        if not ranks.main:  # torchrun stops the other ranks; the worker records the exit code and the log
            return 1
        message = scrub_paths(f"{type(exc).__name__}: {exc}")  # the job's error names no path of this machine
        if store.transition(
            job_id, "failed", when=("running",), error=JobError(code="training_failed", message=message)
        ):
            control.message(f"job failed: {message}", level="error")
        return 1
    if not ranks.main:
        return 0
    if result.status == "succeeded":
        store.add_model(
            ModelObject(
                id=model_id,
                kind="full" if spec.method.type == "full" else "adapter",
                base_model=spec.model,
                job_id=job_id,
                path=str(output_dir),
            )
        )
        if isinstance(control, TrackedControl):
            control.succeeded(output_dir)  # before the job reads succeeded: its runs are complete by then
        if store.transition(
            job_id, "succeeded", when=("running",), fine_tuned_model=model_id, trained_tokens=result.trained_tokens
        ):
            control.message(
                f"job succeeded: {model_id} after {result.step} steps",
                data={"step": result.step, "train_loss": result.train_loss, "valid_loss": result.valid_loss},
            )
    elif result.status in ("cancelled", "paused"):
        kept = sorted(checkpoint.step_number for checkpoint in store.list_checkpoints(job_id))
        saved = f"checkpoints kept: {', '.join(map(str, kept))}" if kept else "no checkpoint yet"
        control.message(
            f"job {result.status} at step {result.step}; {saved}", data={"step": result.step, "checkpoints": kept}
        )
    return 0
