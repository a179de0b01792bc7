"""phitune: fine-tune Phi-3 models with one typed job schema on Azure, OpenAI-compatible services, or locally.

``import phitune`` stays light: torch, transformers, peft, azure and openai load only on the paths that use them.
"""

from __future__ import annotations

from . import catalog, errors, kaito
from ._client import Client
from .errors import DatasetError, NotFoundError, PhituneError, SpecError, UnsupportedOptionError
from .types import (
    PEFT,
    AzureCompute,
    ChatCompletion,
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
    JobEvent,
    JobSpec,
    LoRA,
    MLflow,
    ModelObject,
    QLoRA,
    TensorBoard,
    TokenStats,
)

__version__ = "0.1.0"

__all__ = [
    "PEFT",
    "AzureCompute",
    "ChatCompletion",
    "Checkpoint",
    "Client",
    "DatasetError",
    "DatasetIssue",
    "DatasetReport",
    "Deployment",
    "Distributed",
    "DoRA",
    "FileObject",
    "FineTuneJob",
    "Full",
    "Hyperparameters",
    "JobEvent",
    "JobSpec",
    "LoRA",
    "MLflow",
    "ModelObject",
    "NotFoundError",
    "PhituneError",
    "QLoRA",
    "SpecError",
    "TensorBoard",
    "TokenStats",
    "UnsupportedOptionError",
    "__version__",
    "catalog",
    "errors",
    "kaito",
]
