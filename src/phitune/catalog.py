"""The Phi-3 models phitune knows, and the built-in ``tiny-phi3`` test model.

A model argument may also be any Hugging Face id or local folder; the catalog only adds what is known about the
named Phi-3 variants (context length, Azure ids and regions, Kaito presets, what each backend supports).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Architecture = Literal["phi3", "phi3small"]


class CatalogModel(BaseModel):
    """What phitune knows about one base model."""

    model_config = ConfigDict(frozen=True)

    name: str
    hf_id: str | None
    context_length: int
    parameters_b: float
    architecture: Architecture = "phi3"
    trust_remote_code: bool = False
    azure_name: str | None = None
    azure_serverless_finetune: bool = False
    azure_deploy_regions: tuple[str, ...] = ()
    kaito_preset: str | None = None
    backends: tuple[str, ...] = ("local", "azure", "openai")
    note: str = ""

    @property
    def azure_registry_id(self) -> str | None:
        """The unversioned Azure ML registry id (resolved to the latest version by the Azure backend)."""
        return f"azureml://registries/azureml/models/{self.azure_name}" if self.azure_name else None

    @property
    def runs_locally(self) -> bool:
        return "local" in self.backends


# Regions where fine-tuned Phi-3 serverless deployments exist (model tag ``maas-finetuning-deploy-regions``).
# The Azure backend prefers the tag read from the registry model and falls back to these values.
_PHI3_FT_REGIONS = ("eastus2",)

_SMALL_NOTE = (
    "Phi-3-small is a different architecture (block-sparse attention, remote code) that needs "
    "trust_remote_code=True and the flash-attention/triton kernels its code imports; the local trainer does not "
    "run it. Use Phi-3-mini or Phi-3-medium locally."
)

MODELS: tuple[CatalogModel, ...] = (
    CatalogModel(
        name="tiny-phi3",
        hf_id=None,
        context_length=2048,
        parameters_b=0.00081,
        backends=("local", "openai"),
        note="Deterministic random-init Phi3ForCausalLM with an offline tokenizer: for tests and the demo.",
    ),
    CatalogModel(
        name="Phi-3-mini-4k-instruct",
        hf_id="microsoft/Phi-3-mini-4k-instruct",
        context_length=4096,
        parameters_b=3.82,
        azure_name="Phi-3-mini-4k-instruct",
        azure_serverless_finetune=True,
        azure_deploy_regions=_PHI3_FT_REGIONS,
        kaito_preset="phi-3-mini-4k-instruct",
    ),
    CatalogModel(
        name="Phi-3-mini-128k-instruct",
        hf_id="microsoft/Phi-3-mini-128k-instruct",
        context_length=131072,
        parameters_b=3.82,
        azure_name="Phi-3-mini-128k-instruct",
        azure_serverless_finetune=True,
        azure_deploy_regions=_PHI3_FT_REGIONS,
        kaito_preset="phi-3-mini-128k-instruct",
    ),
    CatalogModel(
        name="Phi-3-small-8k-instruct",
        hf_id="microsoft/Phi-3-small-8k-instruct",
        context_length=8192,
        parameters_b=7.39,
        architecture="phi3small",
        trust_remote_code=True,
        azure_name="Phi-3-small-8k-instruct",
        backends=("azure",),
        note=_SMALL_NOTE,
    ),
    CatalogModel(
        name="Phi-3-small-128k-instruct",
        hf_id="microsoft/Phi-3-small-128k-instruct",
        context_length=131072,
        parameters_b=7.39,
        architecture="phi3small",
        trust_remote_code=True,
        azure_name="Phi-3-small-128k-instruct",
        backends=("azure",),
        note=_SMALL_NOTE,
    ),
    CatalogModel(
        name="Phi-3-medium-4k-instruct",
        hf_id="microsoft/Phi-3-medium-4k-instruct",
        context_length=4096,
        parameters_b=13.96,
        azure_name="Phi-3-medium-4k-instruct",
        azure_serverless_finetune=True,
        azure_deploy_regions=_PHI3_FT_REGIONS,
        kaito_preset="phi-3-medium-4k-instruct",
    ),
    CatalogModel(
        name="Phi-3-medium-128k-instruct",
        hf_id="microsoft/Phi-3-medium-128k-instruct",
        context_length=131072,
        parameters_b=13.96,
        azure_name="Phi-3-medium-128k-instruct",
        azure_serverless_finetune=True,
        azure_deploy_regions=_PHI3_FT_REGIONS,
        kaito_preset="phi-3-medium-128k-instruct",
    ),
)

TINY_MODEL = "tiny-phi3"


def find(model: str) -> CatalogModel | None:
    """The catalog entry for a name, alias or Hugging Face id (case-insensitive), or None for other models."""
    key = model.strip().lower()
    for entry in MODELS:
        if key in {entry.name.lower(), (entry.hf_id or "").lower(), f"microsoft/{entry.name.lower()}"}:
            return entry
    return None


def names() -> list[str]:
    return [m.name for m in MODELS]
