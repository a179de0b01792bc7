"""The Phi models phitune knows: what each one is, where it can be fine-tuned, and each cloud offer's lifecycle.

A model argument may also be any Hugging Face id or local folder; the catalog only adds what is known about the named
Phi models (context length, Azure ids, Kaito presets, which backends run them) and, for Azure, each offer with its
lifecycle stage, dates, replacement, regions and allowed fine-tuning VM sizes, with the sources those facts come from
(:data:`SOURCES`). The Azure backend prefers what the ``azureml`` registry's model says at create time (its tags) to
this packaged data; docs/azure.md says how to update it.
"""

from __future__ import annotations

import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

Architecture = Literal["phi3", "phi3small", "phimoe"]
OfferKind = Literal["serverless_finetune", "serverless_deploy", "managed_finetune"]
"""Azure's offers for a model: serverless fine-tuning (Models as a Service), serverless deployment of the fine-tuned
model, and fine-tuning on managed compute (Models as a Platform), whose output deploys to a managed online endpoint."""
Stage = Literal["preview", "ga", "legacy", "deprecated", "retired"]

OFFER_NAMES: dict[OfferKind, str] = {
    "serverless_finetune": "serverless fine-tuning (MaaS)",
    "serverless_deploy": "serverless deployment of the fine-tuned model",
    "managed_finetune": "managed-compute fine-tuning (MaaP)",
}

SOURCES: dict[str, str] = {
    "registry-phi3": "Azure/azureml-assets assets/models/system/<model>/spec.yaml (commit 4b41f8c, 2026-07-23): "
    "deprecation dates (tags FinetuneDeprecationDate, FinetuneRetirementDate, InferenceLegacyDate, "
    "InferenceDeprecationDate, InferenceRetirementDate until 2026-06), finetuneComputes, deploymentOptions, "
    "isArchived: true",
    "registry-phi4": "Azure/azureml-assets assets/models/system/Phi-4/spec.yaml (commit 4b41f8c, 2026-07-23): "
    "preview, deploymentOptions ServerlessMaaS and MaaP, finetuneComputes",
    "regions-maas": "MicrosoftDocs/azure-ai-docs articles/ai-foundry/includes/region-availability-maas.md "
    "(2025-11-24): hub/project regions for fine-tuning Phi-4 and Phi-4-mini-instruct",
    "notebook-maas": "Azure/azureml-examples sdk/python/jobs/finetuning/standalone/model-as-a-service/chat-completion/"
    "chat_completion_with_model_as_service.ipynb (commit 085cd6e, 2026-07-31): fine-tunes Phi-4-mini-instruct; "
    "its table of fine-tuned deployment regions",
    "notebook-maap": "Azure/azureml-examples sdk/python/jobs/finetuning/standalone/model-as-a-platform/chat-completion/"
    "chat_completion_with_model_as_platform.ipynb (commit 085cd6e, 2026-07-31): managed compute with instance_types, "
    "ManagedOnlineEndpoint + ManagedOnlineDeployment",
}
"""Where the packaged lifecycle facts come from, read on 2026-12-05."""

_DATE = datetime.date


class Lifecycle(BaseModel):
    """An offer's lifecycle: preview or generally available, then legacy, deprecated and retired on these dates."""

    model_config = ConfigDict(frozen=True)

    preview: bool = False
    legacy: datetime.date | None = None
    deprecated: datetime.date | None = None
    retired: datetime.date | None = None

    def stage(self, on: datetime.date | None = None) -> Stage:
        """The stage on a day (default: today, UTC)."""
        day = on or datetime.datetime.now(datetime.timezone.utc).date()
        for stage, date in (("retired", self.retired), ("deprecated", self.deprecated), ("legacy", self.legacy)):
            if date is not None and day >= date:
                return stage  # type: ignore[return-value]
        return "preview" if self.preview else "ga"


