"""The contract every backend fulfils. Resources call these methods; backends translate them to a service.

:class:`Backend` is the synchronous contract (the local, Azure and OpenAI-compatible backends); :class:`AsyncBackend`
the same calls as coroutines (the OpenAI-compatible backend's async twin). What a backend can do beyond the calls
every backend answers, it states in its :class:`Capabilities`; resources ask that object, and a call the backend
cannot serve raises :class:`~phitune.errors.UnsupportedOptionError` naming the backend and what to use instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from ..errors import UnsupportedOptionError
from ..types import (
    ChatCompletion,
    Checkpoint,
    DatasetReport,
    Deployment,
    FileObject,
    FineTuneJob,
    JobEvent,
    JobSpec,
    ModelObject,
)

if TYPE_CHECKING:
    import openai

Feature = Literal["pause", "export", "stored_files", "staging", "chat_streaming", "openai_endpoint"]

_INSTEAD: dict[Feature, str] = {
    "pause": "it cannot pause and resume jobs; cancel the job and create it again from its last model instead",
    "export": "exports need the model's weights on this machine; train it with the local backend (phitune.Client())",
    "stored_files": "its stored files are not on this machine; pass the dataset's local path instead",
    "staging": "it has no local staging folder; uploads go through a temporary folder",
    "chat_streaming": "it cannot stream chat; use deployments.chat() for the whole answer",
    "openai_endpoint": "it has no OpenAI-compatible endpoint for this deployment; use deployments.chat()",
}


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the calls every backend answers. Each flag names the optional methods it
    promises:

    - ``pause``: ``pause_job`` and ``resume_job`` (:class:`PausingBackend`)
    - ``export``: ``export_model``, the weights being on this machine (:class:`ExportingBackend`)
    - ``stored_files``: ``file_content``, a stored dataset readable on this machine (:class:`StoredFilesBackend`)
    - ``staging``: ``staging``, a private folder for uploads on their way in (:class:`StagingBackend`)
    - ``chat_streaming``: ``stream_chat``, text pieces as they are generated (:class:`StreamingChatBackend`)
    - ``openai_endpoint``: ``openai_client``, an ``openai.OpenAI`` client per deployment (:class:`OpenAIEndpoint`)
    """

    pause: bool = False
    export: bool = False
    stored_files: bool = False
    staging: bool = False
    chat_streaming: bool = False
    openai_endpoint: bool = False

    def require(self, feature: Feature, operation: str, backend: str) -> None:
        """Raise :class:`~phitune.errors.UnsupportedOptionError` for ``operation`` where ``feature`` is missing."""
        if not getattr(self, feature):
            raise UnsupportedOptionError(operation, backend, _INSTEAD[feature])


@runtime_checkable
class Backend(Protocol):
    """A place where fine-tuning jobs run. Every method is synchronous and returns phitune types."""

    name: str
    capabilities: Capabilities

    @property
    def home(self) -> Path | None:
        """The local state folder on this machine, where the backend keeps one (the local backend)."""
        ...

    # files
    def upload_file(self, path: str, *, report: DatasetReport) -> FileObject:
        """Store an already validated dataset."""
        ...

    def get_file(self, file_id: str) -> FileObject: ...

    def list_files(self) -> list[FileObject]: ...

    def delete_file(self, file_id: str) -> None: ...

    # jobs
    def check_spec(self, spec: JobSpec) -> None:
        """Raise :class:`~phitune.errors.UnsupportedOptionError` for any option this backend cannot honour."""
        ...

    def create_job(self, spec: JobSpec, *, idempotency_key: str) -> FineTuneJob: ...

    def get_job(self, job_id: str) -> FineTuneJob: ...

    def list_jobs(self, *, limit: int = 20, after: str | None = None) -> list[FineTuneJob]: ...

    def cancel_job(self, job_id: str) -> FineTuneJob: ...

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> list[JobEvent]:
        """Events oldest first; ``after`` is an event id to continue from."""
        ...

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]: ...

    # models and deployments
    def get_model(self, model_id: str) -> ModelObject: ...

    def list_models(self) -> list[ModelObject]: ...

    def create_deployment(self, model: str, name: str, **options: Any) -> Deployment: ...

    def get_deployment(self, name: str) -> Deployment: ...

    def list_deployments(self) -> list[Deployment]: ...

    def delete_deployment(self, name: str) -> None: ...

    def chat(
        self,
        deployment: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> ChatCompletion: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------- optional calls, promised by Capabilities
@runtime_checkable
class PausingBackend(Protocol):
    """``capabilities.pause``: pause a job and resume it later from its last checkpoint (local, OpenAI-compatible)."""

    def pause_job(self, job_id: str) -> FineTuneJob: ...

    def resume_job(self, job_id: str) -> FineTuneJob: ...


class ExportingBackend(Protocol):
    """``capabilities.export``: export a model's weights (see :func:`phitune.export.export` for ``options``)."""

    def export_model(self, model: str, **options: Any) -> Path: ...


class StoredFilesBackend(Protocol):
    """``capabilities.stored_files``: where a stored dataset's bytes lie on this machine (local)."""

    def file_content(self, file_id: str) -> Path: ...


@runtime_checkable
class StagingBackend(Protocol):
    """``capabilities.staging``: a private place for uploads on their way in (local): ``files.upload`` copies a
    dataset there, then validates and stores that one copy."""

    def staging(self) -> AbstractContextManager[Path]: ...


class StreamingChatBackend(Protocol):
    """``capabilities.chat_streaming``: a chat completion's text as it is generated. Text pieces are ``str``; a
    backend may end with a summary object (the local backend's token counts), which callers skip."""

    def stream_chat(
        self,
        deployment: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> Iterator[object]: ...


class OpenAIEndpoint(Protocol):
    """``capabilities.openai_endpoint``: an ``openai.OpenAI`` client that answers for a deployment."""

    def openai_client(self, deployment: str) -> openai.OpenAI: ...


# ------------------------------------------------------------------------------------------------ async twin
@runtime_checkable
class AsyncBackend(Protocol):
    """:class:`Backend` with every call a coroutine (the optional calls too: ``stream_chat`` an async iterator).
    ``phitune.AsyncClient`` awaits such a backend; a synchronous one it runs on a
    worker thread."""

    name: str
    capabilities: Capabilities

    @property
    def home(self) -> Path | None: ...

    async def upload_file(self, path: str, *, report: DatasetReport) -> FileObject: ...

    async def get_file(self, file_id: str) -> FileObject: ...

    async def list_files(self) -> list[FileObject]: ...

    async def delete_file(self, file_id: str) -> None: ...

    async def check_spec(self, spec: JobSpec) -> None: ...

    async def create_job(self, spec: JobSpec, *, idempotency_key: str) -> FineTuneJob: ...

    async def get_job(self, job_id: str) -> FineTuneJob: ...

    async def list_jobs(self, *, limit: int = 20, after: str | None = None) -> list[FineTuneJob]: ...

    async def cancel_job(self, job_id: str) -> FineTuneJob: ...

    async def list_events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> list[JobEvent]: ...

    async def list_checkpoints(self, job_id: str) -> list[Checkpoint]: ...

    async def get_model(self, model_id: str) -> ModelObject: ...

    async def list_models(self) -> list[ModelObject]: ...

    async def create_deployment(self, model: str, name: str, **options: Any) -> Deployment: ...

    async def get_deployment(self, name: str) -> Deployment: ...

    async def list_deployments(self) -> list[Deployment]: ...

    async def delete_deployment(self, name: str) -> None: ...

    async def chat(
        self,
        deployment: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> ChatCompletion: ...

    async def close(self) -> None: ...
