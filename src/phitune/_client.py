"""The phitune clients: one object, resources as properties, the backend chosen at construction.

:class:`Client` and :class:`AsyncClient` are twins: the same constructors, resources and methods, one definition of
each resource's behaviour (:mod:`phitune.resources`); the async twin's methods are awaited.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.base import AsyncBackend, Backend
from .resources.deployments import AsyncDeployments, Deployments
from .resources.files import AsyncFiles, Files
from .resources.finetune import AsyncFineTuning, FineTuning
from .resources.models import AsyncModels, Models

if TYPE_CHECKING:
    import httpx
    import openai
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential
    from azure.core.pipeline.transport import HttpTransport
    from typing_extensions import Self

    from ._retry import RetryPolicy


def default_home() -> Path:
    """``$PHITUNE_HOME``, else ``~/.phitune``."""
    return Path(os.environ.get("PHITUNE_HOME") or Path.home() / ".phitune").expanduser()


def _local_backend(home: str | os.PathLike[str] | None) -> Backend:
    from .backends.local import LocalBackend

    return LocalBackend(Path(home) if home is not None else default_home())


class _Constructors:
    """The backend-choosing constructors both clients share."""

    def __init__(self, *, home: str | os.PathLike[str] | None = None, backend: Any = None) -> None:
        """Each client defines its own."""

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
        transport: HttpTransport | None = None,
        retry: RetryPolicy | None = None,
        poll_interval: float = 10.0,
    ) -> Self:
        """A client for Azure AI Foundry / Azure ML: a workspace by ``subscription_id``, ``resource_group`` and
        ``workspace`` (or none of them: ``config.json``), or an existing ``ml_client``. ``credential`` defaults to
        ``DefaultAzureCredential``; ``transport`` is an azure-core transport for every request. See
        :class:`phitune.backends.azure.AzureBackend`. azure-ai-ml is synchronous: :class:`AsyncClient` runs its calls
        on worker threads."""
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
        http_client: httpx.Client | httpx.AsyncClient | None = None,
        client: openai.OpenAI | openai.AsyncOpenAI | None = None,
    ) -> Self:
        """A client for any OpenAI-compatible fine-tuning service: ``base_url`` + ``api_key`` (e.g. ``phitune
        serve``), or Azure OpenAI by ``azure_endpoint`` with a key, a ``credential`` or a token provider.
        ``http_client`` (an ``httpx.Client``; an ``httpx.AsyncClient`` for :class:`AsyncClient`) and ``client`` (an
        ``openai.OpenAI``; an ``openai.AsyncOpenAI`` for :class:`AsyncClient`) replace the ones built here. See
        :class:`phitune.backends.openai.OpenAIBackend`."""
        from .backends import openai as backend

        kind = backend.AsyncOpenAIBackend if issubclass(cls, AsyncClient) else backend.OpenAIBackend
        return cls(
            backend=kind(
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

    backend: Backend | AsyncBackend

    @property
    def home(self) -> Path:
        """The local state folder (datasets' tokenizers and built-in models are looked up there)."""
        return self.backend.home or default_home()

    def __repr__(self) -> str:
        return f"phitune.{type(self).__name__}(backend={self.backend.name!r})"


class Client(_Constructors):
    """Entry point of the SDK.

    ``Client()`` runs jobs locally (state under ``$PHITUNE_HOME`` or ``~/.phitune``; ``home=`` overrides);
    ``Client.azure(...)`` runs them on Azure AI Foundry / Azure ML; ``Client.openai(...)`` on any OpenAI-compatible
    fine-tuning service. The resources and the job schema are the same on every backend.
    """

    backend: Backend

    def __init__(self, *, home: str | os.PathLike[str] | None = None, backend: Backend | None = None) -> None:
        if backend is not None and home is not None:
            raise ValueError("give either home (local backend) or backend, not both")
        self.backend = backend if backend is not None else _local_backend(home)

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

    def close(self) -> None:
        """Release what the backend holds (HTTP connections, loaded models)."""
        self.backend.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Constructors):
    """The async twin of :class:`Client`: the same constructors, resources and methods, awaited
    (``await client.finetune.wait(job.id)``, ``async for event in client.finetune.stream_events(job.id)``).

    An async backend (``AsyncClient.openai(...)``: httpx under ``openai.AsyncOpenAI``) is awaited all the way down.
    A synchronous one (the local backend, Azure's azure-ai-ml) runs each call on a worker thread
    (``anyio.to_thread.run_sync``), as does the blocking work on this machine (validating and tokenising a
    dataset, the fit estimate), so the event loop never waits on them. ``threaded`` says which.
    """

    backend: Backend | AsyncBackend

    def __init__(
        self, *, home: str | os.PathLike[str] | None = None, backend: Backend | AsyncBackend | None = None
    ) -> None:
        if backend is not None and home is not None:
            raise ValueError("give either home (local backend) or backend, not both")
        self.backend = backend if backend is not None else _local_backend(home)
        # a synchronous backend's calls run on worker threads
        self.threaded = not inspect.iscoroutinefunction(self.backend.get_job)

    @cached_property
    def files(self) -> AsyncFiles:
        """Datasets: validate, upload, get, list, delete."""
        return AsyncFiles(self)

    @cached_property
    def finetune(self) -> AsyncFineTuning:
        """Fine-tuning jobs: create, estimate, wait, events, checkpoints, pause, resume, cancel."""
        return AsyncFineTuning(self)

    @cached_property
    def models(self) -> AsyncModels:
        """Base and fine-tuned models: get, list, export."""
        return AsyncModels(self)

    @cached_property
    def deployments(self) -> AsyncDeployments:
        """Deployments that answer chat completions: create, get, list, delete, chat."""
        return AsyncDeployments(self)

    async def close(self) -> None:
        """Release what the backend holds (HTTP connections, loaded models)."""
        if self.threaded:
            import anyio.to_thread

            await anyio.to_thread.run_sync(self.backend.close)
        else:
            await self.backend.close()  # type: ignore[misc]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
