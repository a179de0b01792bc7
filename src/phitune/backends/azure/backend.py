"""Azure AI Foundry / Azure ML backend, through azure-ai-ml.

Jobs run as Azure ``FineTuning`` jobs: serverless (Models as a Service, MaaS) when ``spec.compute`` is None, or on
managed compute (Models as a Platform, MaaP) when it names a cluster or instance types. Each model's offers and their
lifecycle come from :mod:`phitune.catalog`, overridden by the registry model's tags at create time: a retired offer is
refused before anything is sent, a legacy or deprecated one warns. A model fine-tuned serverless deploys as a
serverless endpoint; one fine-tuned on managed compute as a managed online endpoint and deployment. Both answer OpenAI
chat completions. azure-ai-ml is imported only when an :class:`AzureBackend` is constructed; ``import phitune`` never
imports azure.

``list_events`` returns the run's lifecycle, warnings and error from the run history and the training metrics the
pipeline logged to the workspace's MLflow tracking server (:mod:`phitune.backends.azure.metrics`). What Azure does
not expose (so neither does this backend): intermediate checkpoints (``list_checkpoints`` returns ``[]``), the number
of trained tokens, and the step count. See docs/azure.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ... import catalog
from ..._retry import RetryPolicy
from ...errors import (
    APIConnectionError,
    APIError,
    ConflictError,
    MissingDependencyError,
    NotFoundError,
    OfferLifecycleWarning,
    OfferRetiredError,
    PhituneError,
    SpecError,
    UnsupportedOptionError,
    WaitTimeoutError,
    redact,
    status_error,
)
from ...types import (
    AzureCompute,
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
    metrics_message,
)
from ..base import Capabilities
from .metrics import WorkspaceMetrics

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
    "notresponding": "running",  # Azure lost contact with the job; it can recover
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

# What each offer takes: phitune's hyperparameter -> the Azure name. Serverless takes the names of Microsoft's MaaS
# notebook only; managed compute runs Azure ML's chat_completion pipeline component, whose inputs these are.
_SERVERLESS_NAMES = {
    "epochs": "num_train_epochs",
    "learning_rate": "learning_rate",
    "batch_size": "per_device_train_batch_size",
}
_MANAGED_NAMES = {
    **_SERVERLESS_NAMES,
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_steps": "max_steps",
    "warmup_ratio": "warmup_steps",
    "lr_scheduler": "lr_scheduler_type",
    "weight_decay": "weight_decay",
    "seed": "seed",
    "max_grad_norm": "max_grad_norm",
}
# GPUs per node of the VM sizes Azure lists for fine-tuning and inference of Phi models (Azure's VM size pages).
GPUS_PER_VM: dict[str, int] = {
    "standard_nc6s_v3": 1,
    "standard_nc12s_v3": 2,
    "standard_nc24s_v3": 4,
    "standard_nd40rs_v2": 8,
    "standard_nc24ads_a100_v4": 1,
    "standard_nc48ads_a100_v4": 2,
    "standard_nc96ads_a100_v4": 4,
    "standard_nd96asr_v4": 8,
    "standard_nd96amsr_a100_v4": 8,
    "standard_nc40ads_h100_v5": 1,
    "standard_nc80adis_h100_v5": 2,
    "standard_nd96isr_h100_v5": 8,
}
# Registry tags that carry an offer's lifecycle: (offer, Lifecycle field) per tag.
_LIFECYCLE_TAGS: dict[str, tuple[tuple[catalog.OfferKind, str], ...]] = {
    "FinetuneDeprecationDate": (("serverless_finetune", "deprecated"), ("managed_finetune", "deprecated")),
    "FinetuneRetirementDate": (("serverless_finetune", "retired"),),
    "InferenceLegacyDate": (("serverless_deploy", "legacy"),),
    "InferenceDeprecationDate": (("serverless_deploy", "deprecated"),),
    "InferenceRetirementDate": (("serverless_deploy", "retired"),),
}
ALLOW_LIST_TAG = "finetune_compute_allow_list"
DEFAULTS_TAG = "model_specific_defaults"
_NOTES_PROPERTY = "phitune.notes"
_ONLINE_DEPLOYMENT = "default"
_SERVERLESS_ENGINE = "azure-serverless"
_ONLINE_ENGINE = "azure-managed-online"
_FOREIGN_MODEL = re.compile(
    r"^azureml://locations/(?P<location>[^/]+)/workspaces/(?P<workspace>[^/]+)/models/(?P<name>[^/]+)"
    r"/versions/(?P<v>[^/]+)$"
)


class AzureBackend:
    """Fine-tune, deploy and chat with Phi-3 models on Azure AI Foundry / Azure ML.

    Give ``subscription_id``, ``resource_group`` and ``workspace`` (an Azure AI Foundry hub-based project for
    serverless fine-tuning; any Azure ML workspace for managed compute), or none of them to read ``config.json``
    (``MLClient.from_config``), or an existing ``ml_client``. ``credential`` defaults to ``DefaultAzureCredential``.
    ``transport`` is an azure-core ``HttpTransport`` for every request the clients built here send, the dataset
    uploads included (a proxy-aware or test transport). Clients built here leave retries to ``retry`` (a
    :class:`~phitune._retry.RetryPolicy`); for an ``ml_client`` of your own, pass ``retry_total=0`` to azure-ai-ml to
    avoid retrying twice. ``uploader`` replaces the default upload to the workspace's default blob datastore.
    ``poll_interval`` is the pause between polls of a deployment being created or deleted.
    """

    name = BACKEND
    capabilities = Capabilities(openai_endpoint=True)
    home: Path | None = None

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
        transport: Any = None,
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
            sdk_options: dict[str, Any] = {"retry_total": 0}
            if transport is not None:
                sdk_options["transport"] = transport
            if all(given.values()):
                ml_client = MLClient(
                    credential,
                    subscription_id=subscription_id,
                    resource_group_name=resource_group,
                    workspace_name=workspace,
                    **sdk_options,
                )
            elif any(given.values()):
                missing = next(key for key, value in given.items() if not value)
                raise SpecError(missing, "give subscription_id, resource_group and workspace together")
            else:
                ml_client = MLClient.from_config(credential=credential, **sdk_options)
        self._ml: Any = ml_client
        self._registry: Any = registry_ml_client
        self._uploader = uploader
        self._transport = transport if transport is not None else ml_client._kwargs.get("transport")
        base = retry or RetryPolicy()
        self._retry = dataclasses.replace(base, transient=(*base.transient, ServiceRequestError, ServiceResponseError))
        self._poll_interval = poll_interval
        self._workspace_info: tuple[str, str, str] | None = None
        self._openai: dict[str, openai.OpenAI] = {}
        self._workspace_metrics: WorkspaceMetrics | None = None

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
        uri = self._uploader(str(local), name) if self._uploader is not None else self._upload_to_datastore(local, name)
        asset = Data(
            name=name,
            version="1",
            type=AssetTypes.URI_FILE,
            path=uri,
            description=f"phitune dataset {local.name}",
            tags=tags,
        )
        return _file_object(self._call(lambda: self._ml.data.create_or_update(asset)))

    def _upload_to_datastore(self, path: Path, asset: str) -> str:
        """Upload to the workspace's default blob datastore at ``phitune/<asset>/<file name>`` (azure-storage-blob,
        through this backend's transport, with the datastore's key or SAS, else the Azure AD credential) and return
        the ``azureml://datastores/...`` URI Azure ML reads it from."""
        from azure.ai.ml.entities import AccountKeyConfiguration, SasTokenConfiguration
        from azure.core.credentials import AzureNamedKeyCredential
        from azure.storage.blob import BlobClient

        store = self._call(lambda: self._ml.datastores.get_default(include_secrets=True))
        secret = store.credentials
        credential: Any = self._ml._credential
        if isinstance(secret, AccountKeyConfiguration) and secret.account_key:
            credential = AzureNamedKeyCredential(store.account_name, secret.account_key)
        elif isinstance(secret, SasTokenConfiguration) and secret.sas_token:
            credential = secret.sas_token
        blob_name = f"phitune/{asset}/{path.name}"
        options: dict[str, Any] = {}
        if self._transport is not None:
            options["transport"] = self._transport
        options["retry_total"] = 0  # retried by self._retry, from the start of the file
        blob = BlobClient(
            f"{store.protocol}://{store.account_name}.blob.{store.endpoint}",
            str(store.container_name),
            blob_name,
            credential=credential,
            **options,
        )
        with blob, open(path, "rb") as fh:

            def upload() -> None:
                fh.seek(0)
                blob.upload_blob(fh, overwrite=True)

            self._call(upload)
        return f"azureml://datastores/{store.name}/paths/{blob_name}"

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

    # -------------------------------------------------------------------------------------------------- models
    def get_model(self, model_id: str) -> ModelObject:
        """A model registered in the workspace (``name``, ``name:version``, ``azureml:name:version`` or its id)."""
        model = self._workspace_model(model_id)
        return _model_object(model, self._base_model(model), self._workspace())

    def list_models(self) -> list[ModelObject]:
        """Models registered in the workspace, latest version of each (no base model: :meth:`get_model` has it)."""
        containers = self._call(lambda: list(self._ml.models.list()))
        workspace = self._workspace()
        return [
            _model_object(self._workspace_model(f"azureml:{c.name}:{c.latest_version}"), None, workspace)
            for c in containers
        ]

    # --------------------------------------------------------------------------------------------- deployments
    def create_deployment(self, model: str, name: str, **options: Any) -> Deployment:
        """Deploy a fine-tuned model: as a serverless endpoint where it was fine-tuned serverless, as a managed online
        endpoint and deployment where it was fine-tuned on managed compute.

        ``model`` is a workspace model (``name``, ``name:version``, ``azureml:name:version``), or, to deploy into this
        client's project a model fine-tuned in another project, region or subscription of the same tenant, that
        model's ``azureml://locations/<region>/workspaces/<workspace id>/models/<name>/versions/<v>`` id (its
        :attr:`~phitune.types.ModelObject.deploy_id`); pass ``base_model`` (the catalog name it was fine-tuned from) so
        the region is checked before the request. Options: ``instance_type`` (required for a managed-compute model,
        e.g. ``Standard_NC24ads_A100_v4``) and ``instance_count`` (default 1); ``wait`` (default True: poll until it
        is no longer creating) and ``timeout`` (seconds, default 1800)."""
        wait = bool(options.pop("wait", True))
        timeout = float(options.pop("timeout", 1800.0))
        instance_type = options.pop("instance_type", None)
        instance_count = int(options.pop("instance_count", 1))
        base_model = options.pop("base_model", None)
        if options:
            raise UnsupportedOptionError(
                f"options.{next(iter(options))}",
                BACKEND,
                "deployments take instance_type, instance_count, base_model, wait and timeout",
            )
        location, workspace_id, _ = self._workspace()
        foreign = _FOREIGN_MODEL.match(model)
        if foreign is not None and foreign["workspace"] != workspace_id:
            model_id, base, managed = model, base_model, False
        else:
            registered = self._workspace_model(model)
            job = self._find(lambda: self._ml.jobs.get(registered.job_name)) if registered.job_name else None
            spec = _stored_spec((job.properties or {}).get(_SPEC_PROPERTY)) if job is not None else None
            managed = spec is not None and spec.compute is not None
            base = base_model or (_path(getattr(job, "model", None)) if job is not None else None)
            model_id = (
                f"azureml://locations/{location}/workspaces/{workspace_id}/models/"
                f"{registered.name}/versions/{registered.version}"
            )
        if managed:
            if instance_type is None:
                raise SpecError(
                    "options.instance_type",
                    f"{model} was fine-tuned on managed compute and deploys to a managed online endpoint: give "
                    f"instance_type, e.g. Standard_NC24ads_A100_v4",
                )
            self._create_online_deployment(name, registered, str(instance_type), instance_count)
        else:
            if instance_type is not None:
                raise UnsupportedOptionError(
                    "options.instance_type",
                    BACKEND,
                    f"{model} was fine-tuned serverless and deploys to a serverless endpoint, which takes no "
                    f"instance type",
                )
            self._check_serverless_deployment(base)
            existing = self._call(lambda: list(self._ml.serverless_endpoints.list()))
            twin = next((e.name for e in existing if e.model_id == model_id and e.name != name), None)
            if twin is not None:
                raise ConflictError(f"{model} already has a serverless deployment, {twin}: Azure allows one per model")
            self._create_serverless_endpoint(name, model_id, location)
        deployment = self.get_deployment(name)
        deadline = time.monotonic() + timeout
        while wait and deployment.status == "creating" and time.monotonic() < deadline:
            time.sleep(self._poll_interval)
            deployment = self.get_deployment(name)
        return deployment

    def _check_serverless_deployment(self, base: str | None) -> None:
        """The serverless deployment offer of the base model: refused where retired or outside the workspace's
        region, warned where legacy or deprecated. Without a known base, Azure decides."""
        match = _REGISTRY_MODEL.match(base or "")
        if match is not None and match["registry"] == REGISTRY:
            name, version = match["name"], match["v"]
        elif base and (entry := catalog.find(base)) is not None and entry.azure_name:
            name, version = entry.azure_name, None
        else:
            return
        entry = catalog.find(name)
        tags = _tags(self._registry_model(name, version))
        offer = _live_offer(entry.offer("serverless_deploy") if entry is not None else None, "serverless_deploy", tags)
        if offer is not None:
            _refuse_retired(offer, name, entry)
            _lifecycle_notes(offer, name)
        self._check_region(name, offer, "serverless deployment of fine-tuned")

    def _create_serverless_endpoint(self, name: str, model_id: str, location: str) -> None:
        from azure.ai.ml.entities import ServerlessEndpoint

        endpoint = ServerlessEndpoint(name=name, model_id=model_id)
        endpoint.location = location
        self._call(lambda: self._ml.serverless_endpoints.begin_create_or_update(endpoint, polling=False))

    def _create_online_deployment(self, name: str, registered: Any, instance_type: str, count: int) -> None:
        """A key-authenticated managed online endpoint with one deployment of the model taking all its traffic, as
        Microsoft's managed-compute notebook creates it."""
        from azure.ai.ml.entities import (
            ManagedOnlineDeployment,
            ManagedOnlineEndpoint,
            OnlineRequestSettings,
            ProbeSettings,
        )

        endpoint = ManagedOnlineEndpoint(
            name=name,
            auth_mode="key",
            description=f"phitune: {registered.name}",
            tags={"phitune.model": registered.name},
        )
        self._call(lambda: self._ml.online_endpoints.begin_create_or_update(endpoint).result())
        deployment = ManagedOnlineDeployment(
            name=_ONLINE_DEPLOYMENT,
            endpoint_name=name,
            model=f"azureml:{registered.name}:{registered.version}",
            instance_type=instance_type,
            instance_count=count,
            liveness_probe=ProbeSettings(initial_delay=600),
            request_settings=OnlineRequestSettings(request_timeout_ms=90000),
        )
        self._call(lambda: self._ml.online_deployments.begin_create_or_update(deployment).result())
        endpoint.traffic = {_ONLINE_DEPLOYMENT: 100}
        self._call(lambda: self._ml.online_endpoints.begin_create_or_update(endpoint).result())

    def get_deployment(self, name: str) -> Deployment:
        """A serverless endpoint, else a managed online endpoint, of this name."""
        serverless = self._find(lambda: self._ml.serverless_endpoints.get(name))
        if serverless is not None:
            return _deployment(serverless)
        return _online_deployment(self._call(lambda: self._ml.online_endpoints.get(name), "deployment", name))

    def list_deployments(self) -> list[Deployment]:
        serverless = [_deployment(e) for e in self._call(lambda: list(self._ml.serverless_endpoints.list()))]
        online = [_online_deployment(e) for e in self._call(lambda: list(self._ml.online_endpoints.list()))]
        return serverless + online

    def delete_deployment(self, name: str) -> None:
        """Delete the endpoint and wait (up to 30 minutes) until it is gone; the fine-tuned model stays registered."""
        self._drop_openai(name)
        if self.get_deployment(name).engine == _SERVERLESS_ENGINE:
            self._call(lambda: self._ml.serverless_endpoints.begin_delete(name, polling=False), "deployment", name)
        else:
            self._call(lambda: self._ml.online_endpoints.begin_delete(name), "deployment", name)
        deadline = time.monotonic() + 1800.0
        while time.monotonic() < deadline:
            try:
                self.get_deployment(name)
            except NotFoundError:
                return
            time.sleep(self._poll_interval)
        raise WaitTimeoutError(f"deployment {name} is still being deleted after 30 minutes")

    def openai_client(self, name: str) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for the deployment's OpenAI-compatible route (``{scoring_uri}/v1``), holding
        its endpoint key."""
        if name not in self._openai:
            import openai

            serverless = self._find(lambda: self._ml.serverless_endpoints.get(name))
            if serverless is not None:
                uri, headers = serverless.scoring_uri, dict(serverless.headers or {})
                state = serverless.provisioning_state
                keys = self._call(lambda: self._ml.serverless_endpoints.get_keys(name), "deployment", name)
            else:
                online = self._call(lambda: self._ml.online_endpoints.get(name), "deployment", name)
                uri, headers, state = online.scoring_uri, {}, online.provisioning_state
                keys = self._call(lambda: self._ml.online_endpoints.get_keys(name), "deployment", name)
            if not uri:
                raise ConflictError(f"deployment {name} has no scoring URI yet ({state})")
            base_url = uri.rstrip("/")
            self._openai[name] = openai.OpenAI(
                base_url=base_url if base_url.endswith("/v1") else f"{base_url}/v1",
                api_key=keys.primary_key,
                default_headers=headers,
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

    def _metrics(self) -> WorkspaceMetrics:
        """The reader of the workspace's MLflow tracking server, built once."""
        if self._workspace_metrics is None:
            from azure.ai.ml._azure_environments import _resource_to_scopes

            ws = self._call(lambda: self._ml.workspaces.get(self._ml.workspace_name))
            self._workspace_metrics = WorkspaceMetrics(
                str(ws.mlflow_tracking_uri),
                credential=self._ml._credential,
                scopes=_resource_to_scopes(self._ml._base_url),
                transport=self._transport,
                call=lambda send, route: self._call(send, "MLflow object", route),
            )
        return self._workspace_metrics

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

    def _check_region(self, model: str, offer: catalog.Offer | None, what: str) -> None:
        """Refuse when the workspace region is not among the offer's regions (the registry's
        ``maas-finetuning-deploy-regions`` tag, else the catalog's); with neither known, Azure decides."""
        regions = offer.regions if offer is not None else ()
        location = self._workspace()[0]
        if regions and location not in regions:
            raise UnsupportedOptionError(
                "model",
                BACKEND,
                f"{what} {model} is offered in {', '.join(regions)}; workspace {self._ml.workspace_name} is in "
                f"{location}. Use a hub-based project in one of: {', '.join(regions)}",
            )

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