class Offer(BaseModel):
    """One Azure offer of a model, with its lifecycle and where the facts come from."""

    model_config = ConfigDict(frozen=True)

    kind: OfferKind
    lifecycle: Lifecycle = Lifecycle()
    replacement: str | None = None
    regions: tuple[str, ...] = ()
    """Regions where a project can run it (serverless offers); empty where the packaged data does not know."""
    compute_allow_list: tuple[str, ...] = ()
    """VM sizes Azure allows for managed-compute fine-tuning; empty where the packaged data does not know."""
    sources: tuple[str, ...] = ()
    """Keys of :data:`SOURCES`."""
    unverified: str = ""
    """What about this offer no source states outright (said in docs/azure.md)."""

    @property
    def name(self) -> str:
        """The offer's name as Azure's documentation calls it."""
        return OFFER_NAMES[self.kind]


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
    offers: tuple[Offer, ...] = ()
    kaito_preset: str | None = None
    backends: tuple[str, ...] = ("local", "azure", "openai")
    note: str = ""

    @property
    def azure_registry_id(self) -> str | None:
        """The unversioned Azure ML registry id (resolved to the latest version by the Azure backend)."""
        return f"azureml://registries/azureml/models/{self.azure_name}" if self.azure_name else None

    @property
    def runs_locally(self) -> bool:
        """Whether the local trainer can fine-tune this model."""
        return "local" in self.backends

    def offer(self, kind: OfferKind) -> Offer | None:
        """The Azure offer of this kind, or None where Azure never offered it."""
        return next((o for o in self.offers if o.kind == kind), None)


# --------------------------------------------------------------------------------------------- packaged facts
_A100 = ("Standard_NC24ads_A100_v4", "Standard_NC48ads_A100_v4", "Standard_NC96ads_A100_v4")
_MAAS_REGIONS = ("eastus2", "eastus", "northcentralus", "southcentralus", "westus", "westus3")
_PHI3_FINETUNE = Lifecycle(deprecated=_DATE(2025, 6, 30), retired=_DATE(2025, 8, 30))
_PHI3_INFERENCE = Lifecycle(legacy=_DATE(2025, 6, 9), deprecated=_DATE(2025, 6, 30), retired=_DATE(2025, 8, 30))
_MAAP_AFTER_RETIREMENT = (
    "the registry's FinetuneRetirementDate is read as closing serverless fine-tuning only: the registry still lists "
    "MaaP among the model's deployment options and the official MaaP notebook still fine-tunes a Phi-3 model, so "
    "managed compute is treated as deprecated (accepted with a warning), not retired"
)


def _retired_phi3(
    replacement: str, allow_list: tuple[str, ...], *, serverless: bool = True, regions: tuple[str, ...] = ("eastus2",)
) -> tuple[Offer, ...]:
    """The offers of a Phi-3 / Phi-3.5 model after the 2025 retirement of their serverless offers."""
    managed = Offer(
        kind="managed_finetune",
        lifecycle=Lifecycle(deprecated=_PHI3_FINETUNE.deprecated),
        replacement=replacement,
        compute_allow_list=allow_list,
        sources=("registry-phi3", "notebook-maap"),
        unverified=_MAAP_AFTER_RETIREMENT,
    )
    if not serverless:
        return (managed,)
    return (
        Offer(
            kind="serverless_finetune",
            lifecycle=_PHI3_FINETUNE,
            replacement=replacement,
            regions=regions,
            sources=("registry-phi3", "notebook-maas"),
        ),
        Offer(
            kind="serverless_deploy",
            lifecycle=_PHI3_INFERENCE,
            replacement=replacement,
            regions=regions,
            sources=("registry-phi3", "notebook-maas"),
        ),
        managed,
    )


def _phi4(
    *, preview: bool, allow_list: tuple[str, ...], sources: tuple[str, ...], unverified: str
) -> tuple[Offer, ...]:
    lifecycle = Lifecycle(preview=preview)
    return (
        Offer(kind="serverless_finetune", lifecycle=lifecycle, regions=_MAAS_REGIONS, sources=sources),
        Offer(kind="serverless_deploy", lifecycle=lifecycle, regions=_MAAS_REGIONS, sources=sources),
        Offer(
            kind="managed_finetune",
            lifecycle=lifecycle,
            compute_allow_list=allow_list,
            sources=(*sources, "notebook-maap"),
            unverified=unverified,
        ),
    )


_SMALL_NOTE = (
    "Phi-3-small is a different architecture (alternating dense and block-sparse attention, GeGELU, LayerNorm, muP, "
    "a tiktoken tokenizer) whose published code is remote code importing Triton and flash-attention kernels. The "
    "local trainer runs phitune's own plain-PyTorch Phi3SmallForCausalLM instead, on CPU or GPU, loading the "
    "checkpoint unchanged (no trust_remote_code); transformers elsewhere (Azure, Kaito) needs trust_remote_code=True."
)
_SMALL_128K_NOTE = (
    "Azure only: Phi-3-small-128k's LongRoPE (rope_scaling) is not implemented by the local trainer's "
    "Phi3SmallForCausalLM; Phi-3-small-8k-instruct trains locally."
)


