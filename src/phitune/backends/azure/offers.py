"""A model's Azure offers as the registry states them: the model reference, the lifecycle dates, regions and VM
sizes in the registry model's tags (they override :mod:`phitune.catalog`), and the checks and notes they give."""

from __future__ import annotations

import re
import warnings
from datetime import date
from typing import Any

from ... import catalog
from ...errors import OfferLifecycleWarning, OfferRetiredError, SpecError, UnsupportedOptionError
from ...types import JobSpec
from .convert import _REGISTRY_MODEL, BACKEND, REGISTRY
from .hyperparameters import _MANAGED_NAMES, _SERVERLESS_NAMES, _string

REGIONS_TAG = "maas-finetuning-deploy-regions"
# Registry tags that carry an offer's lifecycle: (offer, Lifecycle field) per tag.
_LIFECYCLE_TAGS: dict[str, tuple[tuple[catalog.OfferKind, str], ...]] = {
    "FinetuneDeprecationDate": (("serverless_finetune", "deprecated"), ("managed_finetune", "deprecated")),
    "FinetuneRetirementDate": (("serverless_finetune", "retired"),),
    "InferenceLegacyDate": (("serverless_deploy", "legacy"),),
    "InferenceDeprecationDate": (("serverless_deploy", "deprecated"),),
    "InferenceRetirementDate": (("serverless_deploy", "retired"),),
}
ALLOW_LIST_TAG = "finetune_compute_allow_list"
DEFAULTS_TAG = "model_specific_defaults"


def _model_ref(model: str) -> tuple[str, str | None, catalog.CatalogModel | None]:
    """(registry model name, version or None for latest, catalog entry) for a catalog name or an azureml id."""
    match = _REGISTRY_MODEL.match(model)
    if match:
        if match["registry"] != REGISTRY:
            raise UnsupportedOptionError(
                "model", BACKEND, f"only models of the {REGISTRY!r} registry (no marketplace subscription needed)"
            )
        name, version = match["name"], match["v"]
        entry = catalog.find(name)
    else:
        entry = catalog.find(model)
        if entry is None or entry.azure_name is None:
            known = ", ".join(m.name for m in catalog.MODELS if m.azure_name)
            raise UnsupportedOptionError(
                "model",
                BACKEND,
                f"{model!r} is not an Azure model phitune knows; use one of {known} "
                f"or an azureml://registries/{REGISTRY}/models/<name> id",
            )
        name, version = entry.azure_name, None
    if entry is not None and BACKEND not in entry.backends:
        raise UnsupportedOptionError("model", BACKEND, f"{entry.name} is not available on Azure")
    return name, version, entry


def _tag_date(value: str) -> date | None:
    try:
        return date.fromisoformat(value.strip()[:10])
    except ValueError:
        return None


def _live_offer(offer: catalog.Offer | None, kind: catalog.OfferKind, tags: dict[str, str]) -> catalog.Offer | None:
    """The packaged offer updated from the registry model's tags, which win where present."""
    dates = {
        field: date
        for tag, targets in _LIFECYCLE_TAGS.items()
        for target, field in targets
        if target == kind and tag in tags and (date := _tag_date(tags[tag])) is not None
    }
    update: dict[str, Any] = {}
    if dates:
        lifecycle = offer.lifecycle if offer is not None else catalog.Lifecycle()
        update["lifecycle"] = lifecycle.model_copy(update=dates)
    regions = tuple(re.findall(r"[a-z0-9]+", tags.get(REGIONS_TAG, "").lower()))
    if regions and kind != "managed_finetune":
        update["regions"] = regions
    allow_list = tuple(re.findall(r"Standard_\w+", tags.get(ALLOW_LIST_TAG, "")))
    if allow_list and kind == "managed_finetune":
        update["compute_allow_list"] = allow_list
    if not update:
        return offer
    update["sources"] = (*(offer.sources if offer is not None else ()), "registry tags")
    return offer.model_copy(update=update) if offer is not None else catalog.Offer(kind=kind, **update)


