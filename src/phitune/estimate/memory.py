"""The memory model: what the local trainer holds at its peak (a backward pass after the first optimizer step):

- ``runtime``: the Python process with torch, transformers, peft and the data (measured on this stack);
- ``weights``: the base as loaded (:mod:`phitune.trainer.loading`): bf16 for frozen bases where bf16 is fast, fp32 for
  full fine-tuning, 4-bit NF4 blocks plus their scales for QLoRA's linear layers (embeddings and head in bf16). A
  frozen bf16 embedding loaded from a bf16 checkpoint stays memory-mapped on the CPU, and only the rows of the tokens
  the data holds are ever read: it counts those rows (each with a page of slack) when the data is known;
- ``trainable``: trainable parameters in fp32 with their gradients and AdamW's two moments (16 bytes each);
- ``activations``: per token and decoder layer, ``ACT_H`` x hidden + ``ACT_I`` x intermediate bytes kept for the
  backward pass, plus on a CPU the attention probabilities the attention kernel keeps on narrow models
  (:func:`attention_probability_bytes`); with gradient checkpointing ``CHECKPOINT_BYTES`` x hidden per token and
  layer, plus one layer recomputed at a time, plus the matmul outputs checkpointing keeps (:func:`kept_outputs`, in
  half the memory beside that peak: the down projection's in every layer first, then whole layers, which recompute
  no matmul, with their attention probabilities);
- ``logits``: the LM head and loss. The trainer computes them in chunks (:mod:`phitune.trainer.loss`): one chunk of
  logits at a time plus the stored gradient of the hidden states (and of the head in full fine-tuning). Where it uses
  the plain loss (prompt learning, DeepSpeed ZeRO-3), vocabulary x ``LOGIT_BYTES`` per labelled token;
- ``transient``: QLoRA's dequantisation buffer (``DEQUANTISED_WEIGHTS`` of its largest weight in bf16, fitted);
  the bf16 copies of every weight that autocast makes in full fine-tuning; and where the trainer runs on the C
  library's allocator rather than mimalloc (:mod:`phitune._allocator`), the heap's fragmentation, a
  frozen base's ``SYSTEM_HEAP_SLACK_LAYERS`` decoder layers of bf16 weights.

Light: no torch at import (counting the trainable parameters of a generic peft method builds the model on the meta
device).
"""

from __future__ import annotations

import math
import os
import re
from typing import Literal

from pydantic import BaseModel, Field

from .. import _allocator as allocator
from ..errors import SpecError
from ..types import PEFT, DoRA, Full, JobSpec, LoRA, Method, QLoRA
from .shapes import ModelShape

GiB = 2**30

RUNTIME_BYTES = 480 * 2**20
"""Resident memory of a trainer process before the model: interpreter, torch, transformers, peft, tokenizer, data, on
mimalloc (tiny-phi3 jobs measured 505-510 MB with peft)."""

ACT_H = 60.0
"""Activation bytes kept per token, decoder layer and unit of hidden size (bf16 autocast, LoRA on every linear)."""

ACT_I = 15.0
"""Activation bytes kept per token, decoder layer and unit of intermediate size."""

CHECKPOINT_BYTES = 4.0
"""Bytes kept per token, decoder layer and unit of hidden size with gradient checkpointing: the layer's bf16 input (2)
and the allocator's slack around it (fitted against Phi-3-mini and the 60M model at 256-token micro-batches)."""

KEEP_PROBABILITIES_MAX_LENGTH = 1024
"""The longest example whose attention probabilities the CPU attention kernel keeps (they take ``2 * heads * length``
bytes per token and layer); longer ones recompute them."""

GEMM_ATTENTION_LENGTH_MULTIPLE = 32
"""That kernel pads each example to a multiple of this many tokens (``phitune.trainer.attention.LENGTH_MULTIPLE``)."""

KEEP_PROBABILITIES_SHARE = 0.02
"""That kernel keeps an example's attention probabilities for the backward where recomputing them (the score matmul,
``2 * length² * hidden`` FLOPs per layer) would cost at least this share of the layer's matmul work on the example
(forward and input-gradient products, ``4 * length * layer parameters``): see :func:`keeps_attention_probabilities`."""

