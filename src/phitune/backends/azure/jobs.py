"""Azure ``FineTuning`` jobs: the spec checks, building the job (serverless or on managed compute), its status,
events and training metrics."""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

from ... import catalog
from ...errors import ConflictError, NotFoundError, PhituneError, SpecError, UnsupportedOptionError, redact
from ...types import (
    AzureCompute,
    Checkpoint,
    FineTuneJob,
    Hyperparameters,
    JobError,
    JobEvent,
    JobSpec,
    LoRA,
    metrics_message,
)
from .convert import (
    _JOB_STATUS,
    _NOTES_PROPERTY,
    _SPEC_PROPERTY,
    BACKEND,
    EXPERIMENT,
    REGISTRY,
    _asset_id,
    _asset_ref,
    _created,
    _path,
    _run_error,
    _stored_notes,
    _stored_spec,
    _tags,
    _text,
    _ts,
)
from .core import AzureCore
from .hyperparameters import _MANAGED_NAMES, _SERVERLESS_NAMES, GPUS_PER_VM, _hyperparameters
from .offers import (
    _azure_defaults_note,
    _check_learning_rate,
    _lifecycle_notes,
    _live_offer,
    _model_ref,
    _refuse_retired,
)


class JobOperations(AzureCore):
    """The fine-tuning job methods of :class:`~phitune.backends.azure.AzureBackend`."""

    def check_spec(self, spec: JobSpec) -> None:
        """Refuse, before any request, whatever an Azure fine-tuning job cannot honour: a retired offer (with its date,
        replacement and the ways to train the model that are still open), a method or option the offer does not take,
        and any hyperparameter that differs from its default where the offer has no name for it."""
        kind: catalog.OfferKind = "serverless_finetune" if spec.compute is None else "managed_finetune"
        where = catalog.OFFER_NAMES[kind]
        model_name, _, entry = _model_ref(spec.model)
        offer = entry.offer(kind) if entry is not None else None
        if entry is not None and offer is None:
            raise UnsupportedOptionError(
                "model" if kind == "serverless_finetune" else "compute",
                BACKEND,
                f"Azure does not offer {where} of {entry.name}; "
                f"models offering it: {', '.join(catalog.offering(kind))}",
            )
        if offer is not None:
            _refuse_retired(offer, model_name, entry)
        if spec.distributed.strategy != "none":
            raise UnsupportedOptionError("distributed", BACKEND, "Azure chooses the devices of a fine-tuning job")
        if spec.integrations:
            raise UnsupportedOptionError(
                "integrations",
                BACKEND,
                "Azure ML records a fine-tuning job's metrics in its own workspace; phitune does not forward them "
                "to other trackers",
            )
        if not isinstance(spec.method, LoRA):
            raise UnsupportedOptionError(
                "method", BACKEND, f"{where} trains LoRA adapters only, not {spec.method.type!r}"
            )
        if spec.method.target_modules is not None:
            raise UnsupportedOptionError("method.target_modules", BACKEND, f"{where} chooses the LoRA target modules")
        if kind == "serverless_finetune":
            for field in ("r", "alpha", "dropout"):
                if getattr(spec.method, field) != LoRA.model_fields[field].default:
                    raise UnsupportedOptionError(
                        f"method.{field}", BACKEND, f"{where} does not take LoRA {field}; use managed compute"
                    )
        names = _SERVERLESS_NAMES if kind == "serverless_finetune" else _MANAGED_NAMES
        for field, info in Hyperparameters.model_fields.items():
            if field not in names and getattr(spec.hyperparameters, field) != info.default:
                hint = " or use managed compute (compute=phitune.AzureCompute(...))" if field in _MANAGED_NAMES else ""
                if field == "max_seq_length":
                    hint = " (Azure's max_seq_length pads every example to that length instead of truncating)"
                raise UnsupportedOptionError(
                    f"hyperparameters.{field}",
                    BACKEND,
                    f"{where} takes only {', '.join(names)}; leave {field} at its default ({info.default!r}){hint}",
                )

    def create_job(self, spec: JobSpec, *, idempotency_key: str) -> FineTuneJob:
        """Submit the job under a name derived from ``idempotency_key``: a retried create finds the first job."""
        from azure.core.exceptions import ResourceNotFoundError

        self.check_spec(spec)
        name = "phitune-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]
        job = self._build_job(spec, name)

        def get_or_create() -> Any:
            try:
                return self._ml.jobs.get(name)
            except ResourceNotFoundError:
                return self._ml.jobs.create_or_update(job)

        return self._job(self._call(get_or_create))

    def get_job(self, job_id: str) -> FineTuneJob:
        """The job; once it has left the queue also its start and end times and, if it failed, Azure's error."""
        job = self._get_job(job_id)
        started = _JOB_STATUS.get(_text(job.status).lower(), "queued") != "queued"
        return self._job(job, self._run_details(job_id) if started else None)

    def list_jobs(self, *, limit: int = 20, after: str | None = None) -> list[FineTuneJob]:
        """Fine-tuning jobs of the workspace in Azure's order (newest first); ``after`` is the last id of a page.
        Listed jobs carry no run details (times, error): :meth:`get_job` has them."""

        def page() -> list[Any]:
            found: list[Any] = []
            seen = after is None
            for job in self._ml.jobs.list():
                if _text(getattr(job, "type", "")).lower() != "finetuning":
                    continue
                if seen:
                    found.append(job)
                    if len(found) >= limit:
                        break
                seen = seen or job.name == after
            return found

        return [self._job(job) for job in self._call(page)]

    def cancel_job(self, job_id: str) -> FineTuneJob:
        """Ask Azure to cancel; the job reads ``running`` until Azure reports it Canceled."""
        job = self._job(self._get_job(job_id))
        if job.done:
            raise ConflictError(f"job {job_id} is already {job.status}")
        self._call(lambda: self._ml.jobs.begin_cancel(job_id, polling=False), "job", job_id)
        return self._job(self._get_job(job_id))

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> list[JobEvent]:
        """The run's lifecycle from Azure's run history (created, started, warnings, ended, error) and its training
        metrics from the workspace's MLflow tracking server (one ``metrics`` event per step, with the names local
        jobs use), oldest first. A finished job with no metrics there gets a message event saying so; metrics that
        cannot be read give a warning event, never a failed call."""
        job = self._get_job(job_id)
        details = self._run_details(job_id)
        created = _ts(details.created_time_utc) or _ts(_created(job)) or 0
        events = [JobEvent(id=f"{job_id}:created", created_at=created, message="job created")]
        for i, note in enumerate(_stored_notes((job.properties or {}).get(_NOTES_PROPERTY))):
            events.append(JobEvent(id=f"{job_id}:note:{i}", created_at=created, level=note[0], message=note[1]))
        if _text(job.status).lower() == "notresponding":
            events.append(
                JobEvent(
                    id=f"{job_id}:not-responding",
                    created_at=_ts(details.last_modified_utc) or created,
                    level="warn",
                    message="Azure reports the job NotResponding: it lost contact with the job, which can recover; "
                    "the job reads running until Azure reports another state",
                )
            )
        started = _ts(details.start_time_utc)
        if started is not None:
            events.append(JobEvent(id=f"{job_id}:started", created_at=started, message="job started running"))
        modified = _ts(details.last_modified_utc) or started or created
        for i, warning in enumerate(details.warnings or []):
            text = redact(f"{warning.source or 'azure'}: {warning.message or ''}")
            events.append(JobEvent(id=f"{job_id}:warning:{i}", created_at=modified, level="warn", message=text))
        events.extend(self._metric_events(job, details, created))  # before the end, where they share its time
        ended = _ts(details.end_time_utc)
        if ended is not None:
            status = _text(job.status)
            level = "error" if _JOB_STATUS.get(status.lower()) == "failed" else "info"
            events.append(JobEvent(id=f"{job_id}:ended", created_at=ended, level=level, message=f"job {status}"))
            error = _run_error(details)
            if error is not None:
                events.append(
                    JobEvent(
                        id=f"{job_id}:error",
                        created_at=ended,
                        level="error",
                        message=f"{error.code}: {error.message}",
                    )
                )
        events.sort(key=lambda e: e.created_at)
        ids = [e.id for e in events]
        start = ids.index(after) + 1 if after in ids else 0
        return events[start : start + limit]

    def _metric_events(self, job: Any, details: Any, created: int) -> list[JobEvent]:
        """One ``metrics`` event per logged step (its ``data`` holds every metric logged at that step)."""
        job_id = str(job.name)
        try:
            points = self._metrics().points(job_id, str(job.experiment_name or EXPERIMENT))
        except NotFoundError:  # no run recorded in MLflow yet
            points = []
        except PhituneError as exc:
            return [
                JobEvent(
                    id=f"{job_id}:metrics-unreadable",
                    created_at=created,
                    level="warn",
                    message=f"the job's metrics could not be read from the workspace's MLflow tracking server: {exc}",
                )
            ]
        steps: dict[int, dict[str, Any]] = {}
        times: dict[int, int] = {}
        for point in points:
            steps.setdefault(point.step, {"step": point.step})[point.key] = point.value
            times[point.step] = max(times.get(point.step, 0), point.timestamp_ms // 1000)
        events = [
            JobEvent(
                id=f"{job_id}:metrics:{step}",
                created_at=times[step] or created,
                message=metrics_message(data),
                type="metrics",
                data=data,
            )
            for step, data in sorted(steps.items())
        ]
        ended = _ts(details.end_time_utc)
        if not events and ended is not None:
            events.append(
                JobEvent(
                    id=f"{job_id}:metrics-none",
                    created_at=ended,
                    message="Azure recorded no training metrics for this job in the workspace's MLflow tracking "
                    "server; the Azure AI Foundry portal shows what the service keeps on the job's page",
                )
            )
        return events

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """Always ``[]``: Azure fine-tuning jobs expose no intermediate checkpoints, only the registered model."""
        self._get_job(job_id)
        return []

    def _build_job(self, spec: JobSpec, name: str) -> Any:
        """The azure-ai-ml job for ``spec``, after the registry lookup (whose tags override the catalog's lifecycle,
        regions and allowed VM sizes), the workspace and region checks and the data checks. The notes it records
        (lifecycle warnings, how the batch maps to Azure's) become the job's first events."""
        from azure.ai.ml.finetuning import FineTuningTaskType, create_finetuning_job

        model_name, version, entry = _model_ref(spec.model)
        base = self._registry_model(model_name, version)
        tags = _tags(base)
        kind: catalog.OfferKind = "serverless_finetune" if spec.compute is None else "managed_finetune"
        offer = _live_offer(entry.offer(kind) if entry is not None else None, kind, tags)
        notes: list[tuple[str, str]] = []
        if offer is not None:
            _refuse_retired(offer, model_name, entry)
            notes.extend(_lifecycle_notes(offer, model_name))
        _check_learning_rate(spec.hyperparameters.learning_rate, tags)
        if spec.compute is None:
            kind_of_workspace = self._workspace()[2]
            if kind_of_workspace and kind_of_workspace != "project":
                raise ConflictError(
                    f"serverless fine-tuning needs an Azure AI Foundry hub-based project; workspace "
                    f"{self._ml.workspace_name} is a {kind_of_workspace!r} workspace"
                )
            self._check_region(model_name, offer, "serverless fine-tuning of")
            gpus = None
        else:
            vm_size, gpus = self._training_vm(spec.compute, model_name, offer)
        training = _asset_id(spec.training_file, "training_file")
        validation = _asset_id(spec.validation_file, "validation_file") if spec.validation_file else None
        task_name, examples = self._training_data(spec, training)
        hyperparameters, mapping = _hyperparameters(spec, gpus, examples)
        notes.append(("info", mapping if gpus is None else f"{mapping} of one {vm_size} node"))
        notes.extend(_azure_defaults_note(spec, tags))
        task = FineTuningTaskType.CHAT_COMPLETION
        if task_name == "text_completion":
            task = FineTuningTaskType.TEXT_COMPLETION
        key = name.removeprefix("phitune-")[:8]
        output = f"{model_name}-ft-{spec.suffix}-{key}" if spec.suffix else f"{model_name}-ft-{key}"
        compute = spec.compute
        job = create_finetuning_job(
            model=f"azureml://registries/{REGISTRY}/models/{model_name}/versions/{base.version}",
            task=task,
            training_data=training,
            # azure-ai-ml 1.35 raises UnboundLocalError when validation_data is omitted: pass one, then clear it.
            validation_data=validation or training,
            hyperparameters=hyperparameters,
            output_model_name_prefix=output,
            compute=compute.compute if compute is not None else None,
            instance_types=list(compute.instance_types) if compute is not None and compute.instance_types else None,
            job_tier=compute.job_tier if compute is not None else None,
            name=name,
            display_name=f"{model_name} {spec.suffix or key}",
            experiment_name=EXPERIMENT,
            properties={
                _SPEC_PROPERTY: spec.model_dump_json(),
                _NOTES_PROPERTY: json.dumps([{"level": level, "message": text} for level, text in notes]),
            },
        )
        if validation is None:
            job.validation_data = None
        return job

    def _training_vm(self, compute: AzureCompute, model: str, offer: catalog.Offer | None) -> tuple[str, int]:
        """(VM size, GPUs per node) a managed-compute job trains on, checked against the model's allowed sizes.
        A cluster's size is read from the workspace; of ``instance_types``, the allowed ones train (Azure runs the
        pipeline's other steps on the rest)."""
        if compute.compute is not None:
            cluster = compute.compute
            sizes = [str(self._call(lambda: self._ml.compute.get(cluster), "compute", cluster).size)]
        else:
            sizes = list(compute.instance_types or ())
        allowed = {size.lower() for size in (offer.compute_allow_list if offer is not None else ())}
        training = (
            [s for s in sizes if s.lower() in allowed] if allowed else [s for s in sizes if s.lower() in GPUS_PER_VM]
        )
        if allowed and not training:
            raise UnsupportedOptionError(
                "compute",
                BACKEND,
                f"{model} fine-tunes on {', '.join(offer.compute_allow_list if offer else ())}; "
                f"{', '.join(sizes)} is not among them",
            )
        counts = {GPUS_PER_VM.get(size.lower()) for size in training}
        if not training or None in counts or len(counts) > 1:
            raise UnsupportedOptionError(
                "compute",
                BACKEND,
                f"phitune maps batch_size (the global batch) to Azure's per-device batch from the GPUs of the training "
                f"VM, and cannot for {', '.join(sizes)}; use sizes with one known GPU count: "
                f"{', '.join(sorted(GPUS_PER_VM))}",
            )
        return training[0], cast(int, counts.pop())

    def _training_data(self, spec: JobSpec, training: str) -> tuple[str, int | None]:
        """The task (``spec.task``, checked against or else inferred from the format recorded at upload) and the
        number of training examples recorded at upload."""
        name, version = _asset_ref(training, "training_file")
        data = self._call(lambda: self._ml.data.get(name, version=version), "file", training)
        data_tags = data.tags or {}
        fmt = data_tags.get("phitune.format")
        inferred = None if fmt is None else ("chat_completion" if fmt == "chat" else "text_completion")
        if spec.task is None and inferred is None:
            raise SpecError("task", f"the format of {training} is unknown; pass chat_completion or text_completion")
        if spec.task is not None and inferred is not None and spec.task != inferred:
            raise SpecError("task", f"{spec.task} does not match the {fmt} data in {training}")
        examples = data_tags.get("phitune.examples")
        return spec.task or cast(str, inferred), int(examples) if examples else None

    def _get_job(self, job_id: str) -> Any:
        job = self._call(lambda: self._ml.jobs.get(job_id), "job", job_id)
        if _text(getattr(job, "type", "")).lower() != "finetuning":
            raise NotFoundError("job", job_id)
        return job

    def _run_details(self, job_id: str) -> Any:
        """Azure ML run history for the job: times, warnings and error (not in the ARM job resource)."""
        return self._call(lambda: self._ml.jobs._runs_operations.get_run_details(job_id), "job", job_id)

    def _job(self, job: Any, details: Any = None) -> FineTuneJob:
        azure_status = _text(job.status)
        status = _JOB_STATUS.get(azure_status.lower(), "queued")
        spec = _stored_spec((job.properties or {}).get(_SPEC_PROPERTY))
        registered = (job.outputs or {}).get("registered_model")
        error = None
        if status == "failed":
            error = _run_error(details) if details is not None else None
            error = error or JobError(code=azure_status, message=f"Azure reports the job {azure_status}")
        return FineTuneJob(
            id=job.name,
            created_at=_ts(_created(job)) or 0,
            status=status,
            model=spec.model if spec is not None else _path(job.model),
            training_file=spec.training_file if spec is not None else _path(job.training_data),
            validation_file=spec.validation_file if spec is not None else _path(job.validation_data) or None,
            fine_tuned_model=getattr(registered, "name", None) if status == "succeeded" else None,
            started_at=_ts(details.start_time_utc) if details is not None else None,
            finished_at=_ts(details.end_time_utc) if details is not None else None,
            error=error,
            seed=spec.hyperparameters.seed if spec is not None else 0,
            suffix=spec.suffix if spec is not None else None,
            backend=BACKEND,
            spec=spec,
            azure_status=azure_status,
        )
