"""The Azure backend, :class:`AzureBackend`: its files (data assets) and models here, its jobs and deployments from
:mod:`.jobs` and :mod:`.deployments`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...types import DatasetReport, FileObject, ModelObject
from ..base import Capabilities
from .convert import _FILE_PREFIX, BACKEND, _asset_ref, _file_object, _model_object, _path, _sha256, _slug
from .deployments import DeploymentOperations
from .jobs import JobOperations


class AzureBackend(JobOperations, DeploymentOperations):
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

    def _base_model(self, model: Any) -> str | None:
        """The registry id of the base model a fine-tuned model came from (via the job that registered it)."""
        if not model.job_name:
            return None
        job = self._find(lambda: self._ml.jobs.get(model.job_name))
        return _path(getattr(job, "model", None)) or None
