"""Deployments of fine-tuned models: serverless endpoints, managed online endpoints, and chat through their
OpenAI-compatible routes."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import TYPE_CHECKING, Any, cast

from ... import catalog
from ...errors import (
    APIConnectionError,
    ConflictError,
    NotFoundError,
    SpecError,
    UnsupportedOptionError,
    WaitTimeoutError,
    redact,
    status_error,
)
from ...types import ChatCompletion, Deployment
from .convert import (
    _REGISTRY_MODEL,
    _SERVERLESS_ENGINE,
    _SPEC_PROPERTY,
    BACKEND,
    REGISTRY,
    _deployment,
    _online_deployment,
    _path,
    _stored_spec,
    _tags,
)
from .core import AzureCore
from .offers import _lifecycle_notes, _live_offer, _refuse_retired

if TYPE_CHECKING:
    import openai

_ONLINE_DEPLOYMENT = "default"
_FOREIGN_MODEL = re.compile(
    r"^azureml://locations/(?P<location>[^/]+)/workspaces/(?P<workspace>[^/]+)/models/(?P<name>[^/]+)"
    r"/versions/(?P<v>[^/]+)$"
)


class DeploymentOperations(AzureCore):
    """The deployment and chat methods of :class:`~phitune.backends.azure.AzureBackend`."""

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

    def _drop_openai(self, name: str) -> None:
        client = self._openai.pop(name, None)
        if client is not None:
            client.close()