def _hyperparameters(spec: JobSpec, gpus: int | None, examples: int | None) -> tuple[dict[str, str], str]:
    """The Azure ``Dict[str, str]`` for the spec, and a sentence saying how ``batch_size`` maps to Azure's batch.

    ``gpus`` is None for serverless (Azure's names from its MaaS notebook only), else the GPUs of the managed-compute
    node (the pipeline component's names, LoRA's, ``warmup_steps`` from ``warmup_ratio`` over the steps of
    :meth:`~phitune.types.Hyperparameters.plan`, as the local trainer counts them, and the global ``batch_size``
    split over the GPUs)."""
    hp = spec.hyperparameters
    if gpus is None:
        out = {azure: _string(getattr(hp, ours)) for ours, azure in _SERVERLESS_NAMES.items()}
        mapping = (
            f"batch_size {hp.batch_size} is sent as per_device_train_batch_size={hp.batch_size}; Azure does not "
            f"disclose how many devices a serverless job uses, so its global batch is {hp.batch_size} x that count"
        )
        return out, mapping
    if hp.batch_size % gpus:
        raise SpecError(
            "hyperparameters.batch_size",
            f"the global batch of {hp.batch_size} cannot be split evenly over {gpus} GPUs; use a multiple of {gpus}",
        )
    per_device = hp.batch_size // gpus
    out = {
        "num_train_epochs": str(hp.epochs),
        "learning_rate": _string(hp.learning_rate),
        "per_device_train_batch_size": str(per_device),
        "gradient_accumulation_steps": str(hp.gradient_accumulation_steps),
        "lr_scheduler_type": hp.lr_scheduler,
        "weight_decay": _string(hp.weight_decay),
        "seed": str(hp.seed),
        "max_grad_norm": _string(hp.max_grad_norm) if hp.max_grad_norm is not None else "0",  # 0: no clipping (HF)
    }
    if hp.max_steps is not None:
        out["max_steps"] = str(hp.max_steps)
    if hp.warmup_ratio > 0:
        if examples is None and hp.max_steps is None:
            raise SpecError(
                "hyperparameters.warmup_ratio",
                "managed compute takes warmup_steps, and the training file records no example count to compute "
                "them from; upload it with client.files.upload or set max_steps",
            )
        warmup = int(hp.warmup_ratio * hp.plan(examples or 1).total_steps)
        out["warmup_steps"] = str(warmup)
        if hp.lr_scheduler == "constant" and warmup:
            out["lr_scheduler_type"] = "constant_with_warmup"  # phitune's constant schedule warms up first
    method = cast(LoRA, spec.method)
    out.update(apply_lora="true", lora_r=str(method.r), lora_alpha=str(method.alpha))
    out["lora_dropout"] = _string(method.dropout)
    mapping = (
        f"batch_size {hp.batch_size} is the global batch: per_device_train_batch_size={per_device} on {gpus} GPU(s)"
    )
    return out, mapping


