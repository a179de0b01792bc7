"""phitune: fine-tune Phi-3 models with one typed job schema on Azure, OpenAI-compatible services, or locally.

``import phitune`` stays light: torch, transformers, peft, azure and openai load only on the paths that use them. It
makes bitsandbytes, whenever it gets imported, skip its download of a kernel from the Hugging Face Hub;
``phitune.quiet_libraries()`` keeps the other libraries' warnings and progress bars out of a script's output
(:mod:`phitune._third_party`).
"""

from __future__ import annotations

from . import _third_party, catalog, errors, kaito
from ._client import Client
from ._third_party import quiet_libraries
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
    TrainingPlan,
)

__version__ = "0.1.0"

_third_party.guard_imports()

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
    "TrainingPlan",
    "UnsupportedOptionError",
    "__version__",
    "catalog",
    "errors",
    "kaito",
    "quiet_libraries",
]