def _tiny(
    name: str, context_length: int, parameters_b: float, what: str, architecture: Architecture = "phi3"
) -> CatalogModel:
    """A built-in tiny model (``phitune.tiny``): trains locally and through ``phitune serve``."""
    transformers_class = {
        "phi3": "Phi3ForCausalLM",
        "phimoe": "PhimoeForCausalLM",
        "phi3small": "Phi3SmallForCausalLM",
    }[architecture]
    return CatalogModel(
        name=name,
        hf_id=None,
        context_length=context_length,
        parameters_b=parameters_b,
        architecture=architecture,
        backends=("local", "openai"),
        note=f"Deterministic random-init {transformers_class} with an offline tokenizer ({what}): for tests.",
    )


_MOE_NOTE = (
    "41.9B parameters (16 experts, 2 active per token) whose experts stay bf16 under QLoRA too (bitsandbytes "
    "quantises the attention layers only): locally it needs ~85 GiB even as QLoRA with gradient checkpointing, or "
    "LoRA with FSDP on two 80 GB GPUs, never a 24 GiB machine (phitune.estimate says what fits)."
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
    _tiny(
        "tiny-phi4-mini",
        8192,
        0.00054,
        "Phi-4-mini's chat format, partial rotary, LongRoPE, tied embeddings, grouped-query attention",
    ),
    _tiny("tiny-phi4", 2048, 0.00076, "Phi-4's <|im_start|> chat format, grouped-query attention"),
    _tiny(
        "tiny-phi3.5-moe",
        8192,
        0.00088,
        "Phi-3.5's chat format, 4 experts with 2 active, LayerNorm, LongRoPE",
        architecture="phimoe",
    ),
    _tiny(
        "tiny-phi3-small",
        2048,
        0.00085,
        "Phi-3-small's tiktoken format and chat template, dense and block-sparse layers, GeGELU, muP, "
        "grouped-query attention",
        architecture="phi3small",
    ),
    CatalogModel(
        name="Phi-3-mini-4k-instruct",
        hf_id="microsoft/Phi-3-mini-4k-instruct",
        context_length=4096,
        parameters_b=3.82,
        azure_name="Phi-3-mini-4k-instruct",
        offers=_retired_phi3("Phi-4-mini-instruct", (*_A100, "Standard_ND96asr_v4", "Standard_ND96amsr_A100_v4")),
        kaito_preset="phi-3-mini-4k-instruct",
    ),
    CatalogModel(
        name="Phi-3-mini-128k-instruct",
        hf_id="microsoft/Phi-3-mini-128k-instruct",
        context_length=131072,
        parameters_b=3.82,
        azure_name="Phi-3-mini-128k-instruct",
        offers=_retired_phi3("Phi-4-mini-instruct", (*_A100, "Standard_ND96amsr_A100_v4")),
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
        offers=_retired_phi3(
            "Phi-4-mini-instruct", ("Standard_ND96amsr_A100_v4", "Standard_NC96ads_A100_v4"), serverless=False
        ),
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
        offers=_retired_phi3(
            "Phi-4-mini-instruct", ("Standard_ND96amsr_A100_v4", "Standard_NC96ads_A100_v4"), serverless=False
        ),
        backends=("azure",),
        note=_SMALL_128K_NOTE,
    ),
    CatalogModel(
        name="Phi-3-medium-4k-instruct",
        hf_id="microsoft/Phi-3-medium-4k-instruct",
        context_length=4096,
        parameters_b=13.96,
        azure_name="Phi-3-medium-4k-instruct",
        offers=_retired_phi3("Phi-4", ("Standard_NC96ads_A100_v4", "Standard_ND96amsr_A100_v4")),
        kaito_preset="phi-3-medium-4k-instruct",
    ),
    CatalogModel(
        name="Phi-3-medium-128k-instruct",
        hf_id="microsoft/Phi-3-medium-128k-instruct",
        context_length=131072,
        parameters_b=13.96,
        azure_name="Phi-3-medium-128k-instruct",
        offers=_retired_phi3("Phi-4", ("Standard_NC96ads_A100_v4", "Standard_ND96amsr_A100_v4")),
        kaito_preset="phi-3-medium-128k-instruct",
    ),
    CatalogModel(
        name="Phi-3.5-mini-instruct",
        hf_id="microsoft/Phi-3.5-mini-instruct",
        context_length=131072,
        parameters_b=3.82,
        azure_name="Phi-3.5-mini-instruct",
        offers=_retired_phi3("Phi-4-mini-instruct", (*_A100, "Standard_ND96amsr_A100_v4"), regions=_MAAS_REGIONS),
        kaito_preset="phi-3.5-mini-instruct",
    ),
    CatalogModel(
        name="Phi-3.5-MoE-instruct",
        hf_id="microsoft/Phi-3.5-MoE-instruct",
        context_length=131072,
        parameters_b=41.9,
        architecture="phimoe",
        azure_name="Phi-3.5-MoE-instruct",
        offers=_retired_phi3("Phi-4", ("Standard_NC96ads_A100_v4", "Standard_ND96amsr_A100_v4"), regions=_MAAS_REGIONS),
        note=_MOE_NOTE,
    ),
    CatalogModel(
        name="Phi-4-mini-instruct",
        hf_id="microsoft/Phi-4-mini-instruct",
        context_length=131072,
        parameters_b=3.84,
        azure_name="Phi-4-mini-instruct",
        offers=_phi4(
            preview=False,
            allow_list=(),
            sources=("notebook-maas", "regions-maas"),
            unverified="Phi-4-mini-instruct's registry spec is not in Azure/azureml-assets: managed compute and its "
            "allowed VM sizes come from the registry model's tags at create time only",
        ),
        kaito_preset="phi-4-mini-instruct",
    ),
    CatalogModel(
        name="Phi-4",
        hf_id="microsoft/phi-4",
        context_length=16384,
        parameters_b=14.66,
        azure_name="Phi-4",
        offers=_phi4(
            preview=True,
            allow_list=(
                *_A100,
                "Standard_ND96asr_v4",
                "Standard_ND96amsr_A100_v4",
                "Standard_NC40ads_H100_v5",
                "Standard_NC80adis_H100_v5",
                "Standard_ND96isr_H100_v5",
            ),
            sources=("registry-phi4", "regions-maas"),
            unverified="",
        ),
        kaito_preset="phi-4",
    ),
)