KEEP_MATMULS_SHARE = 0.5
"""Share of the memory left beside a fully recomputing job's predicted peak that kept matmul outputs may take (see
:func:`kept_outputs`); the rest is margin for what the estimate does not see."""

ACT_FULL = 1.25
"""Activations grow by this factor when every weight trains (each linear also keeps its input for its gradient)."""

LOGIT_BYTES = 14
"""Bytes per labelled token and vocabulary entry of the plain loss: bf16 logits, their fp32 copy, log-softmax,
gradient."""

LOSS_CHUNK_ELEMENTS = 8 * 2**20
"""Logits per chunk of the chunked loss (the trainer's ``CHUNK_ELEMENTS``), in the buffers it keeps: fp32 logits and
their bf16 product and gradient, 6 bytes each."""

LOSS_MIN_CHUNK_ROWS = 128
"""The fewest rows per chunk (the trainer's ``MIN_CHUNK_ROWS``): large vocabularies (Phi-4-mini's 200064) get chunks of
more than ``LOSS_CHUNK_ELEMENTS`` logits."""

PROMPT_LEARNING = frozenset({"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING"})

DEQUANTISED_WEIGHTS = 1.7
"""QLoRA's transient at the peak, in units of its largest linear weight in bf16: the trainer's dequantisation buffer
(one weight) and bitsandbytes' temporaries beside it (fitted on Phi-3-mini: 1.7)."""

SYSTEM_HEAP_SLACK_LAYERS = 1.0
"""Decoder layers of bf16 weights that the C library's allocator adds at the peak of a frozen base's training, over
mimalloc: free holes in its heap (Phi-3-mini: 0.5 layers for LoRA, 1.4 for QLoRA)."""

PAGE_BYTES = 4096
"""A memory page: a touched row of a memory-mapped embedding brings in the pages it spans."""

_QUANT_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
"""Bytes per 4-bit weight: packed nibbles, plus one scale per block of 64 (uint8 with double quantisation, whose
fp32 scales cover 256 blocks each; fp32 without)."""


class MemoryBreakdown(BaseModel):
    """Bytes at the peak of a training step, by what holds them."""

    runtime: int
    weights: int
    trainable: int = Field(description="Trainable parameters with their gradients and optimizer state.")
    activations: int
    logits: int
    transient: int

    @property
    def total(self) -> int:
        """The sum of the parts, in bytes."""
        return self.runtime + self.weights + self.trainable + self.activations + self.logits + self.transient