def _refuse_retired(offer: catalog.Offer, model: str, entry: catalog.CatalogModel | None) -> None:
    """Raise :class:`OfferRetiredError` for a retired offer, naming the date, the replacement and what is still open."""
    if offer.lifecycle.stage() != "retired":
        return
    alternatives = []
    managed = entry.offer("managed_finetune") if entry is not None else None
    if offer.kind == "serverless_finetune" and managed is not None and managed.lifecycle.stage() != "retired":
        alternatives.append(f"on managed compute (compute=phitune.AzureCompute(...), {managed.lifecycle.stage()})")
    if entry is not None and entry.runs_locally:
        alternatives.append("locally (phitune.Client())")
    message = f"Azure retired {offer.name} of {model} on {offer.lifecycle.retired}"
    if offer.replacement:
        message += f"; use {offer.replacement} instead"
    if alternatives:
        message += f", or train {model} {' or '.join(alternatives)}"
    raise OfferRetiredError(
        "compute" if offer.kind == "managed_finetune" else "model",
        BACKEND,
        message,
        retired_on=offer.lifecycle.retired,
        replacement=offer.replacement,
        alternatives=alternatives,
    )


def _lifecycle_notes(offer: catalog.Offer, model: str) -> list[tuple[str, str]]:
    """A warning (also given to ``warnings.warn``) for a legacy or deprecated offer, a note for a preview one."""
    stage = offer.lifecycle.stage()
    if stage in ("legacy", "deprecated"):
        text = f"{offer.name} of {model} is {stage}"
        if offer.lifecycle.retired is not None:
            text += f" and retires on {offer.lifecycle.retired}"
        if offer.replacement:
            text += f"; Azure suggests {offer.replacement}"
        warnings.warn(text, OfferLifecycleWarning, stacklevel=4)
        return [("warn", text)]
    if stage == "preview":
        return [("info", f"{offer.name} of {model} is in preview: Azure may change or withdraw it at short notice")]
    return []


def _model_defaults(tags: dict[str, str]) -> dict[str, str]:
    """The registry model's ``model_specific_defaults`` tag (a serialised mapping) as strings."""
    pairs = re.findall(r"['\"]?(\w+)['\"]?\s*[:=]\s*['\"]?([^,'\"}\s]+)", tags.get(DEFAULTS_TAG, ""))
    return dict(pairs)


def _check_learning_rate(learning_rate: float, tags: dict[str, str]) -> None:
    """Refuse a learning rate outside the model's ``learning_rate_min``..``learning_rate_max`` where the registry
    states them."""
    defaults = _model_defaults(tags)
    try:
        low, high = float(defaults["learning_rate_min"]), float(defaults["learning_rate_max"])
    except (KeyError, ValueError):
        return
    if not low <= learning_rate <= high:
        raise SpecError(
            "hyperparameters.learning_rate",
            f"Azure takes learning rates from {_string(low)} to {_string(high)} for this model "
            f"(registry default {defaults.get('learning_rate', '?')}); got {_string(learning_rate)}",
        )


def _azure_defaults_note(spec: JobSpec, tags: dict[str, str]) -> list[tuple[str, str]]:
    """Where the offer does not take a hyperparameter, Azure's own default applies: say which ones differ."""
    names = _SERVERLESS_NAMES if spec.compute is None else _MANAGED_NAMES
    defaults = _model_defaults(tags)
    azure_names = {"lr_scheduler": "lr_scheduler_type", "gradient_accumulation_steps": "gradient_accumulation_steps"}
    differing = [
        f"{azure}={defaults[azure]} (phitune's {ours}: {getattr(spec.hyperparameters, ours)})"
        for ours, azure in azure_names.items()
        if ours not in names and azure in defaults and defaults[azure] != str(getattr(spec.hyperparameters, ours))
    ]
    if not differing:
        return []
    return [
        ("info", f"Azure applies the model's own defaults for what this offer does not take: {', '.join(differing)}")
    ]