def _tags(asset: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (getattr(asset, "tags", None) or {}).items()}


def _tag_date(value: str) -> date | None:
    try:
        return date.fromisoformat(value.strip()[:10])
    except ValueError:
        return None


def _live_offer(offer: catalog.Offer | None, kind: catalog.OfferKind, tags: dict[str, str]) -> catalog.Offer | None:
    """The packaged offer updated from the registry model's tags, which win where present."""
    dates = {
        field: date
        for tag, targets in _LIFECYCLE_TAGS.items()
        for target, field in targets
        if target == kind and tag in tags and (date := _tag_date(tags[tag])) is not None
    }
    update: dict[str, Any] = {}
    if dates:
        lifecycle = offer.lifecycle if offer is not None else catalog.Lifecycle()
        update["lifecycle"] = lifecycle.model_copy(update=dates)
    regions = tuple(re.findall(r"[a-z0-9]+", tags.get(REGIONS_TAG, "").lower()))
    if regions and kind != "managed_finetune":
        update["regions"] = regions
    allow_list = tuple(re.findall(r"Standard_\w+", tags.get(ALLOW_LIST_TAG, "")))
    if allow_list and kind == "managed_finetune":
        update["compute_allow_list"] = allow_list
    if not update:
        return offer
    update["sources"] = (*(offer.sources if offer is not None else ()), "registry tags")
    return offer.model_copy(update=update) if offer is not None else catalog.Offer(kind=kind, **update)


