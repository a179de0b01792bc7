"""A job spec's hyperparameters as the ``Dict[str, str]`` each Azure fine-tuning offer takes, and the GPUs of the
VM sizes a managed-compute job trains on (to split the global batch over them)."""

from __future__ import annotations

from decimal import Decimal
from typing import cast

from ...errors import SpecError
from ...types import JobSpec, LoRA

# What each offer takes: phitune's hyperparameter -> the Azure name. Serverless takes the names of Microsoft's MaaS
# notebook only; managed compute runs Azure ML's chat_completion pipeline component, whose inputs these are.
_SERVERLESS_NAMES = {
    "epochs": "num_train_epochs",
    "learning_rate": "learning_rate",
    "batch_size": "per_device_train_batch_size",
}
_MANAGED_NAMES = {
    **_SERVERLESS_NAMES,
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_steps": "max_steps",
    "warmup_ratio": "warmup_steps",
    "lr_scheduler": "lr_scheduler_type",
    "weight_decay": "weight_decay",
    "seed": "seed",
    "max_grad_norm": "max_grad_norm",
}
# GPUs per node of the VM sizes Azure lists for fine-tuning and inference of Phi models (Azure's VM size pages).
GPUS_PER_VM: dict[str, int] = {
    "standard_nc6s_v3": 1,
    "standard_nc12s_v3": 2,
    "standard_nc24s_v3": 4,
    "standard_nd40rs_v2": 8,
    "standard_nc24ads_a100_v4": 1,
    "standard_nc48ads_a100_v4": 2,
    "standard_nc96ads_a100_v4": 4,
    "standard_nd96asr_v4": 8,
    "standard_nd96amsr_a100_v4": 8,
    "standard_nc40ads_h100_v5": 1,
    "standard_nc80adis_h100_v5": 2,
    "standard_nd96isr_h100_v5": 8,
}


def _hyperparameters(spec: JobSpec, gpus: int | None, examples: int | None) -> tuple[dict[str, str], str]:
    """The Azure ``Dict[str, str]`` for the spec, and a sentence saying how ``batch_size`` maps to Azure's batch.

    ``gpus`` is None for serverless (Azure's names from its MaaS notebook only), else the GPUs of the managed-compute
    node (the pipeline component's names, LoRA's, ``warmup_steps`` from ``warmup_ratio`` over the steps of
    :meth:`~phitune.types.Hyperparameters.plan`, as the local trainer counts them, and the global ``batch_size``
    split over the GPUs)."""
    hp = spec.hyperparameters
    if gpus is None:
        out = {azure: _string(getattr(hp, ours)) for ours, azure in _SERVERLESS_NAMES.items()}
        mapping = (
            f"batch_size {hp.batch_size} is sent as per_device_train_batch_size={hp.batch_size}; Azure does not "
            f"disclose how many devices a serverless job uses, so its global batch is {hp.batch_size} x that count"
        )
        return out, mapping
    if hp.batch_size % gpus:
        raise SpecError(
            "hyperparameters.batch_size",
            f"the global batch of {hp.batch_size} cannot be split evenly over {gpus} GPUs; use a multiple of {gpus}",
        )
    per_device = hp.batch_size // gpus
    out = {
        "num_train_epochs": str(hp.epochs),
        "learning_rate": _string(hp.learning_rate),
        "per_device_train_batch_size": str(per_device),
        "gradient_accumulation_steps": str(hp.gradient_accumulation_steps),
        "lr_scheduler_type": hp.lr_scheduler,
        "weight_decay": _string(hp.weight_decay),
        "seed": str(hp.seed),
        "max_grad_norm": _string(hp.max_grad_norm) if hp.max_grad_norm is not None else "0",  # 0: no clipping (HF)
    }
    if hp.max_steps is not None:
        out["max_steps"] = str(hp.max_steps)
    if hp.warmup_ratio > 0:
        if examples is None and hp.max_steps is None:
            raise SpecError(
                "hyperparameters.warmup_ratio",
                "managed compute takes warmup_steps, and the training file records no example count to compute "
                "them from; upload it with client.files.upload or set max_steps",
            )
        warmup = int(hp.warmup_ratio * hp.plan(examples or 1).total_steps)
        out["warmup_steps"] = str(warmup)
        if hp.lr_scheduler == "constant" and warmup:
            out["lr_scheduler_type"] = "constant_with_warmup"  # phitune's constant schedule warms up first
    method = cast(LoRA, spec.method)
    out.update(apply_lora="true", lora_r=str(method.r), lora_alpha=str(method.alpha))
    out["lora_dropout"] = _string(method.dropout)
    mapping = (
        f"batch_size {hp.batch_size} is the global batch: per_device_train_batch_size={per_device} on {gpus} GPU(s)"
    )
    return out, mapping


def _string(value: object) -> str:
    """A hyperparameter as Azure takes it: decimals without exponents, booleans lower-case."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(Decimal(repr(value)).normalize(), "f")
    return str(value)
