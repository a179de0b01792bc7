"""Azure's names for phitune's objects, and Azure's objects and errors as phitune's types."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from ...errors import APIConnectionError, APIError, NotFoundError, PhituneError, SpecError, redact, status_error
from ...types import Deployment, FileObject, JobError, JobSpec, JobStatus, ModelObject

BACKEND = "azure"
REGISTRY = "azureml"
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
_NOTES_PROPERTY = "phitune.notes"
_SERVERLESS_ENGINE = "azure-serverless"
_ONLINE_ENGINE = "azure-managed-online"


def _tags(asset: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (getattr(asset, "tags", None) or {}).items()}


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