def _refuse_retired(offer: catalog.Offer, model: str, entry: catalog.CatalogModel | None) -> None:
    """Raise :class:`OfferRetiredError` for a retired offer, naming the date, the replacement and what is still open."""
    if offer.lifecycle.stage() != "retired":
        return
    alternatives = []
    managed = entry.offer("managed_finetune") if entry is not None else None
    if offer.kind == "serverless_finetune" and managed is not None and managed.lifecycle.stage() != "retired":
        alternatives.append(f"on managed compute (compute=phitune.AzureCompute(...), {managed.lifecycle.stage()})")
    if entry is not None and entry.runs_locally:
        alternatives.append("locally (phitune.Client())")
    message = f"Azure retired {offer.name} of {model} on {offer.lifecycle.retired}"
    if offer.replacement:
        message += f"; use {offer.replacement} instead"
    if alternatives:
        message += f", or train {model} {' or '.join(alternatives)}"
    raise OfferRetiredError(
        "compute" if offer.kind == "managed_finetune" else "model",
        BACKEND,
        message,
        retired_on=offer.lifecycle.retired,
        replacement=offer.replacement,
        alternatives=alternatives,
    )


def _lifecycle_notes(offer: catalog.Offer, model: str) -> list[tuple[str, str]]:
    """A warning (also given to ``warnings.warn``) for a legacy or deprecated offer, a note for a preview one."""
    stage = offer.lifecycle.stage()
    if stage in ("legacy", "deprecated"):
        text = f"{offer.name} of {model} is {stage}"
        if offer.lifecycle.retired is not None:
            text += f" and retires on {offer.lifecycle.retired}"
        if offer.replacement:
            text += f"; Azure suggests {offer.replacement}"
        warnings.warn(text, OfferLifecycleWarning, stacklevel=4)
        return [("warn", text)]
    if stage == "preview":
        return [("info", f"{offer.name} of {model} is in preview: Azure may change or withdraw it at short notice")]
    return []


