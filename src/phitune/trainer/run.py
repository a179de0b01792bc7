"""The trainer process: runs one attempt of one job from the local store (``python -m phitune.trainer.run``).

For a distributed job the worker starts this module under torchrun, once per rank. Rank 0 alone records events,
checkpoints and the outcome, and reads the stop flag; the others train with a :class:`QuietControl`.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .._process import die_with_parent
from ..errors import scrub_paths
from ..integrations.tracking import TrackedControl
from ..local.store import Store, fine_tuned_model_id
from ..types import JobError, JobSpec, ModelObject, metrics_message
from . import distributed
from .distributed import Ranks
from .loop import Control, StopReason, TrainRun, iter_checkpoints, train
from .model import resolve_base


class StoreControl:
    """The loop's :class:`~phitune.trainer.loop.Control` backed by the local store, fenced by the attempt number."""

    def __init__(self, store: Store, job_id: str, attempt: int) -> None:
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


class QuietControl:
    """The control of ranks other than 0: records nothing and never asks to stop (rank 0's decision is broadcast)."""

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        pass

    def metrics(self, data: dict[str, Any]) -> None:
        pass

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None:
        pass

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        pass

    def should_stop(self) -> StopReason | None:
        return None


def run_attempt(store: Store, job_id: str, attempt: int) -> int:
    """Train one attempt (this process's rank of it); rank 0 records the outcome in the store. Returns the exit code."""
    job = store.get_job(job_id)
    assert job.spec is not None
    spec = job.spec
    ranks = distributed.setup(spec.distributed.strategy)
    try:
        control: Control = StoreControl(store, job_id, attempt) if ranks.main else QuietControl()
        if ranks.main and spec.integrations:
            control = TrackedControl(control, spec, job_id=job_id, home=store.home)
        try:
            return _run(store, job_id, attempt, spec, ranks, control)
        finally:
            if isinstance(control, TrackedControl):
                control.close(store.job_attempt(job_id)[0])
    finally:
        distributed.teardown()


def _run(store: Store, job_id: str, attempt: int, spec: JobSpec, ranks: Ranks, control: Control) -> int:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phitune.trainer.run")
    parser.add_argument("--home", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent()  # under torchrun each rank is the launcher's child: all die if the worker does
    return run_attempt(Store(args.home), args.job, args.attempt)


if __name__ == "__main__":
    sys.exit(main())
