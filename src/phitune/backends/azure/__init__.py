"""Azure AI Foundry / Azure ML backend, through azure-ai-ml: :class:`AzureBackend`.

azure-ai-ml is imported only when an :class:`AzureBackend` is constructed; ``import phitune`` never imports azure.
"""

from __future__ import annotations

from .backend import (
    ALLOW_LIST_TAG,
    BACKEND,
    DEFAULTS_TAG,
    EXPERIMENT,
    GPUS_PER_VM,
    REGIONS_TAG,
    REGISTRY,
    AzureBackend,
    Uploader,
)

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