def _model_defaults(tags: dict[str, str]) -> dict[str, str]:
    """The registry model's ``model_specific_defaults`` tag (a serialised mapping) as strings."""
    pairs = re.findall(r"['\"]?(\w+)['\"]?\s*[:=]\s*['\"]?([^,'\"}\s]+)", tags.get(DEFAULTS_TAG, ""))
    return dict(pairs)


def _check_learning_rate(learning_rate: float, tags: dict[str, str]) -> None:
    """Refuse a learning rate outside the model's ``learning_rate_min``..``learning_rate_max`` where the registry
    states them."""
    defaults = _model_defaults(tags)
    try:
        low, high = float(defaults["learning_rate_min"]), float(defaults["learning_rate_max"])
    except (KeyError, ValueError):
        return
    if not low <= learning_rate <= high:
        raise SpecError(
            "hyperparameters.learning_rate",
            f"Azure takes learning rates from {_string(low)} to {_string(high)} for this model "
            f"(registry default {defaults.get('learning_rate', '?')}); got {_string(learning_rate)}",
        )


def _azure_defaults_note(spec: JobSpec, tags: dict[str, str]) -> list[tuple[str, str]]:
    """Where the offer does not take a hyperparameter, Azure's own default applies: say which ones differ."""
    names = _SERVERLESS_NAMES if spec.compute is None else _MANAGED_NAMES
    defaults = _model_defaults(tags)
    azure_names = {"lr_scheduler": "lr_scheduler_type", "gradient_accumulation_steps": "gradient_accumulation_steps"}
    differing = [
        f"{azure}={defaults[azure]} (phitune's {ours}: {getattr(spec.hyperparameters, ours)})"
        for ours, azure in azure_names.items()
        if ours not in names and azure in defaults and defaults[azure] != str(getattr(spec.hyperparameters, ours))
    ]
    if not differing:
        return []
    return [
        ("info", f"Azure applies the model's own defaults for what this offer does not take: {', '.join(differing)}")
    ]


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


