"""The phitune client: one object, resources as properties, the backend chosen at construction."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from .backends.base import Backend
from .resources.deployments import Deployments
from .resources.files import Files
from .resources.finetune import FineTuning
from .resources.models import Models


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
    def azure(cls, **options: Any) -> Client:
        """A client for Azure AI Foundry / Azure ML (see :class:`phitune.backends.azure.AzureBackend`)."""
        from .backends.azure import AzureBackend

        return cls(backend=AzureBackend(**options))

    @classmethod
    def openai(cls, **options: Any) -> Client:
        """A client for any OpenAI-compatible fine-tuning service (see ``phitune.backends.openai.OpenAIBackend``)."""
        from .backends.openai import OpenAIBackend

        return cls(backend=OpenAIBackend(**options))

    @cached_property
    def files(self) -> Files:
        return Files(self)

    @cached_property
    def finetune(self) -> FineTuning:
        return FineTuning(self)

    @cached_property
    def models(self) -> Models:
        return Models(self)

    @cached_property
    def deployments(self) -> Deployments:
        return Deployments(self)

    @property
    def home(self) -> Path:
        """The local state folder (datasets' tokenizers and built-in models are looked up there)."""
        return Path(getattr(self.backend, "home", default_home()))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"phitune.Client(backend={self.backend.name!r})"
