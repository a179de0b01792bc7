"""Loading base models and applying a fine-tuning method to them.

``resolve_base`` is light (no torch); the loaders import torch, transformers and peft when called.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import catalog
from .._specs import peft_config
from ..errors import SpecError, UnsupportedOptionError
from ..tiny import ensure_tiny
from ..types import PEFT, DoRA, Full, LoRA, Method, QLoRA


def resolve_base(model: str, home: Path) -> str:
    """What ``from_pretrained`` should load for a model argument: a local folder (given as an absolute path) or a
    Hugging Face id. A relative name is an id, never a folder: one that a file or folder of the working directory
    shadows (transformers would load that instead) is a :class:`SpecError`."""
    entry = catalog.find(model)
    if entry is not None:
        if not entry.runs_locally:
            raise UnsupportedOptionError("model", "local", entry.note or f"{entry.name} does not run locally")
        if entry.hf_id is None:
            return str(ensure_tiny(home / "models" / "base", entry.name))
        return entry.hf_id
    folder = Path(model).expanduser()
    if folder.is_absolute() and folder.is_dir():
        if not (folder / "config.json").exists():
            raise SpecError("model", f"{folder} is a folder without config.json (not a transformers model folder)")
        return str(folder.resolve())
    if not folder.is_absolute() and folder.exists():
        raise SpecError(
            "model",
            f"{model!r} is read as a Hugging Face id, but the working directory holds a file or folder of that name: "
            "give a model folder as an absolute path",
        )
    return model


@dataclass(frozen=True)
class Base:
    """What preparing a job's data needs of its base model; its weights stay unloaded."""

    tokenizer: Any
    context_length: int | None
    model_type: str | None = None
    """``config.json``'s ``model_type`` (``phi3``, ``phimoe``, ...)."""


def open_base(model: str, path: str) -> Base:
    """The tokenizer and context length of the base ``model`` found at ``path`` (:func:`resolve_base`), read from its
    config and tokenizer files. A base that cannot be loaded is a :class:`SpecError` on ``model`` that names it as the
    job does: a missing folder, a Hugging Face id neither in this machine's cache nor downloadable, an architecture
    transformers has no causal language model for, or no tokenizer."""
    from transformers import AutoConfig, PretrainedConfig, __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_types = {*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *register_architectures()}
    if not Path(path).is_dir():
        _check_reachable(model, path)
    try:
        model_type = PretrainedConfig.get_config_dict(path)[0].get("model_type")
        config = AutoConfig.from_pretrained(path) if model_type in causal_types else None
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"{model!r} cannot be loaded: {_first_line(exc)}") from None
    if config is None:
        raise SpecError(
            "model",
            f"{model!r} is a {model_type or 'untyped'} model (config.json model_type), for which transformers "
            f"{__version__} has no causal language model",
        )
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError, TypeError) as exc:
        raise SpecError("model", f"{model!r} has no tokenizer transformers can load: {_first_line(exc)}") from None
    return Base(tokenizer, getattr(config, "max_position_embeddings", None), model_type)


