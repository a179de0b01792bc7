"""phitune: fine-tune Phi-3 models with one typed job schema on Azure, OpenAI-compatible services, or locally.

``import phitune`` stays light: torch, transformers, peft, azure, openai and tenacity load only on the paths that use
them (the names of :data:`_LAZY` are imported on first use). It makes bitsandbytes, whenever it gets imported, skip
its download of a kernel from the Hugging Face Hub; ``phitune.quiet_libraries()`` keeps the other libraries' warnings
and progress bars out of a script's output (:mod:`phitune._third_party`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _third_party, catalog, errors, kaito
from ._client import AsyncClient, Client
from ._third_party import quiet_libraries
from .backends.base import Capabilities
from .errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DatasetError,
    InternalServerError,
    MissingContentError,
    MissingDependencyError,
    NotFoundError,
    OfferLifecycleWarning,
    OfferRetiredError,
    PermissionDeniedError,
    PhituneError,
    RateLimitError,
    RemoteConflictError,
    RemoteNotFoundError,
    SpecError,
    StoreError,
    UnsupportedOptionError,
    WaitTimeoutError,
    WontFitError,
)
from .types import (
    PEFT,
    AzureCompute,
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    Checkpoint,
    DatasetIssue,
    DatasetReport,
    Deployment,
    Distributed,
    DoRA,
    FileObject,
    FineTuneJob,
    Full,
    Hyperparameters,
    Integration,
    JobError,
    JobEvent,
    JobOptions,
    JobSpec,
    JobStatus,
    LoRA,
    Method,
    MLflow,
    ModelObject,
    QLoRA,
    Task,
    TensorBoard,
    TokenStats,
    TrainingPlan,
    Usage,
)

if TYPE_CHECKING:
    from ._retry import RetryPolicy
    from .estimate import Estimate, MemoryBreakdown

__version__ = "0.1.0"

_third_party.guard_imports()

_LAZY = {
    "Estimate": ".estimate",
    "MemoryBreakdown": ".estimate",
    "RetryPolicy": "._retry",
}
"""Public names whose modules load on first use: ``phitune.Estimate`` (the sizing model), ``phitune.RetryPolicy``
(tenacity)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'phitune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "PEFT",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "AsyncClient",
    "AuthenticationError",
    "AzureCompute",
    "BadRequestError",
    "Capabilities",
    "ChatChoice",
    "ChatCompletion",
    "ChatMessage",
    "Checkpoint",
    "Client",
    "ConflictError",
    "DatasetError",
    "DatasetIssue",
    "DatasetReport",
    "Deployment",
    "Distributed",
    "DoRA",
    "Estimate",
    "FileObject",
    "FineTuneJob",
    "Full",
    "Hyperparameters",
    "Integration",
    "InternalServerError",
    "JobError",
    "JobEvent",
    "JobOptions",
    "JobSpec",
    "JobStatus",
    "LoRA",
    "MLflow",
    "MemoryBreakdown",
    "Method",
    "MissingContentError",
    "MissingDependencyError",
    "ModelObject",
    "NotFoundError",
    "OfferLifecycleWarning",
    "OfferRetiredError",
    "PermissionDeniedError",
    "PhituneError",
    "QLoRA",
    "RateLimitError",
    "RemoteConflictError",
    "RemoteNotFoundError",
    "RetryPolicy",
    "SpecError",
    "StoreError",
    "Task",
    "TensorBoard",
    "TokenStats",
    "TrainingPlan",
    "UnsupportedOptionError",
    "Usage",
    "WaitTimeoutError",
    "WontFitError",
    "__version__",
    "catalog",
    "errors",
    "kaito",
    "quiet_libraries",
]
