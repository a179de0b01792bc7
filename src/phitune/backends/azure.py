"""Azure AI Foundry / Azure ML backend, through azure-ai-ml.

Jobs run as Azure ``FineTuning`` jobs: serverless (Models as a Service, MaaS) when ``spec.compute`` is None, or on
managed compute (Models as a Platform, MaaP) when it names a cluster or instance types. Fine-tuned models deploy as
serverless endpoints that answer OpenAI chat completions. azure-ai-ml is imported only when an :class:`AzureBackend`
is constructed; ``import phitune`` never imports azure.

What Azure does not expose (so neither does this backend): per-step metrics and training events (``list_events``
returns the run's lifecycle, warnings and error, plus one message saying so), intermediate checkpoints
(``list_checkpoints`` returns ``[]``), the number of trained tokens, and the step count. See docs/azure.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .. import catalog
from .._retry import RetryPolicy
from ..errors import (
    APIConnectionError,
    APIError,
    ConflictError,
    MissingDependencyError,
    NotFoundError,
    PhituneError,
    SpecError,
    UnsupportedOptionError,
    WaitTimeoutError,
    redact,
    status_error,
)
from ..types import (
    ChatCompletion,
    Checkpoint,
    DatasetReport,
    Deployment,
    FileObject,
    FineTuneJob,
    Hyperparameters,
    JobError,
    JobEvent,
    JobSpec,
    JobStatus,
    LoRA,
    ModelObject,
)

if TYPE_CHECKING:
    import openai
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential

T = TypeVar("T")

Uploader = Callable[[str, str], str]
"""``uploader(local_path, asset_name) -> uri``: store a dataset where Azure ML can read it (``azureml://datastores/...``
or ``https://...``) and return its URI. The default uploads through azure-ai-ml to the workspace's default datastore."""

BACKEND = "azure"
REGISTRY = "azureml"
REGIONS_TAG = "maas-finetuning-deploy-regions"
EXPERIMENT = "phitune"
_FILE_PREFIX = "phitune-"
_SPEC_PROPERTY = "phitune.spec"

_REGISTRY_MODEL = re.compile(
    r"^azureml://registries/(?P<registry>[^/]+)/models/(?P<name>[^/]+)(?:/versions/(?P<v>[^/]+))?$"
)
_ASSET = re.compile(r"^azureml:(?P<name>[^:/]+):(?P<v>[^:/]+)$")
_ASSET_PATH = re.compile(r"/(?:data|models)/(?P<name>[^/]+)/versions/(?P<v>[^/]+)$")

_JOB_STATUS: dict[str, JobStatus] = {
    "notstarted": "queued",
    "scheduled": "queued",
    "queued": "queued",
    "preparing": "queued",
    "starting": "queued",
    "provisioning": "queued",
    "running": "running",
    "finalizing": "running",
    "cancelrequested": "running",
    "completed": "succeeded",
    "failed": "failed",
    "notresponding": "failed",
    "canceled": "cancelled",
    "paused": "paused",
}
_PROVISIONING: dict[str, str] = {
    "creating": "creating",
    "updating": "creating",
    "succeeded": "succeeded",
    "failed": "failed",
    "canceled": "failed",
    "deleting": "deleting",
}
_TEXT_FORMATS = ("prompt_completion", "text_ground_truth")

# Hyperparameters -> Hugging Face TrainingArguments names, which Azure fine-tuning jobs take as strings.
_HF_NAMES = {
    "epochs": "num_train_epochs",
    "learning_rate": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_steps": "max_steps",
    "warmup_ratio": "warmup_ratio",
    "lr_scheduler": "lr_scheduler_type",
    "weight_decay": "weight_decay",
    "seed": "seed",
}
# Managed compute runs Azure ML's finetune pipeline component, which also takes these (and LoRA's, see below).
_MAAP_NAMES = {"max_seq_length": "max_seq_length", "max_grad_norm": "max_grad_norm"}


class AzureBackend:
    """Fine-tune, deploy and chat with Phi-3 models on Azure AI Foundry / Azure ML.

    Give ``subscription_id``, ``resource_group`` and ``workspace`` (an Azure AI Foundry hub-based project for
    serverless fine-tuning), or none of them to read ``config.json`` (``MLClient.from_config``), or an existing
    ``ml_client``. ``credential`` defaults to ``DefaultAzureCredential``. Clients built here leave retries to
    ``retry`` (a :class:`~phitune._retry.RetryPolicy`); for an ``ml_client`` of your own, pass ``retry_total=0`` to
    azure-ai-ml to avoid retrying twice. ``poll_interval`` is the pause between polls of a deployment being created
    or deleted.
    """

    name = BACKEND

    def __init__(
        self,
        *,
        subscription_id: str | None = None,
        resource_group: str | None = None,
        workspace: str | None = None,
        credential: TokenCredential | None = None,
        ml_client: MLClient | None = None,
        registry_ml_client: MLClient | None = None,
        uploader: Uploader | None = None,
        retry: RetryPolicy | None = None,
        poll_interval: float = 10.0,
    ) -> None:
        try:
            from azure.ai.ml import MLClient
            from azure.core.exceptions import ServiceRequestError, ServiceResponseError
        except ImportError as exc:
            raise MissingDependencyError("azure-ai-ml", "azure") from exc
        if ml_client is None:
            if credential is None:
                from azure.identity import DefaultAzureCredential

                credential = DefaultAzureCredential()
            given = {"subscription_id": subscription_id, "resource_group": resource_group, "workspace": workspace}
            if all(given.values()):
                ml_client = MLClient(
                    credential,
                    subscription_id=subscription_id,
                    resource_group_name=resource_group,
                    workspace_name=workspace,
                    retry_total=0,
                )
            elif any(given.values()):
                missing = next(key for key, value in given.items() if not value)
                raise SpecError(missing, "give subscription_id, resource_group and workspace together")
            else:
                ml_client = MLClient.from_config(credential=credential, retry_total=0)
        self._ml: Any = ml_client
        self._registry: Any = registry_ml_client
        self._uploader = uploader
        base = retry or RetryPolicy()
        self._retry = dataclasses.replace(base, transient=(*base.transient, ServiceRequestError, ServiceResponseError))
        self._poll_interval = poll_interval
        self._workspace_info: tuple[str, str, str] | None = None
        self._openai: dict[str, openai.OpenAI] = {}

    def __repr__(self) -> str:
        scope = self._ml._operation_scope
        return (
            f"AzureBackend(subscription_id={scope.subscription_id!r}, resource_group={scope.resource_group_name!r}, "
            f"workspace={self._ml.workspace_name!r})"
        )

    # ------------------------------------------------------------------------------------------------------ files
    def upload_file(self, path: str, *, report: DatasetReport) -> FileObject:
        """Register the dataset as a ``uri_file`` data asset named after the file and its SHA-256, so uploading the
        same content again returns the existing asset."""
        from azure.ai.ml.constants import AssetTypes
        from azure.ai.ml.entities import Data

        local = Path(path)
        digest = _sha256(local)
        name = f"{_FILE_PREFIX}{_slug(local.stem)}-{digest[:12]}"
        existing = self._find(lambda: self._ml.data.get(name, version="1"))
        if existing is not None:
            return _file_object(existing)
        tags = {
            "phitune.filename": local.name,
            "phitune.bytes": str(local.stat().st_size),
            "phitune.sha256": digest,
            "phitune.examples": str(report.examples),
        }
        if report.format is not None:
            tags["phitune.format"] = report.format
        uri = self._uploader(str(local), name) if self._uploader is not None else str(local)
        asset = Data(
            name=name,
            version="1",
            type=AssetTypes.URI_FILE,
            path=uri,
            description=f"phitune dataset {local.name}",
            tags=tags,
        )
        return _file_object(self._call(lambda: self._ml.data.create_or_update(asset)))

    def get_file(self, file_id: str) -> FileObject:
        name, version = _asset_ref(file_id, "file_id")
        return _file_object(self._call(lambda: self._ml.data.get(name, version=version), "file", file_id))

    def list_files(self) -> list[FileObject]:
        """The data assets phitune uploaded (names starting ``phitune-``), latest version of each."""
        containers = self._call(lambda: [c for c in self._ml.data.list() if c.name.startswith(_FILE_PREFIX)])
        return [self.get_file(f"azureml:{c.name}:{c.latest_version}") for c in containers]

    def delete_file(self, file_id: str) -> None:
        """Archive the data asset: Azure ML keeps data versions (jobs may reference them) and only hides them."""
        name, version = _asset_ref(file_id, "file_id")
        self._call(lambda: self._ml.data.archive(name, version=version), "file", file_id)

    # ------------------------------------------------------------------------------------------------------- jobs
    def check_spec(self, spec: JobSpec) -> None:
        """Refuse, before any request, whatever an Azure fine-tuning job cannot honour."""
        serverless = spec.compute is None
        where = "serverless fine-tuning (MaaS)" if serverless else "managed compute fine-tuning"
        _, _, entry = _model_ref(spec.model)
        if entry is not None and serverless and not entry.azure_serverless_finetune:
            raise UnsupportedOptionError(
                "model",
                BACKEND,
                f"{entry.name} does not offer serverless fine-tuning; serverless models: "
                f"{', '.join(m.name for m in catalog.MODELS if m.azure_serverless_finetune)}",
            )
        if spec.distributed.strategy != "none":
            raise UnsupportedOptionError("distributed", BACKEND, "Azure chooses the devices of a fine-tuning job")
        if not isinstance(spec.method, LoRA):
            raise UnsupportedOptionError(
                "method", BACKEND, f"{where} trains LoRA adapters only, not {spec.method.type!r}"
            )
        if spec.method.target_modules is not None:
            raise UnsupportedOptionError("method.target_modules", BACKEND, f"{where} chooses the LoRA target modules")
        if serverless:
            for field in ("r", "alpha", "dropout"):
                if getattr(spec.method, field) != LoRA.model_fields[field].default:
                    raise UnsupportedOptionError(
                        f"method.{field}", BACKEND, f"{where} does not take LoRA {field}; use managed compute"
                    )
        sent = set(_HF_NAMES) | (set() if serverless else set(_MAAP_NAMES))
        for field, info in Hyperparameters.model_fields.items():
            if field not in sent and getattr(spec.hyperparameters, field) != info.default:
                raise UnsupportedOptionError(f"hyperparameters.{field}", BACKEND, f"{where} does not take it")

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
        """The run's lifecycle from Azure's run history (created, started, warnings, ended, error), oldest first.
        Azure exposes no per-step metrics or training events here; one message event says so."""
        job = self._get_job(job_id)
        details = self._run_details(job_id)
        created = _ts(details.created_time_utc) or _ts(_created(job)) or 0
        events = [
            JobEvent(
                id=f"{job_id}:metrics-unavailable",
                created_at=created,
                message="Azure does not expose per-step metrics or training events through its API; the Azure AI "
                "Foundry portal shows them on the job's page",
            ),
            JobEvent(id=f"{job_id}:created", created_at=created, message="job created"),
        ]
        started = _ts(details.start_time_utc)
        if started is not None:
            events.append(JobEvent(id=f"{job_id}:started", created_at=started, message="job started running"))
        modified = _ts(details.last_modified_utc) or started or created
        for i, warning in enumerate(details.warnings or []):
            text = redact(f"{warning.source or 'azure'}: {warning.message or ''}")
            events.append(JobEvent(id=f"{job_id}:warning:{i}", created_at=modified, level="warn", message=text))
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

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """Always ``[]``: Azure fine-tuning jobs expose no intermediate checkpoints, only the registered model."""
        self._get_job(job_id)
        return []

    # -------------------------------------------------------------------------------------------------- models
    def get_model(self, model_id: str) -> ModelObject:
        """A model registered in the workspace (``name``, ``name:version``, ``azureml:name:version`` or its id)."""
        model = self._workspace_model(model_id)
        return _model_object(model, self._base_model(model))

    def list_models(self) -> list[ModelObject]:
        """Models registered in the workspace, latest version of each (no base model: :meth:`get_model` has it)."""
        containers = self._call(lambda: list(self._ml.models.list()))
        return [_model_object(self._workspace_model(f"azureml:{c.name}:{c.latest_version}"), None) for c in containers]

    # --------------------------------------------------------------------------------------------- deployments
    def create_deployment(self, model: str, name: str, **options: Any) -> Deployment:
        """Deploy a fine-tuned model as a serverless endpoint. Options: ``wait`` (default True: poll until it is
        no longer creating) and ``timeout`` (seconds, default 1800). The workspace region is checked first."""
        from azure.ai.ml.entities import ServerlessEndpoint

        wait = bool(options.pop("wait", True))
        timeout = float(options.pop("timeout", 1800.0))
        if options:
            raise UnsupportedOptionError(
                f"options.{next(iter(options))}", BACKEND, "serverless deployments take only wait and timeout"
            )
        registered = self._workspace_model(model)
        base = _REGISTRY_MODEL.match(self._base_model(registered) or "")
        if base is not None and base["registry"] == REGISTRY:
            tags = self._registry_model(base["name"], base["v"]).tags or {}
            entry = catalog.find(base["name"])
            self._check_region(base["name"], tags, entry, "serverless deployment of fine-tuned")
        location, workspace_id, _ = self._workspace()
        endpoint = ServerlessEndpoint(
            name=name,
            model_id=f"azureml://locations/{location}/workspaces/{workspace_id}/models/"
            f"{registered.name}/versions/{registered.version}",
        )
        endpoint.location = location
        self._call(lambda: self._ml.serverless_endpoints.begin_create_or_update(endpoint, polling=False))
        deployment = self.get_deployment(name)
        deadline = time.monotonic() + timeout
        while wait and deployment.status == "creating" and time.monotonic() < deadline:
            time.sleep(self._poll_interval)
            deployment = self.get_deployment(name)
        return deployment

    def get_deployment(self, name: str) -> Deployment:
        return _deployment(self._call(lambda: self._ml.serverless_endpoints.get(name), "deployment", name))

    def list_deployments(self) -> list[Deployment]:
        return [_deployment(e) for e in self._call(lambda: list(self._ml.serverless_endpoints.list()))]

    def delete_deployment(self, name: str) -> None:
        """Delete the endpoint and wait (up to 30 minutes) until it is gone; the fine-tuned model stays registered."""
        self._drop_openai(name)
        self._call(lambda: self._ml.serverless_endpoints.begin_delete(name, polling=False), "deployment", name)
        deadline = time.monotonic() + 1800.0
        while time.monotonic() < deadline:
            try:
                self.get_deployment(name)
            except NotFoundError:
                return
            time.sleep(self._poll_interval)
        raise WaitTimeoutError(f"deployment {name} is still being deleted after 30 minutes")

    def openai_client(self, name: str) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for the deployment's OpenAI-compatible route, holding its endpoint key."""
        if name not in self._openai:
            import openai

            endpoint = self._call(lambda: self._ml.serverless_endpoints.get(name), "deployment", name)
            if not endpoint.scoring_uri:
                raise ConflictError(f"deployment {name} has no scoring URI yet ({endpoint.provisioning_state})")
            keys = self._call(lambda: self._ml.serverless_endpoints.get_keys(name), "deployment", name)
            base_url = endpoint.scoring_uri.rstrip("/")
            self._openai[name] = openai.OpenAI(
                base_url=base_url if base_url.endswith("/v1") else f"{base_url}/v1",
                api_key=keys.primary_key,
                default_headers=dict(endpoint.headers or {}),
            )
        return self._openai[name]

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
        """POST ``{scoring_uri}/v1/chat/completions`` with the endpoint key; retried like every other call."""
        import openai

        client = self.openai_client(deployment).with_options(max_retries=0)
        policy = dataclasses.replace(self._retry, transient=(*self._retry.transient, openai.APIConnectionError))
        try:
            response = policy.call(
                lambda: client.chat.completions.create(
                    model=deployment,
                    messages=cast(Any, messages),
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=openai.omit if seed is None else seed,
                )
            )
        except openai.APIStatusError as exc:
            if exc.status_code == 401:
                self._drop_openai(deployment)
            raise status_error(exc.status_code, redact(exc.message, [client.api_key])) from None
        except openai.APIConnectionError as exc:
            raise APIConnectionError(f"deployment {deployment} did not answer: {type(exc).__name__}") from None
        return ChatCompletion.from_openai(response)

    def close(self) -> None:
        for name in list(self._openai):
            self._drop_openai(name)

    # ------------------------------------------------------------------------------------------------ internals
    def _call(self, fn: Callable[[], T], kind: str | None = None, ident: str | None = None) -> T:
        """Run one service call under the retry policy; Azure's exceptions become phitune's."""
        try:
            return self._retry.call(fn)
        except PhituneError:
            raise
        except Exception as exc:
            raise _translate(exc, kind, ident) from None

    def _find(self, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None where Azure answers 404."""
        try:
            return self._call(fn, "object", "")
        except NotFoundError:
            return None

    def _workspace(self) -> tuple[str, str, str]:
        """(location, workspace GUID, kind) of the workspace, read once."""
        if self._workspace_info is None:
            ws = self._call(lambda: self._ml.workspaces.get(self._ml.workspace_name))
            self._workspace_info = (str(ws.location).lower(), str(ws._workspace_id), str(ws._kind or "").lower())
        return self._workspace_info

    def _registry_client(self) -> Any:
        if self._registry is None:
            from azure.ai.ml import MLClient

            shared = {k: v for k, v in self._ml._kwargs.items() if k in ("transport", "retry_total", "cloud")}
            self._registry = MLClient(self._ml._credential, registry_name=REGISTRY, **shared)
        return self._registry

    def _registry_model(self, name: str, version: str | None) -> Any:
        """The base model from the ``azureml`` registry: the given version, else the latest."""
        models = self._registry_client().models
        get: Callable[[], Any] = (
            (lambda: models.get(name, version=version)) if version else (lambda: models.get(name, label="latest"))
        )
        return self._call(get, "model", f"azureml://registries/{REGISTRY}/models/{name}")

    def _check_region(self, model: str, tags: dict[str, str], entry: catalog.CatalogModel | None, what: str) -> None:
        """Refuse when the workspace region is not among the model's ``maas-finetuning-deploy-regions`` (the registry
        tag, else the catalog's regions); with neither known, Azure decides."""
        regions = tuple(re.findall(r"[a-z0-9]+", tags.get(REGIONS_TAG, "").lower()))
        regions = regions or (entry.azure_deploy_regions if entry is not None else ())
        location = self._workspace()[0]
        if regions and location not in regions:
            raise UnsupportedOptionError(
                "model",
                BACKEND,
                f"{what} {model} is offered in {', '.join(regions)}; workspace {self._ml.workspace_name} is in "
                f"{location}. Use a hub-based project in one of: {', '.join(regions)}",
            )

    def _build_job(self, spec: JobSpec, name: str) -> Any:
        """The azure-ai-ml job for ``spec``, after the registry lookup, the region check and the data checks."""
        from azure.ai.ml.finetuning import FineTuningTaskType, create_finetuning_job

        model_name, version, entry = _model_ref(spec.model)
        base = self._registry_model(model_name, version)
        if spec.compute is None:
            kind = self._workspace()[2]
            if kind and kind != "project":
                raise ConflictError(
                    f"serverless fine-tuning needs an Azure AI Foundry hub-based project; workspace "
                    f"{self._ml.workspace_name} is a {kind!r} workspace"
                )
            self._check_region(model_name, base.tags or {}, entry, "serverless fine-tuning of")
        training = _asset_id(spec.training_file, "training_file")
        validation = _asset_id(spec.validation_file, "validation_file") if spec.validation_file else None
        task = FineTuningTaskType.CHAT_COMPLETION
        if self._task(spec, training) == "text_completion":
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
            hyperparameters=_hyperparameters(spec),
            output_model_name_prefix=output,
            compute=compute.compute if compute is not None else None,
            instance_types=list(compute.instance_types) if compute is not None and compute.instance_types else None,
            job_tier=compute.job_tier if compute is not None else None,
            name=name,
            display_name=f"{model_name} {spec.suffix or key}",
            experiment_name=EXPERIMENT,
            properties={_SPEC_PROPERTY: spec.model_dump_json()},
        )
        if validation is None:
            job.validation_data = None
        return job

    def _task(self, spec: JobSpec, training: str) -> str:
        """``spec.task``, checked against (or else inferred from) the format phitune recorded at upload."""
        name, version = _asset_ref(training, "training_file")
        data = self._call(lambda: self._ml.data.get(name, version=version), "file", training)
        fmt = (data.tags or {}).get("phitune.format")
        inferred = None if fmt is None else ("chat_completion" if fmt == "chat" else "text_completion")
        if spec.task is None and inferred is None:
            raise SpecError("task", f"the format of {training} is unknown; pass chat_completion or text_completion")
        if spec.task is not None and inferred is not None and spec.task != inferred:
            raise SpecError("task", f"{spec.task} does not match the {fmt} data in {training}")
        return spec.task or cast(str, inferred)

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

    def _workspace_model(self, model_id: str) -> Any:
        """A registered workspace model by ``name``, ``name:version``, ``azureml:name:version`` or asset id."""
        match = _ASSET.match(model_id) or _ASSET_PATH.search(model_id)
        if match:
            name, version = match["name"], match["v"]
        else:
            name, _, version = model_id.partition(":")
        return self._call(
            (lambda: self._ml.models.get(name, version=version))
            if version
            else (lambda: self._ml.models.get(name, label="latest")),
            "model",
            model_id,
        )

    def _base_model(self, model: Any) -> str | None:
        """The registry id of the base model a fine-tuned model came from (via the job that registered it)."""
        if not model.job_name:
            return None
        job = self._find(lambda: self._ml.jobs.get(model.job_name))
        return _path(getattr(job, "model", None)) or None

    def _drop_openai(self, name: str) -> None:
        client = self._openai.pop(name, None)
        if client is not None:
            client.close()


# ------------------------------------------------------------------------------------------------------- helpers
def _model_ref(model: str) -> tuple[str, str | None, catalog.CatalogModel | None]:
    """(registry model name, version or None for latest, catalog entry) for a catalog name or an azureml id."""
    match = _REGISTRY_MODEL.match(model)
    if match:
        if match["registry"] != REGISTRY:
            raise UnsupportedOptionError(
                "model", BACKEND, f"only models of the {REGISTRY!r} registry (no marketplace subscription needed)"
            )
        name, version = match["name"], match["v"]
        entry = catalog.find(name)
    else:
        entry = catalog.find(model)
        if entry is None or entry.azure_name is None:
            known = ", ".join(m.name for m in catalog.MODELS if m.azure_name)
            raise UnsupportedOptionError(
                "model",
                BACKEND,
                f"{model!r} is not an Azure model phitune knows; use one of {known} "
                f"or an azureml://registries/{REGISTRY}/models/<name> id",
            )
        name, version = entry.azure_name, None
    if entry is not None and BACKEND not in entry.backends:
        raise UnsupportedOptionError("model", BACKEND, f"{entry.name} is not available on Azure")
    return name, version, entry


def _hyperparameters(spec: JobSpec) -> dict[str, str]:
    """The Azure ``Dict[str, str]`` of Hugging Face TrainingArguments names (plus LoRA's on managed compute)."""
    hp = spec.hyperparameters
    names = _HF_NAMES if spec.compute is None else {**_HF_NAMES, **_MAAP_NAMES}
    out = {azure: _string(getattr(hp, ours)) for ours, azure in names.items() if getattr(hp, ours) is not None}
    if spec.compute is not None:
        if hp.max_grad_norm is None:
            out["max_grad_norm"] = "0"  # Hugging Face: 0 turns clipping off
        method = cast(LoRA, spec.method)
        out.update(apply_lora="true", lora_r=str(method.r), lora_alpha=str(method.alpha))
        out["lora_dropout"] = _string(method.dropout)
    return out


def _string(value: object) -> str:
    """A hyperparameter as Azure takes it: decimals without exponents, booleans lower-case."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(Decimal(repr(value)).normalize(), "f")
    return str(value)


def _asset_ref(file_id: str, field: str) -> tuple[str, str]:
    """(name, version) of a data asset id (``azureml:name:version`` or an ARM asset id)."""
    match = _ASSET.match(file_id) or _ASSET_PATH.search(file_id)
    if match is None:
        raise SpecError(field, f"{file_id!r} is not an Azure data asset id; upload it with client.files.upload")
    return match["name"], match["v"]


def _asset_id(file_id: str, field: str) -> str:
    name, version = _asset_ref(file_id, field)
    return f"azureml:{name}:{version}"


def _file_object(data: Any) -> FileObject:
    tags = data.tags or {}
    fmt = tags.get("phitune.format")
    return FileObject(
        id=f"azureml:{data.name}:{data.version}",
        bytes=int(tags.get("phitune.bytes", 0)),
        created_at=_ts(_created(data)) or 0,
        filename=tags.get("phitune.filename") or str(data.path).rsplit("/", 1)[-1],
        format=fmt if fmt in ("chat", *_TEXT_FORMATS) else None,
        examples=int(tags["phitune.examples"]) if "phitune.examples" in tags else None,
        sha256=tags.get("phitune.sha256"),
        asset_path=str(data.path),
    )


def _model_object(model: Any, base: str | None) -> ModelObject:
    return ModelObject(
        id=model.name,
        created=_ts(_created(model)) or 0,
        owned_by=BACKEND,
        kind="full",
        base_model=base,
        job_id=model.job_name,
        version=model.version,
        asset_id=f"azureml:{model.name}:{model.version}",
    )


def _deployment(endpoint: Any) -> Deployment:
    model_id = str(endpoint.model_id or "")
    match = _ASSET_PATH.search(model_id)
    state = str(endpoint.provisioning_state or "").lower()
    return Deployment(
        name=endpoint.name,
        model=match["name"] if match else model_id,
        status=_PROVISIONING.get(state, "creating"),
        created_at=_ts(_created(endpoint)) or 0,
        endpoint=endpoint.scoring_uri,
        engine="azure-serverless",
        backend=BACKEND,
        model_id=model_id,
    )


def _run_error(details: Any) -> JobError | None:
    root = getattr(getattr(details, "error", None), "error", None)
    if root is None:
        return None
    return JobError(code=root.code or "error", message=redact(root.message or "no message"), param=root.target)


def _translate(exc: Exception, kind: str | None, ident: str | None) -> PhituneError:
    """A phitune error for an Azure SDK exception, with secrets redacted."""
    from azure.ai.ml.exceptions import ValidationErrorType, ValidationException
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    missing = isinstance(exc, ValidationException) and exc.error_type == ValidationErrorType.RESOURCE_NOT_FOUND
    if missing and kind is not None and ident is not None:  # e.g. no latest version of a named asset
        return NotFoundError(kind, ident)
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        if exc.status_code == 404 and kind is not None and ident is not None:
            return NotFoundError(kind, ident)
        response = getattr(exc, "response", None)
        request_id = response.headers.get("x-ms-request-id") if response is not None else None
        return status_error(exc.status_code, redact(str(exc.message)), request_id=request_id)
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return APIConnectionError(f"Azure did not answer: {type(exc).__name__}")
    return APIError(redact(f"azure-ai-ml: {type(exc).__name__}: {exc}"))


def _stored_spec(raw: str | None) -> JobSpec | None:
    if not raw:
        return None
    try:
        return JobSpec.model_validate_json(raw)
    except ValueError:
        return None


def _created(obj: Any) -> Any:
    context = getattr(obj, "creation_context", None) or getattr(obj, "system_data", None)
    return getattr(context, "created_at", None)


def _path(value: Any) -> str:
    return str(getattr(value, "path", None) or getattr(value, "uri", None) or "")


def _text(value: Any) -> str:
    """An Azure enum or string as its plain value."""
    return str(getattr(value, "value", value) or "")


def _ts(value: Any) -> int | None:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(value.timestamp()) if isinstance(value, datetime) else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40] or "data"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