def peak_memory(
    shape: ModelShape,
    spec: JobSpec,
    tokens: int,
    compute: str,
    probabilities: int,
    *,
    embedding_rows: int | None = None,
) -> MemoryBreakdown:
    """Bytes at the peak of one process that trains micro-batches of ``tokens`` tokens, keeping ``probabilities``
    bytes of attention probabilities per token and layer (:func:`attention_probability_bytes`). ``embedding_rows``:
    how many rows of a memory-mapped embedding the data can touch (its distinct tokens, or an upper bound); None:
    all."""
    method, hp = spec.method, spec.hyperparameters
    h, i, layers, vocab = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.vocab_size
    weight_bytes = 2 if weight_dtype(method, compute) == "bf16" else 4
    linear = layers * shape.layer_linear_parameters
    other = shape.parameters - linear
    if isinstance(method, QLoRA):
        weights = round(linear * _QUANT_BYTES[method.double_quant]) + other * weight_bytes
    else:
        weights = shape.parameters * weight_bytes
    mapped = not isinstance(method, Full) and shape.checkpoint_dtype == "bfloat16" and not shape.tie_word_embeddings
    if embedding_rows is not None and mapped and weight_bytes == 2:
        row = h * weight_bytes
        weights -= max(0, vocab * row - min(embedding_rows, vocab) * (row + PAGE_BYTES))
    trainable = trainable_parameters(shape, spec)
    trainable_bytes = trainable * (12 if isinstance(method, Full) else 16)  # Full: the fp32 weights are `weights`
    act_bytes = 1.0 if compute == "bf16" else 2.0  # fp32 compute keeps fp32 activations
    per_layer = tokens * (ACT_H * h + ACT_I * i * shape.active_mlps) * act_bytes
    per_layer = per_layer * (ACT_FULL if isinstance(method, Full) else 1.0) + tokens * probabilities
    # peft's expert adapters merge into each targeted expert tensor on every forward: a layer's merged weights are
    # kept for its backward, and their gradient made there
    merged = merged_expert_parameters(shape, method) * weight_bytes
    if hp.gradient_checkpointing:
        activations = round(layers * tokens * h * CHECKPOINT_BYTES * act_bytes + per_layer + merged)
    else:
        activations = round(layers * (per_layer + merged))
    layout = spec.distributed
    plain_loss = pads_batches(spec) or (layout.strategy == "deepspeed" and (layout.zero_stage or 0) >= 3)
    if plain_loss:
        logits = tokens * vocab * LOGIT_BYTES
    else:
        stored = tokens * h * act_bytes * 2  # the gradient of the hidden states, in the compute dtype
        chunk = max(LOSS_CHUNK_ELEMENTS, LOSS_MIN_CHUNK_ROWS * vocab)
        logits = round(chunk * 6 + stored + (vocab * h * 4 if isinstance(method, Full) else 0))
    transient = merged
    if isinstance(method, QLoRA):
        quantized = ("qkv_proj", "o_proj") if shape.experts else tuple(shape.linear_shapes())
        largest = max(a * b for name, (a, b) in shape.linear_shapes().items() if name in quantized)
        transient += round(DEQUANTISED_WEIGHTS * largest * 2)
    if isinstance(method, Full):  # autocast's bf16 copy of each weight, saved for backward
        transient += layers * shape.layer_weight_parameters * 2 if compute == "bf16" else 0
    elif allocator.for_trainers() == "system":
        transient += round(SYSTEM_HEAP_SLACK_LAYERS * shape.layer_weight_parameters * 2)
    return MemoryBreakdown(
        runtime=RUNTIME_BYTES,
        weights=weights,
        trainable=trainable_bytes,
        activations=activations,
        logits=logits,
        transient=transient,
    )


def merged_expert_parameters(shape: ModelShape, method: Method) -> int:
    """Weights of one layer's expert tensors that the method's expert adapters merge into (0 without)."""
    if not isinstance(method, LoRA | QLoRA | DoRA):
        return 0
    sizes = {"experts.gate_up_proj": 2, "experts.down_proj": 1}  # in units of hidden x intermediate, per expert
    units = sum(sizes.get(target, 0) for target in method.expert_targets(shape.model_type))
    return shape.experts * units * shape.hidden_size * shape.intermediate_size


def job_peak(memory: MemoryBreakdown, spec: JobSpec) -> int:
    """Every process of the job together; FSDP and ZeRO shard what they shard across the processes."""
    return spec.distributed.nproc * (memory.total - _sharded(memory, spec)) + _sharded(memory, spec)


def process_peak(memory: MemoryBreakdown, spec: JobSpec) -> int:
    """One process of the job (one GPU's share under FSDP or ZeRO)."""
    sharded = _sharded(memory, spec)
    return memory.total - sharded + sharded // spec.distributed.nproc


def _sharded(memory: MemoryBreakdown, spec: JobSpec) -> int:
    """The bytes of one process's memory that FSDP or ZeRO divide among the processes (none with one process)."""
    layout = spec.distributed
    if layout.nproc == 1:
        return 0
    if layout.strategy == "fsdp" or (layout.strategy == "deepspeed" and (layout.zero_stage or 0) >= 3):
        return memory.weights + memory.trainable
    if layout.strategy == "deepspeed":
        return memory.trainable * 3 // 4  # ZeRO-1/2 shard optimizer state (and gradients at 2)
    return 0


def pads_batches(spec: JobSpec) -> bool:
    """Whether the trainer pads a micro-batch's examples to the longest (prompt learning) rather than packing them."""
    method = spec.method
    return isinstance(method, PEFT) and str(method.config.get("peft_type", "")).upper() in PROMPT_LEARNING