def _check_reachable(model: str, hub_id: str) -> None:
    """Refuse at once what can only fail: a path to a folder that does not exist, or a Hugging Face id that is not in
    the cache while the hub is offline (``HF_HUB_OFFLINE``)."""
    if hub_id.startswith((".", "~", "/")):
        raise SpecError("model", f"no model folder {model} on this machine")
    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline and not isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        what = (
            f"{model!r} is not a catalog model, a model folder on this machine or a Hugging Face id in its cache"
            if model == hub_id
            else f"{model!r} (Hugging Face id {hub_id}) is not in this machine's Hugging Face cache"
        )
        raise SpecError("model", f"{what}, and HF_HUB_OFFLINE forbids downloading it")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def bf16_supported() -> bool:
    """True where bf16 matmuls are fast: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def register_architectures() -> tuple[str, ...]:
    """Make transformers' auto classes load the architectures phitune implements itself, without remote code:
    Phi-3-small (:mod:`.phi3_small`). Returns their ``model_type`` names."""
    from .phi3_small import MODEL_TYPE, register

    register()
    return (MODEL_TYPE,)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    register_architectures()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_method(method: Method, model_type: str | None) -> None:
    """Refuse a method that cannot apply to a model of this ``model_type``, naming the field to change: expert
    targets on a dense model, DoRA on expert tensors (peft's DoRA has no form for them) and dropout with expert
    adapters (peft's adapters on tensors take none)."""
    if not isinstance(method, LoRA | QLoRA | DoRA):
        return
    experts = method.expert_targets(model_type or "")
    if experts and model_type != "phimoe":
        raise SpecError("method.target_parameters", f"a {model_type} model has no experts to adapt; leave it unset")
    if experts and isinstance(method, DoRA):
        raise SpecError(
            "method.target_parameters",
            f"peft's DoRA cannot adapt expert tensors ({', '.join(experts)}); pass target_parameters=() to train "
            "DoRA on the attention layers with the experts frozen, or use method='lora'",
        )
    if experts and method.dropout:
        raise SpecError(
            "method.dropout",
            f"peft's adapters on expert tensors ({', '.join(experts)}) take no dropout: set dropout=0, or "
            "target_parameters=() to train the attention layers alone with the experts frozen",
        )


def apply_method(
    model: Any,
    method: Method,
    *,
    gradient_checkpointing: bool,
    keep_matmul_layers: int = 0,
    keep_down_projections: int = 0,
) -> Any:
    """Wrap ``model`` for training with ``method``; returns the model whose trainable parameters are optimised.
    With gradient checkpointing, the first ``keep_matmul_layers`` decoder layers keep their matmul outputs and the
    next ``keep_down_projections`` their down projection's (:func:`keep_matmul_outputs`). RMSNorms train through
    :mod:`.norm`, Phi-3's attention inputs and SwiGLU through :mod:`.decoder`."""
    from .decoder import use_fused_decoder
    from .norm import use_training_rms_norm

    use_training_rms_norm(model)
    use_fused_decoder(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        keep_matmul_outputs(
            model, keep_matmul_layers, adapter_rank=getattr(method, "r", 0), down_projections=keep_down_projections
        )
    if isinstance(method, Full):
        model.requires_grad_(True)
        return model
    import peft

    config: Any
    if isinstance(method, LoRA | QLoRA | DoRA):
        model_type = model.config.model_type
        check_method(method, model_type)
        if isinstance(method, QLoRA):
            # frozen as loaded: peft's prepare_model_for_kbit_training would also copy the bf16 embeddings, norms and
            # head to fp32 (+0.8 GB on Phi-3-mini) for no gain here, the adapters train in fp32 either way
            model.requires_grad_(False)
            from .quantized import reuse_dequantisation_buffer

            reuse_dequantisation_buffer(model)
        config = peft.LoraConfig(
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=list(method.targets(model_type)),
            target_parameters=list(method.expert_targets(model_type)) or None,
            use_dora=isinstance(method, DoRA),
            task_type="CAUSAL_LM",
        )
    elif isinstance(method, PEFT):
        config = peft_config(method)
    else:  # pragma: no cover - the Method union is closed
        raise SpecError("method", f"unknown method {method!r}")
    if gradient_checkpointing:
        model.enable_input_require_grads()
    adapted = peft.get_peft_model(model, config)
    if isinstance(method, LoRA | QLoRA | DoRA):
        from .lora import fuse_lora_layers

        fuse_lora_layers(adapted)
    return adapted


def describe_experts(model: Any) -> tuple[str, dict[str, Any]] | None:
    """What trains of a mixture-of-experts model (after :func:`apply_method`): its expert weights, the adapters on
    them and its routers, each trainable or frozen, with parameter counts, and the expert weights' dtype (QLoRA leaves
    them unquantised); None for a dense model. A message and the event's data."""
    groups: dict[str, dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if ".experts." in name:
            group = "expert_adapters" if ".lora_" in name else "expert_weights"
        elif ".router." in name:
            group = "routers"
        else:
            continue
        entry = groups.setdefault(group, {"parameters": 0, "trainable": 0, "dtype": str(parameter.dtype)[6:]})
        entry["parameters"] += int(parameter.numel())
        entry["trainable"] += int(parameter.numel()) if parameter.requires_grad else 0
    if "expert_weights" not in groups:
        return None

    def state(group: str) -> str:
        entry = groups[group]
        if entry["trainable"] == entry["parameters"]:
            return f"{entry['parameters']:,} trainable"
        if entry["trainable"] == 0:
            return f"{entry['parameters']:,} frozen"
        return f"{entry['trainable']:,} of {entry['parameters']:,} trainable"

    weights = groups["expert_weights"]
    quantized = any(getattr(getattr(m, "weight", None), "quant_state", None) is not None for m in model.modules())
    kept = ", not quantised: bitsandbytes quantises linear layers only" if quantized else ""
    parts = [f"expert weights {state('expert_weights')} ({weights['dtype']}{kept})"]
    parts.append(f"expert adapters {state('expert_adapters')}" if "expert_adapters" in groups else "no expert adapters")
    if "routers" in groups:
        parts.append(f"routers {state('routers')}")
    return "mixture of experts: " + ", ".join(parts), {"experts": groups}


def keep_matmul_outputs(model: Any, layers: int, *, adapter_rank: int = 0, down_projections: int = 0) -> None:
    """Selective activation checkpointing (``torch.utils.checkpoint``'s policies) for the first ``layers``
    checkpointed decoder layers: they keep the outputs of their base matmuls and of attention, so recomputing them
    in the backward redoes only the element-wise work between those, not the matmuls that are nearly all of the
    FLOPs. The next ``down_projections`` layers keep only the outputs of matmuls whose inner dimension exceeds the
    hidden size (the MLP's down projection: the most FLOPs saved per byte kept). The low-rank adapter matmuls (rank
    <= ``adapter_rank``) are recomputed: cheap, and their outputs are as wide as the base's. Values are bit-identical
    to full recomputation."""
    if layers <= 0 and down_projections <= 0:
        return
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    from transformers.modeling_layers import GradientCheckpointingLayer

    def selective(min_inner: int) -> Any:
        policy = functools.partial(_keep_matmuls, adapter_rank=adapter_rank, min_inner=min_inner)
        contexts = functools.partial(create_selective_checkpoint_contexts, policy)
        return functools.partial(checkpoint, use_reentrant=False, context_fn=contexts)

    checkpointed = [
        m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    ]
    whole, deep = selective(0), selective(model.config.hidden_size + 1)
    first = max(layers, 0)
    for layer in checkpointed[:first]:
        layer._gradient_checkpointing_func = whole
    for layer in checkpointed[first : first + down_projections]:
        layer._gradient_checkpointing_func = deep


def _keep_matmuls(ctx: Any, op: Any, *args: Any, adapter_rank: int, min_inner: int, **kwargs: Any) -> Any:
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    if op in (aten.mm.default, aten.addmm.default):  # mm(input, weight.T), addmm(bias, input, weight.T)
        inner, outer = args[-1].shape
        if min(inner, outer) > adapter_rank and inner >= min_inner:
            return CheckpointPolicy.MUST_SAVE
    elif str(op) == QLORA_MATMUL:  # gemm_4bit(input, packed, [out, in], ...)
        if args[2][1] >= min_inner:
            return CheckpointPolicy.MUST_SAVE
    elif op in _attention_ops() and min_inner == 0:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


QLORA_MATMUL = "bitsandbytes.gemm_4bit.default"
"""bitsandbytes' 4-bit matmul op: dequantisation and matmul in one, so a kept layer redoes neither (off CPU; on CPU
the layers run :mod:`.quantized`'s matmul, which the aten.mm rule keeps)."""


@functools.cache
def _attention_ops() -> frozenset[Any]:
    """The fused attention kernels SDPA dispatches to (those this torch build has), and phitune's
    (:mod:`.attention`)."""
    import torch

    from .attention import attention_and_probabilities

    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    fused = (getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name))
    return frozenset((*fused, attention_and_probabilities._opoverload))


def quantized_footprint(model: Any) -> dict[str, int] | None:
    """Measured bytes of a QLoRA base's 4-bit linear weights as they lie in memory (packed weights plus their
    quantisation state: block scales, nested scales, code books), beside the bytes of the same weights in bf16 and
    fp32; None for a model without 4-bit layers."""
    import bitsandbytes as bnb
    import torch

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return None
    weights = sum(math.prod(layer.weight.quant_state.shape) for layer in layers)
    stored = 0
    for layer in layers:
        state = layer.weight.quant_state.as_dict(packed=False)
        tensors = [layer.weight, *(v for v in state.values() if isinstance(v, torch.Tensor))]
        stored += sum(t.numel() * t.element_size() for t in tensors)
    return {
        "layers": len(layers),
        "weights": weights,
        "bytes": stored,
        "bf16_bytes": 2 * weights,
        "fp32_bytes": 4 * weights,
    }


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its unpacked size."""

    def count(p: Any) -> int:
        quant_state = getattr(p, "quant_state", None)
        return math.prod(quant_state.shape) if quant_state is not None else int(p.numel())

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return trainable, total
