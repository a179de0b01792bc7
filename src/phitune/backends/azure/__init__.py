"""Azure AI Foundry / Azure ML backend, through azure-ai-ml.

Jobs run as Azure ``FineTuning`` jobs: serverless (Models as a Service, MaaS) when ``spec.compute`` is None, or on
managed compute (Models as a Platform, MaaP) when it names a cluster or instance types. Each model's offers and their
lifecycle come from :mod:`phitune.catalog`, overridden by the registry model's tags at create time: a retired offer is
refused before anything is sent, a legacy or deprecated one warns. A model fine-tuned serverless deploys as a
serverless endpoint; one fine-tuned on managed compute as a managed online endpoint and deployment. Both answer OpenAI
chat completions. azure-ai-ml is imported only when an :class:`AzureBackend` is constructed; ``import phitune`` never
imports azure.

``list_events`` returns the run's lifecycle, warnings and error from the run history and the training metrics the
pipeline logged to the workspace's MLflow tracking server (:mod:`phitune.backends.azure.metrics`). What Azure does
not expose (so neither does this backend): intermediate checkpoints (``list_checkpoints`` returns ``[]``), the number
of trained tokens, and the step count. See docs/azure.md.
"""

from __future__ import annotations

from .backend import AzureBackend
from .convert import BACKEND, EXPERIMENT, REGISTRY
from .core import Uploader
from .hyperparameters import GPUS_PER_VM
from .offers import ALLOW_LIST_TAG, DEFAULTS_TAG, REGIONS_TAG

__all__ = [
    "ALLOW_LIST_TAG",
    "BACKEND",
    "DEFAULTS_TAG",
    "EXPERIMENT",
    "GPUS_PER_VM",
    "REGIONS_TAG",
    "REGISTRY",
    "AzureBackend",
    "Uploader",
]