def matmul_output_bytes(shape: ModelShape, compute: str, probabilities: int = 0) -> int:
    """Bytes per token of one decoder layer's matmul and attention outputs (what a layer that keeps them holds);
    ``probabilities``: the attention probabilities' (:func:`attention_probability_bytes`), kept with them."""
    shapes = shape.linear_shapes()
    mlp = shape.active_mlps * (shapes["gate_up_proj"][1] + shapes["down_proj"][1])
    values = shapes["qkv_proj"][1] + shapes["o_proj"][1] + mlp + shape.hidden_size
    return values * (2 if compute == "bf16" else 4) + probabilities


def probabilities_kept_from(shape: ModelShape) -> int:
    """The shortest example whose attention probabilities the CPU attention kernel keeps for the backward (see
    :data:`KEEP_PROBABILITIES_SHARE`): ~180 tokens on the 32M-parameter benchmark model (hidden 384), where attention
    is a large share of the work; ~1500 tokens on Phi-3-mini, beyond :data:`KEEP_PROBABILITIES_MAX_LENGTH`, so Phi-3's
    real sizes always recompute them, as a flash kernel does."""
    return math.ceil(2 * KEEP_PROBABILITIES_SHARE * shape.layer_active_parameters / shape.hidden_size)


def keeps_attention_probabilities(shape: ModelShape, length: int) -> bool:
    """Whether the CPU attention kernel (``phitune.trainer.attention``) keeps the probabilities of an example of
    ``length`` tokens for the backward, on a model of ``shape``; the trainer asks this too."""
    return probabilities_kept_from(shape) <= length <= KEEP_PROBABILITIES_MAX_LENGTH


def attention_probability_bytes(shape: ModelShape, length: int, compute: str, device: str) -> int:
    """Bytes per token and decoder layer of the softmax probabilities that the CPU attention kernel
    (``phitune.trainer.attention``) keeps for the backward, in examples of ``length`` tokens: heads x the padded
    length where it keeps them (:func:`keeps_attention_probabilities`). Nothing on a GPU (SDPA's kernels)."""
    if device != "cpu" or not keeps_attention_probabilities(shape, length):
        return 0
    padded = length + -length % GEMM_ATTENTION_LENGTH_MULTIPLE
    return shape.num_attention_heads * padded * (2 if compute == "bf16" else 4)


def down_projection_output_bytes(shape: ModelShape, compute: str) -> int:
    """Bytes per token of one decoder layer's down-projection output: the matmul that saves the most recomputation per
    byte kept (its inner dimension is the intermediate size, the others' the hidden size)."""
    return shape.hidden_size * (2 if compute == "bf16" else 4)


class KeptOutputs(BaseModel):
    """What gradient checkpointing keeps instead of recomputing: every matmul and attention output of the first
    ``layers`` decoder layers, the down projection's alone in the next ``down_projections``."""

    layers: int = 0
    down_projections: int = 0

    def bytes(self, shape: ModelShape, tokens: int, compute: str, probabilities: int = 0) -> int:
        return tokens * (
            self.layers * matmul_output_bytes(shape, compute, probabilities)
            + self.down_projections * down_projection_output_bytes(shape, compute)
        )