def find(model: str) -> CatalogModel | None:
    """The catalog entry for a name, alias or Hugging Face id (case-insensitive), or None for other models."""
    key = model.strip().lower()
    for entry in MODELS:
        if key in {entry.name.lower(), (entry.hf_id or "").lower(), f"microsoft/{entry.name.lower()}"}:
            return entry
    return None


def names() -> list[str]:
    """The names of every model in the catalog."""
    return [m.name for m in MODELS]


def offering(kind: OfferKind, on: datetime.date | None = None) -> list[str]:
    """Names of the models whose ``kind`` offer is open (not retired) on a day."""
    return [m.name for m in MODELS if (o := m.offer(kind)) is not None and o.lifecycle.stage(on) != "retired"]


def offers_table(on: datetime.date | None = None) -> str:
    """The Azure models' offers and their stages on a day, as the Markdown table docs/azure.md shows."""
    rows = [
        "| model | serverless fine-tuning | serverless deployment | managed compute | local trainer | Kaito preset |",
        "|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        if model.azure_name is None:
            continue
        cells = [_offer_cell(model.offer(kind), on) for kind in OFFER_NAMES]
        local = "yes" if model.runs_locally else "no"
        rows.append(f"| `{model.name}` | {' | '.join(cells)} | {local} | {model.kaito_preset or '-'} |")
    return "\n".join(rows)


def _offer_cell(offer: Offer | None, on: datetime.date | None) -> str:
    if offer is None:
        return "not offered"
    life = offer.lifecycle
    stage = life.stage(on)
    text = {"retired": f"retired {life.retired}", "deprecated": f"deprecated {life.deprecated}"}.get(stage, stage)
    if stage == "deprecated" and life.retired is not None:
        text += f", retires {life.retired}"
    if offer.replacement and stage != "ga":
        text += f" (use {offer.replacement})"
    return f"{text} [{', '.join(offer.sources)}]"
