"""The embedded default backend: jobs in a SQLite store under a home folder, run by a detached worker process."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _allocator as allocator
from .. import catalog
from ..errors import (
    ConflictError,
    MissingContentError,
    MissingDependencyError,
    NotFoundError,
    PhituneError,
    SpecError,
    UnsupportedOptionError,
)
from ..estimate import Estimate, memory_limit
from ..local.store import Store
from ..local.worker import ensure_worker
from ..types import (
    PEFT,
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    Checkpoint,
    DatasetReport,
    Deployment,
    FileObject,
    FineTuneJob,
    JobEvent,
    JobSpec,
    ModelObject,
    QLoRA,
    TrainingPlan,
    Usage,
)
from .base import Capabilities

if TYPE_CHECKING:
    from ..engines.onnx_engine import OnnxServed
    from ..engines.torch_engine import Generation, ModelPool, ServedModel

logger = logging.getLogger("phitune.local")
_DEPLOYMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SKIP_FIT_CHECK_ENV = "PHITUNE_SKIP_FIT_CHECK"
"""Set to 1 to submit local jobs without the fit check."""
_FIT_CHECK_LOCK = threading.Lock()  # one machine probe at a time: threads of a process share its cache's temp file


class LocalBackend:
    """Runs jobs on this machine with the reference trainer (torch, transformers, peft)."""

    name = "local"
    capabilities = Capabilities(
        pause=True, export=True, stored_files=True, staging=True, chat_streaming=True, openai_endpoint=False
    )

    def __init__(self, home: str | Path) -> None:
        self.store = Store(home)
        self.store.sweep()  # what uploads killed midway left
        self.home: Path = self.store.home
        self._pool: ModelPool | None = None
        self._admitted: dict[str, _Admission] = {}  # by spec: what check_spec found, for create_job

    # ---------------------------------------------------------------------------------------------------- files
    def staging(self) -> AbstractContextManager[Path]:
        """A private folder in the home for an upload on its way in: ``files.upload`` copies a dataset there once,
        then validates and stores that copy, which is moved into the store, not copied again."""
        return self.store.staging()

    def upload_file(self, path: str, *, report: DatasetReport) -> FileObject:
        return self.store.add_file(
            Path(path), filename=Path(path).name, fmt=report.format, examples=report.examples, purpose="fine-tune"
        )

    def get_file(self, file_id: str) -> FileObject:
        return self.store.get_file(file_id)

    def file_content(self, file_id: str) -> Path:
        """Where a stored file's bytes lie."""
        return self.store.file_blob(file_id)

    def list_files(self) -> list[FileObject]:
        return self.store.list_files()

    def delete_file(self, file_id: str) -> None:
        self.store.delete_file(file_id)

    # ----------------------------------------------------------------------------------------------------- jobs
    def check_spec(self, spec: JobSpec) -> None:
        if spec.compute is not None:
            raise UnsupportedOptionError("compute", self.name, "AzureCompute applies to the Azure backend only")
        entry = catalog.find(spec.model)
        if entry is not None and not entry.runs_locally:
            raise UnsupportedOptionError("model", self.name, entry.note or f"{entry.name} does not run locally")
        if isinstance(spec.method, QLoRA) and importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError("bitsandbytes", "qlora")
        if isinstance(spec.method, PEFT):
            from .._specs import peft_config

            peft_config(spec.method)
        if spec.integrations:
            from ..integrations.tracking import check_installed

            check_installed(spec.integrations)
        if spec.distributed.strategy != "none":
            from ..trainer import distributed

            distributed.check(spec, self.name)
        self.store.file_blob(spec.training_file)  # recorded, and its stored copy still there
        if spec.validation_file is not None:
            self.store.file_blob(spec.validation_file)
        allocator.for_trainers()  # a malformed or unmet $PHITUNE_ALLOCATOR is refused here
        for package in ("torch", "transformers"):
            if importlib.util.find_spec(package) is None:
                raise MissingDependencyError(package, "local")
        predicted = self._check_fit(spec)
        self._admitted[spec.model_dump_json()] = _Admission(self._plan(spec), predicted)

    def _check_fit(self, spec: JobSpec) -> Estimate | None:
        """Refuse a job whose predicted peak exceeds the memory available now, or ``$PHITUNE_MEMORY_LIMIT``:
        :func:`phitune.estimate.check_fits` with the training file's token lengths; returns the estimate. Nothing is
        refused where the model's shape is not on this machine, where the estimate fails (logged), or with
        ``$PHITUNE_SKIP_FIT_CHECK=1``."""
        if os.environ.get(SKIP_FIT_CHECK_ENV, "").lower() in ("1", "true", "yes"):
            return None
        memory_limit()  # a malformed limit is an error even where nothing gets estimated
        from ..estimate import check_fits

        try:
            with _FIT_CHECK_LOCK:
                return check_fits(spec, home=self.home, dataset=self.store.file_blob(spec.training_file))
        except PhituneError:
            raise
        except Exception as exc:  # e.g. a config.json without a decoder's dimensions: the check refuses nothing
            logger.warning("fit check skipped: the estimate of this job failed: %r", exc)
            return None

    def _plan(self, spec: JobSpec) -> TrainingPlan:
        """Refuse a job that could not train, as the trainer would, from the base's config and tokenizer and the
        datasets (:func:`phitune.trainer.data.prepare`): :class:`~phitune.errors.SpecError` on ``model`` for a base
        that cannot be loaded; :class:`~phitune.errors.DatasetError` naming the file by id and filename, its lines
        and the fixes, for examples that keep no token with loss within ``max_seq_length`` or exceed the model's
        context. Returns the job's training plan."""
        from ..trainer.data import DatasetFile, prepare
        from ..trainer.model import resolve_base

        def stored(file_id: str) -> DatasetFile:
            return DatasetFile(self.store.file_blob(file_id), self.store.file_label(file_id))

        valid = stored(spec.validation_file) if spec.validation_file is not None else None
        prepared = prepare(spec, resolve_base(spec.model, self.home), stored(spec.training_file), valid)
        return spec.hyperparameters.plan(len(prepared.train.examples))

    def create_job(self, spec: JobSpec, *, idempotency_key: str) -> FineTuneJob:
        """Store a queued job and start the worker. Where ``check_spec`` admitted the spec, the job starts with its
        ``total_steps`` and, where the fit check predicted the training time, its ``estimated_finish``; the trainer
        replaces the latter with one from measured steps."""
        job, created = self.store.create_job(spec, idempotency_key=idempotency_key)
        admitted = self._admitted.pop(spec.model_dump_json(), None)
        if created:
            self.store.add_event(job.id, f"job created: {spec.method.type} fine-tuning of {spec.model}")
            if admitted is not None:  # attempt 0: a worker that already claimed the job keeps its own values
                self.store.update_progress(job.id, 0, **admitted.progress(job.created_at))
                job = self.store.get_job(job.id)
        ensure_worker(self.store)
        return job

    def get_job(self, job_id: str) -> FineTuneJob:
        if self.store.get_job(job_id).status in ("queued", "running"):
            ensure_worker(self.store)  # restarts a dead worker: its job resumes from the last checkpoint
        return self.store.get_job(job_id)

    def list_jobs(self, *, limit: int = 20, after: str | None = None) -> list[FineTuneJob]:
        if self.store.has_active_jobs():
            ensure_worker(self.store)  # a job whose worker died shows queued, not running
        return self.store.list_jobs(limit=limit, after=after)

    def cancel_job(self, job_id: str) -> FineTuneJob:
        if not self.store.transition(job_id, "cancelled", when=("validating_files", "queued", "running", "paused")):
            job = self.store.get_job(job_id)
            raise ConflictError(f"job {job_id} is already {job.status}")
        self.store.add_event(job_id, "cancellation requested")
        return self.store.get_job(job_id)

    def pause_job(self, job_id: str) -> FineTuneJob:
        """Stop a running job after saving a checkpoint; ``resume_job`` continues it from there."""
        if not self.store.transition(job_id, "paused", when=("queued", "running")):
            raise ConflictError(f"job {job_id} is {self.store.get_job(job_id).status}, not queued or running")
        self.store.add_event(job_id, "pause requested")
        return self.store.get_job(job_id)

    def resume_job(self, job_id: str) -> FineTuneJob:
        if not self.store.transition(job_id, "queued", when=("paused",)):
            raise ConflictError(f"job {job_id} is {self.store.get_job(job_id).status}, not paused")
        self.store.add_event(job_id, "resumed: the job continues from its last checkpoint")
        ensure_worker(self.store)
        return self.store.get_job(job_id)

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> list[JobEvent]:
        return self.store.list_events(job_id, after=after, limit=limit)

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        return self.store.list_checkpoints(job_id)

    # --------------------------------------------------------------------------------------------------- models
    def get_model(self, model_id: str) -> ModelObject:
        stored = self.store.find_model(model_id)
        if stored is not None:
            return stored
        entry = catalog.find(model_id)
        if entry is not None:
            if not entry.runs_locally:
                raise NotFoundError("local model", f"{model_id} ({entry.note})")
            folder = self.home / "models" / "base" / entry.name
            return ModelObject(id=entry.name, owned_by="microsoft", path=str(folder) if folder.is_dir() else None)
        if Path(model_id).expanduser().is_dir():
            return ModelObject(id=model_id, path=str(Path(model_id).expanduser().resolve()))
        raise NotFoundError("model", model_id)

    def list_models(self) -> list[ModelObject]:
        bases = [self.get_model(m.name) for m in catalog.MODELS if m.runs_locally]
        return bases + self.store.list_models()

    # ---------------------------------------------------------------------------------------------- deployments
    def create_deployment(self, model: str, name: str, **options: Any) -> Deployment:
        """Deploy ``model`` as ``name``. ``engine="onnx"`` serves it with ONNX Runtime GenAI: the model is exported
        into the home on first use (fine-tunes of one base share its export) or, given as an export folder, run as is.
        """
        engine = str(options.pop("engine", "torch"))
        if options:
            raise UnsupportedOptionError(f"deployments.create({next(iter(options))}=...)", self.name, "unknown option")
        if engine not in ("torch", "onnx"):
            raise UnsupportedOptionError("engine", self.name, f"engine {engine!r} is not available; use torch or onnx")
        if not _DEPLOYMENT_NAME.match(name):
            raise SpecError("name", "1-64 letters, digits, '.', '-' or '_', starting with a letter or digit")
        found = self.get_model(model)
        _check_weights(found)
        if engine == "onnx":
            if any(d.name == name for d in self.store.list_deployments()):
                raise ConflictError(f"a deployment named {name!r} already exists")
            from ..export import onnx_for_deployment

            onnx_for_deployment(found, self.home)
        return self.store.add_deployment(name, model, engine)

    def get_deployment(self, name: str) -> Deployment:
        return self.store.get_deployment(name)

    def list_deployments(self) -> list[Deployment]:
        return self.store.list_deployments()

    def delete_deployment(self, name: str) -> None:
        self.store.delete_deployment(name)

    def served_model(self, name: str) -> ServedModel | OnnxServed:
        """What to load to chat with a deployment name or a model id (an ONNX export for ``engine="onnx"``)."""
        try:
            deployment = self.store.get_deployment(name)
            model_id, engine = deployment.model, deployment.engine
        except NotFoundError:
            model_id, engine = name, "torch"
        model = self.get_model(model_id)
        _check_weights(model)
        if engine == "onnx":
            from ..export import onnx_for_deployment

            return onnx_for_deployment(model, self.home)
        from ..engines.torch_engine import ServedModel
        from ..trainer.model import resolve_base

        if model.kind == "adapter":
            assert model.base_model is not None and model.path is not None
            return ServedModel(model.id, resolve_base(model.base_model, self.home), model.path)
        if model.kind == "full":
            assert model.path is not None
            return ServedModel(model.id, model.path)
        return ServedModel(model.id, model.path or resolve_base(model.id, self.home))

    def _model_pool(self) -> ModelPool:
        if self._pool is None:
            if importlib.util.find_spec("torch") is None:
                raise MissingDependencyError("torch", "local")
            from ..engines.torch_engine import ModelPool

            self._pool = ModelPool()
        return self._pool

    def stream_chat(
        self,
        name: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int | None,
        deadline: float | None = None,
    ) -> Iterator[str | Generation]:
        """Text pieces as they are generated, then the final Generation (token counts, finish reason). ``max_tokens``
        None asks for the default within the model's context; at ``deadline`` (``time.monotonic()``) generation
        stops (:meth:`phitune.engines.torch_engine.ModelPool.stream`)."""
        served, pool = self._engine(name)
        return pool.stream(  # type: ignore[no-any-return]
            served,
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            deadline=deadline,
        )

    def export_model(self, model: str, **options: Any) -> Path:
        """Export a model's weights (see :func:`phitune.export.export` for ``options``)."""
        from ..export import export, source_of

        return export(source_of(self.get_model(model), self.home), **options)

    def chat(
        self,
        deployment: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> ChatCompletion:
        served, pool = self._engine(deployment)
        result = pool.generate(served, messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return chat_completion(served.model_id, result)

    def _engine(self, name: str) -> tuple[ServedModel | OnnxServed, Any]:
        """What serves a deployment name or a model id, and the pool that runs it: ONNX Runtime GenAI's for an
        ``engine="onnx"`` deployment, else torch's."""
        from ..engines.onnx_engine import OnnxServed, shared_pool

        served = self.served_model(name)
        return served, shared_pool() if isinstance(served, OnnxServed) else self._model_pool()

    def close(self) -> None:
        self._pool = None


def chat_completion(model_id: str, result: Generation) -> ChatCompletion:
    """A finished generation as an OpenAI-shaped chat completion."""
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        model=model_id,
        choices=[
            ChatChoice(
                index=0,
                message=ChatMessage(role="assistant", content=result.text),
                finish_reason=result.finish_reason,
            )
        ],
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
    )


_WEIGHTS = {"adapter": "adapter_config.json", "full": "config.json"}
"""The file a fine-tuned model's folder cannot be without, by kind."""


def _check_weights(model: ModelObject) -> None:
    """A fine-tuned model whose folder is gone from the home is a :class:`~phitune.errors.MissingContentError`."""
    marker = _WEIGHTS.get(model.kind)
    if marker is not None and model.path is not None and not (Path(model.path) / marker).is_file():
        fix = f"train it again (its job is {model.job_id}), or restore its folder from a backup"
        raise MissingContentError("model", model.id, "the weights", fix)


@dataclass(frozen=True)
class _Admission:
    """What ``check_spec`` found of a job it admitted: its training plan and, where the fit check ran, its
    estimate."""

    plan: TrainingPlan
    estimate: Estimate | None

    def progress(self, created_at: int) -> dict[str, int]:
        """The job's first progress fields: its steps and, where predicted, when it should finish (the predicted
        time of a micro-batch times the plan's micro-batches)."""
        fields = {"total_steps": self.plan.total_steps}
        predicted = self.estimate
        if predicted is not None and predicted.seconds_per_epoch is not None and predicted.examples:
            per_micro_batch = predicted.seconds_per_epoch / math.ceil(predicted.examples / self.plan.batch_size)
            fields["estimated_finish"] = created_at + math.ceil(per_micro_batch * self.plan.micro_batches)
        return fields
