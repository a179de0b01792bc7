"""The phitune client: one object, resources as properties, the backend chosen at construction."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.base import Backend
from .resources.deployments import Deployments
from .resources.files import Files
from .resources.finetune import FineTuning
from .resources.models import Models

if TYPE_CHECKING:
    import openai
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential

    from ._retry import RetryPolicy


def default_home() -> Path:
    """``$PHITUNE_HOME``, else ``~/.phitune``."""
    return Path(os.environ.get("PHITUNE_HOME") or Path.home() / ".phitune").expanduser()


class Client:
    """Entry point of the SDK.

    ``Client()`` runs jobs locally (state under ``$PHITUNE_HOME`` or ``~/.phitune``; ``home=`` overrides);
    ``Client.azure(...)`` runs them on Azure AI Foundry / Azure ML; ``Client.openai(...)`` on any OpenAI-compatible
    fine-tuning service. The resources and the job schema are the same on every backend.
    """

    def __init__(self, *, home: str | os.PathLike[str] | None = None, backend: Backend | None = None) -> None:
        if backend is not None and home is not None:
            raise ValueError("give either home (local backend) or backend, not both")
        if backend is None:
            from .backends.local import LocalBackend

            backend = LocalBackend(Path(home) if home is not None else default_home())
        self.backend: Backend = backend

    @classmethod
    def azure(
        cls,
        *,
        subscription_id: str | None = None,
        resource_group: str | None = None,
        workspace: str | None = None,
        credential: TokenCredential | None = None,
        ml_client: MLClient | None = None,
        registry_ml_client: MLClient | None = None,
        uploader: Callable[[str, str], str] | None = None,
        transport: Any = None,
        retry: RetryPolicy | None = None,
        poll_interval: float = 10.0,
    ) -> Client:
        """A client for Azure AI Foundry / Azure ML: a workspace by ``subscription_id``, ``resource_group`` and
        ``workspace`` (or none of them: ``config.json``), or an existing ``ml_client``. ``credential`` defaults to
        ``DefaultAzureCredential``; ``transport`` is an azure-core transport for every request. See
        :class:`phitune.backends.azure.AzureBackend`."""
        from .backends.azure import AzureBackend

        return cls(
            backend=AzureBackend(
                subscription_id=subscription_id,
                resource_group=resource_group,
                workspace=workspace,
                credential=credential,
                ml_client=ml_client,
                registry_ml_client=registry_ml_client,
                uploader=uploader,
                transport=transport,
                retry=retry,
                poll_interval=poll_interval,
            )
        )

    @classmethod
    def openai(
        cls,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        azure_endpoint: str | None = None,
        api_version: str | None = None,
        credential: TokenCredential | None = None,
        azure_ad_token_provider: Callable[[], str] | None = None,
        phitune_server: bool | None = None,
        max_retries: int = 3,
        timeout: float = 120.0,
        http_client: Any = None,
        client: openai.OpenAI | None = None,
    ) -> Client:
        """A client for any OpenAI-compatible fine-tuning service: ``base_url`` + ``api_key`` (e.g. ``phitune
        serve``), or Azure OpenAI by ``azure_endpoint`` with a key, a ``credential`` or a token provider. See
        :class:`phitune.backends.openai.OpenAIBackend`."""
        from .backends.openai import OpenAIBackend

        return cls(
            backend=OpenAIBackend(
                base_url=base_url,
                api_key=api_key,
                azure_endpoint=azure_endpoint,
                api_version=api_version,
                credential=credential,
                azure_ad_token_provider=azure_ad_token_provider,
                phitune_server=phitune_server,
                max_retries=max_retries,
                timeout=timeout,
                http_client=http_client,
                client=client,
            )
        )

    @cached_property
    def files(self) -> Files:
        """Datasets: validate, upload, get, list, delete."""
        return Files(self)

    @cached_property
    def finetune(self) -> FineTuning:
        """Fine-tuning jobs: create, estimate, wait, events, checkpoints, pause, resume, cancel."""
        return FineTuning(self)

    @cached_property
    def models(self) -> Models:
        """Base and fine-tuned models: get, list, export."""
        return Models(self)

    @cached_property
    def deployments(self) -> Deployments:
        """Deployments that answer chat completions: create, get, list, delete."""
        return Deployments(self)

    @property
    def home(self) -> Path:
        """The local state folder (datasets' tokenizers and built-in models are looked up there)."""
        return Path(getattr(self.backend, "home", default_home()))

    def close(self) -> None:
        """Release what the backend holds (HTTP connections, loaded models)."""
        self.backend.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"phitune.Client(backend={self.backend.name!r})"
