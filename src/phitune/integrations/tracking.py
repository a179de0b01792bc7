"""The trackers of ``JobSpec.integrations``, run by the local trainer (rank 0 of a distributed job).

:class:`TrackedControl` wraps the training loop's :class:`~phitune.trainer.loop.Control`: everything still reaches
the store, and each tracker also gets the metrics (every numeric value of a metrics event, at its step), the
checkpoints and the final model. A tracker that fails, at start or later, is dropped with a warning event and
training goes on. MLflow and TensorBoard are imported only here, only when a job asks for them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import MissingDependencyError, redact
from ..types import Integration, JobSpec, MLflow, TensorBoard

if TYPE_CHECKING:
    from ..trainer.loop import Control, StopReason

_PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}
"""The module each integration imports; each is also the name of the extra that installs it."""
_MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
_NOT_METRICS = frozenset({"step", "attempt"})


def check_installed(integrations: Iterable[Integration]) -> None:
    """Raise :class:`~phitune.errors.MissingDependencyError` for an integration whose package is not installed."""
    for integration in integrations:
        package = _PACKAGES[integration.type]
        if importlib.util.find_spec(package) is None:
            raise MissingDependencyError(package, integration.type)


class Tracker(Protocol):
    """One experiment tracker of a job."""

    name: str
    where: str
    """Where it logs, for the job's events."""
    details: dict[str, Any]

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def checkpoint(self, step: int, path: Path) -> None: ...

    def model(self, path: Path) -> None: ...

    def close(self, status: str) -> None:
        """The attempt ended with the job in ``status``."""
        ...


def spec_params(spec: JobSpec) -> dict[str, str]:
    """The spec as flat, dotted parameters (``hyperparameters.learning_rate``, ``method.r``, ...)."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            params[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", spec.model_dump(mode="json", exclude={"integrations", "compute"}))
    return params


class MLflowTracker:
    """One MLflow run per job, found again by its ``phitune.job_id`` tag when the job resumes."""

    name = "mlflow"

    def __init__(self, options: MLflow, spec: JobSpec, job_id: str, home: Path) -> None:
        for variable, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
            os.environ.setdefault(variable, value)  # an unreachable server costs seconds, not minutes of retries
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.options = options
        uri, artifacts = options.tracking_uri, options.artifact_location
        if uri is None:
            folder = home / "mlflow"
            folder.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{folder / 'mlflow.db'}"
            artifacts = artifacts or (folder / "artifacts").as_uri()
        self._client = MlflowClient(tracking_uri=uri)
        experiment = self._client.get_experiment_by_name(options.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(options.experiment, artifact_location=artifacts)
        )
        found = self._client.search_runs(
            [experiment_id], filter_string=f"tags.`phitune.job_id` = '{job_id}'", max_results=1
        )
        if found:
            self.run_id: str = found[0].info.run_id
        else:
            tags = {"phitune.job_id": job_id, "phitune.model": spec.model, "phitune.method": spec.method.type}
            run = self._client.create_run(experiment_id, run_name=options.run_name or job_id, tags=tags)
            self.run_id = run.info.run_id
            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in spec_params(spec).items()])
        self.where = f"run {self.run_id} of experiment {options.experiment!r}"
        self.details: dict[str, Any] = {"run_id": self.run_id, "experiment_id": experiment_id}

    def metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def checkpoint(self, step: int, path: Path) -> None:
        if self.options.log_checkpoints:
            self._client.log_artifacts(self.run_id, str(path), f"checkpoints/{path.name}")

    def model(self, path: Path) -> None:
        if self.options.log_model:
            self._client.log_artifacts(self.run_id, str(path), "model")

    def close(self, status: str) -> None:
        if status in _MLFLOW_STATUS:  # a paused job keeps its run open for the resume
            self._client.set_terminated(self.run_id, status=_MLFLOW_STATUS[status])


class TensorBoardTracker:
    """Event files in ``log_dir/<job id>``; each attempt's writer purges the steps it repeats."""

    name = "tensorboard"

    def __init__(self, options: TensorBoard, spec: JobSpec, job_id: str, home: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self._writer: Any = None
        root = Path(options.log_dir).expanduser() if options.log_dir is not None else home / "tensorboard"
        self.folder = root / job_id
        self.where = "event files"
        self.details: dict[str, Any] = {"location": str(self.folder)}
        self._spec = spec.model_dump_json(indent=2, exclude={"integrations"})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:  # opened at the attempt's first step: earlier attempts' events from there are stale
            self._writer = self._writer_class(log_dir=str(self.folder), purge_step=step, flush_secs=10)
            self._writer.add_text("spec", f"```\n{self._spec}\n```", global_step=step)
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def checkpoint(self, step: int, path: Path) -> None:
        pass

    def model(self, path: Path) -> None:
        pass

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()


class TrackedControl:
    """A :class:`~phitune.trainer.loop.Control` that also feeds the job's trackers."""

    def __init__(self, inner: Control, spec: JobSpec, *, job_id: str, home: Path) -> None:
        self._inner = inner
        self._trackers: list[Tracker] = []
        for integration in spec.integrations:
            self._guard(integration.type, functools.partial(self._start, integration, spec, job_id, home))

    def _start(self, integration: Integration, spec: JobSpec, job_id: str, home: Path) -> None:
        tracker: Tracker = (
            MLflowTracker(integration, spec, job_id, home)
            if isinstance(integration, MLflow)
            else TensorBoardTracker(integration, spec, job_id, home)
        )
        self._trackers.append(tracker)
        data = {"integration": tracker.name, **tracker.details}
        self._inner.message(f"{tracker.name}: logging this job to {tracker.where}", data=data)

    # -- Control
    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self._inner.message(text, level=level, data=data)

    def metrics(self, data: dict[str, Any]) -> None:
        self._inner.metrics(data)
        values = {
            key: float(value)
            for key, value in data.items()
            if key not in _NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        step = int(data["step"])
        self._each(lambda tracker: tracker.metrics(step, values))

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None:
        self._inner.checkpoint(step, metrics, path)
        self._each(lambda tracker: tracker.checkpoint(step, path))

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        self._inner.progress(step, total_steps, trained_tokens, eta_seconds)

    def should_stop(self) -> StopReason | None:
        return self._inner.should_stop()

    # -- the end of an attempt
    def succeeded(self, model_dir: Path) -> None:
        """The job's fine-tuned model is saved in ``model_dir``: log it and end the trackers' runs."""
        self._each(lambda tracker: tracker.model(model_dir))
        self.close("succeeded")

    def close(self, status: str) -> None:
        """The attempt ended with the job in ``status``; the trackers still open close."""
        self._each(lambda tracker: tracker.close(status))
        self._trackers.clear()

    def _each(self, action: Callable[[Tracker], None]) -> None:
        for tracker in list(self._trackers):
            if not self._guard(tracker.name, functools.partial(action, tracker)):
                self._trackers.remove(tracker)

    def _guard(self, name: str, action: Callable[[], None]) -> bool:
        """Run ``action``; a failure becomes a warning event (the tracker is then dropped), never a failed job."""
        try:
            action()
        except Exception as exc:
            self._inner.message(
                f"{name} tracking stopped: {type(exc).__name__}: {redact(str(exc))[:500]}; training goes on without it",
                level="warn",
                data={"integration": name},
            )
            return False
        return True