def _model_object(model: Any, base: str | None, workspace: tuple[str, str, str]) -> ModelObject:
    """A registered model; ``deploy_id`` is the id another project of the tenant deploys it by."""
    location, workspace_id, _ = workspace
    return ModelObject(
        id=model.name,
        created=_ts(_created(model)) or 0,
        owned_by=BACKEND,
        kind="full",
        base_model=base,
        job_id=model.job_name,
        version=model.version,
        asset_id=f"azureml:{model.name}:{model.version}",
        deploy_id=f"azureml://locations/{location}/workspaces/{workspace_id}/models/{model.name}/versions/{model.version}",
    )


def _deployment(endpoint: Any) -> Deployment:
    model_id = str(endpoint.model_id or "")
    match = _ASSET_PATH.search(model_id)
    state = _text(endpoint.provisioning_state).lower()
    return Deployment(
        name=endpoint.name,
        model=match["name"] if match else model_id,
        status=_PROVISIONING.get(state, "creating"),
        created_at=_ts(_created(endpoint)) or 0,
        endpoint=endpoint.scoring_uri,
        engine=_SERVERLESS_ENGINE,
        backend=BACKEND,
        model_id=model_id,
    )


def _online_deployment(endpoint: Any) -> Deployment:
    """A managed online endpoint as a deployment (its model is the one its traffic goes to, named in its tags)."""
    state = _text(endpoint.provisioning_state).lower()
    return Deployment(
        name=endpoint.name,
        model=str((endpoint.tags or {}).get("phitune.model", "")),
        status=_PROVISIONING.get(state, "creating"),
        created_at=_ts(_created(endpoint)) or 0,
        endpoint=endpoint.scoring_uri,
        engine=_ONLINE_ENGINE,
        backend=BACKEND,
        traffic=dict(endpoint.traffic or {}),
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


def _stored_notes(raw: str | None) -> list[tuple[Any, str]]:
    """The notes ``create_job`` recorded in the job's properties: (level, message) pairs."""
    try:
        notes = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [(n.get("level", "info"), str(n.get("message", ""))) for n in notes if isinstance(n, dict)]


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