def kept_outputs(
    shape: ModelShape, spec: JobSpec, tokens: int, compute: str, headroom: int, probabilities: int = 0
) -> KeptOutputs:
    """What gradient checkpointing can keep in ``KEEP_MATMULS_SHARE`` of ``headroom`` (the memory beside a fully
    recomputing job's peak), the most recomputation saved per byte first: the down projection's output in every
    layer, then whole layers (so that only element-wise work is recomputed in them: a third less compute for a frozen
    base). Single-process jobs only; nothing without gradient checkpointing, where every activation is kept anyway."""
    if not spec.hyperparameters.gradient_checkpointing or spec.distributed.nproc > 1 or headroom <= 0:
        return KeptOutputs()
    layers, budget = shape.num_hidden_layers, int(headroom * KEEP_MATMULS_SHARE)
    down = max(1, tokens * down_projection_output_bytes(shape, compute))
    if budget < layers * down:
        return KeptOutputs(down_projections=budget // down)
    # a whole layer beyond its down projection
    upgrade = max(1, tokens * matmul_output_bytes(shape, compute, probabilities) - down)
    whole = min(layers, (budget - layers * down) // upgrade)
    return KeptOutputs(layers=whole, down_projections=layers - whole)


def compute_dtype(precision: str, bf16: bool) -> Literal["bf16", "fp32"]:
    """The dtype a job computes in: bf16 where asked for, or where ``precision`` is ``auto`` and bf16 matmuls are fast
    on the machine (``bf16``)."""
    return "bf16" if precision == "bf16" or (precision == "auto" and bf16) else "fp32"


def weight_dtype(method: Method, compute: str) -> Literal["bf16", "fp32"]:
    """The dtype the base's weights are kept in: fp32 for full fine-tuning (the optimizer updates them) and for fp32
    compute; bf16 for frozen bases (LoRA, DoRA, other peft methods; QLoRA's unquantised weights)."""
    return "fp32" if isinstance(method, Full) or compute == "fp32" else "bf16"


def trainable_parameters(shape: ModelShape, spec: JobSpec) -> int:
    method = spec.method
    if isinstance(method, Full):
        return shape.parameters
    if isinstance(method, PEFT):
        return _count_on_meta(shape, method)
    linear = shape.linear_shapes()
    expert_tensors = {
        "experts.gate_up_proj": linear["gate_up_proj"],
        "experts.down_proj": linear["down_proj"],
    }
    per_layer = 0
    for target in method.targets(shape.model_type):
        if target not in linear:
            return _count_on_meta(shape, method)
        fan_in, fan_out = linear[target]
        per_layer += method.r * (fan_in + fan_out) + (fan_out if isinstance(method, DoRA) else 0)
    for target in method.expert_targets(shape.model_type):  # one rank-r adapter per expert
        if target not in expert_tensors:
            return _count_on_meta(shape, method)
        per_layer += shape.experts * method.r * sum(expert_tensors[target])
    return shape.num_hidden_layers * per_layer


def _count_on_meta(shape: ModelShape, method: LoRA | QLoRA | DoRA | PEFT) -> int:
    """Trainable parameters counted by building the model on the meta device (no memory) and applying peft."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .._specs import peft_config

    fields = shape.model_dump(exclude_none=True, exclude={"model_type", "dtype", "torch_dtype"})
    try:
        config = AutoConfig.for_model(shape.model_type, **fields, pad_token_id=None)
    except ValueError as exc:
        raise SpecError("model", f"transformers has no {shape.model_type} model to count parameters on") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if isinstance(method, PEFT):
        adapter = peft_config(method)
    else:
        adapter = peft.LoraConfig(
            r=method.r,
            target_modules=list(method.targets(shape.model_type)),
            target_parameters=list(method.expert_targets(shape.model_type)) or None,
            lora_dropout=0.0,
            use_dora=isinstance(method, DoRA),
            task_type="CAUSAL_LM",
        )
    try:
        wrapped = peft.get_peft_model(model, adapter)
    except ValueError as exc:
        raise SpecError("method", f"peft cannot apply it to {type(model).__name__}: {exc}") from exc
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


MEMORY_LIMIT_ENV = "PHITUNE_MEMORY_LIMIT"
"""The memory a local job may use (``24GiB``, ``512MiB``, ``8G`` or bytes): the fit check's available memory."""

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)

_UNITS = {
    "": 1,
    "b": 1,
    **{f"{prefix}{suffix}": 1024 ** (i + 1) for i, prefix in enumerate("kmgt") for suffix in ("", "ib")},
    **{f"{prefix}b": 1000 ** (i + 1) for i, prefix in enumerate("kmgt")},
}


def memory_limit() -> int | None:
    """``$PHITUNE_MEMORY_LIMIT`` in bytes, or None where unset. ``K``, ``M``, ``G``, ``T`` and ``KiB``... are powers
    of 1024, ``KB``... of 1000."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text:
        return None
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match[2].lower()) if match else None
    if match is None or unit is None or float(match[1]) <= 0:
        raise SpecError(MEMORY_LIMIT_ENV, f"{text!r} is not a size: give bytes or a size with a unit, like 24GiB")
    return int(float(match[1]) * unit)


def available_memory(device: str = "cpu") -> int:
    """The memory a local job may use: ``$PHITUNE_MEMORY_LIMIT`` where set, else what is available now (free GPU
    memory on CUDA)."""
    limit = memory_limit()
    return limit if limit is not None else _available(device)


def _available(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)
