"""The connection every part of :class:`~phitune.backends.azure.AzureBackend` shares: the azure-ai-ml clients,
retries and error translation, and the workspace and registry lookups."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ... import catalog
from ..._retry import RetryPolicy
from ...errors import MissingDependencyError, NotFoundError, PhituneError, SpecError, UnsupportedOptionError
from .convert import _ASSET, _ASSET_PATH, BACKEND, REGISTRY, _translate
from .metrics import WorkspaceMetrics

if TYPE_CHECKING:
    import openai
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential

T = TypeVar("T")

Uploader = Callable[[str, str], str]
"""``uploader(local_path, asset_name) -> uri``: store a dataset where Azure ML can read it (``azureml://datastores/...``
or ``https://...``) and return its URI. The default uploads through azure-ai-ml to the workspace's default datastore."""


class AzureCore:
    """The clients, retry policy and lookups of an Azure backend; :class:`~phitune.backends.azure.AzureBackend`
    documents the arguments."""

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
