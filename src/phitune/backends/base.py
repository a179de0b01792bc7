"""The contract every backend fulfils. Resources call these methods; backends translate them to a service."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class Backend(Protocol):
    """A place where fine-tuning jobs run. Every method is synchronous and returns phitune types."""

    name: str

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


@runtime_checkable
class PausingBackend(Protocol):
    """A backend that can pause a job and resume it later from its last checkpoint (local, OpenAI-compatible)."""

    name: str

    def pause_job(self, job_id: str) -> FineTuneJob: ...

    def resume_job(self, job_id: str) -> FineTuneJob: ...


@runtime_checkable
class StagingBackend(Protocol):
    """A backend with a private place for uploads on their way in (local): ``files.upload`` copies a dataset there,
    then validates and stores that one copy."""

    def staging(self) -> AbstractContextManager[Path]: ...
