"""The speed model: seconds per micro-batch from the FLOPs of a step (forward, backward, the recomputation of layers
that keep no matmul outputs) and its memory-bound work, at a fraction (:data:`MATMUL_EFFICIENCY`) of this machine's
matmul throughput measured by the probe (:mod:`.probe`), plus QLoRA's per-pass dequantisation at its measured rate and
AdamW's update. The constants were fitted on this project's 2-core CPU machine against measured runs;
``docs/sizing.md`` has predicted against measured values.
"""

from __future__ import annotations

from ..types import DoRA, Full, JobSpec, LoRA, QLoRA
from .memory import ACT_H, ACT_I, KeptOutputs, merged_expert_parameters, trainable_parameters
from .probe import MachineProbe
from .shapes import ModelShape

MATMUL_EFFICIENCY = 0.8
"""Fraction of the probed GEMM throughput that a training step's matmuls reach."""

ELEMENTWISE_FLOPS_PER_BYTE = 110.0
"""The memory-bound work (norms, activations, rotary, dropout, casts) in FLOP-equivalents per activation byte and
pass: why a mid-sized model (hidden 512) reaches a third of the GEMM rate where Phi-3-mini reaches three quarters."""

STEP_OVERHEAD_SECONDS = 0.015
"""Fixed cost per micro-batch (collation, loss, optimizer bookkeeping): what dominates at toy sizes."""

LAYER_OVERHEAD_SECONDS = 1e-3
"""Fixed cost per decoder layer and pass (operator dispatch)."""

OPTIMIZER_SECONDS_PER_PARAMETER = 8e-9
"""AdamW's memory-bound update (and gradient clipping) per trainable parameter and optimizer step, on the CPU."""


def seconds(
    shape: ModelShape,
    spec: JobSpec,
    micro: int,
    length: float,
    compute: str,
    probe: MachineProbe,
    kept: KeptOutputs | None = None,
) -> float:
    """Seconds per micro-batch of ``micro`` sequences of ``length`` tokens (a typical length: the mean where they are
    packed); ``kept``: the matmuls not recomputed."""
    kept = kept or KeptOutputs()
    method, hp = spec.method, spec.hyperparameters
    layers, tokens = shape.num_hidden_layers, micro * length
    decoder = 2 * tokens * layers * shape.layer_active_parameters
    attention = 2 * tokens * layers * length * shape.hidden_size  # causal: half of 4 * S * H per token
    head = 2 * tokens * shape.vocab_size * shape.hidden_size
    backward = 2 if isinstance(method, Full) else 1  # a frozen base needs input gradients only
    passes = 1 + backward + (1 if hp.gradient_checkpointing else 0)
    matmul_passes = passes - (kept.layers / layers if hp.gradient_checkpointing else 0)
    inner, outer = shape.linear_shapes()["down_proj"]
    unrepeated = 2 * tokens * inner * outer * shape.active_mlps * kept.down_projections
    unrepeated = unrepeated if hp.gradient_checkpointing else 0
    activation_bytes = (
        tokens * layers * (ACT_H * shape.hidden_size + ACT_I * shape.intermediate_size * shape.active_mlps)
    )
    work = (
        (decoder + attention) * matmul_passes
        - unrepeated
        + head * (1 + backward)
        + ELEMENTWISE_FLOPS_PER_BYTE * activation_bytes * passes
    )
    rate = (probe.bf16_flops if compute == "bf16" else probe.fp32_flops) * MATMUL_EFFICIENCY
    seconds = work / rate + STEP_OVERHEAD_SECONDS + LAYER_OVERHEAD_SECONDS * layers * passes
    if isinstance(method, LoRA | QLoRA | DoRA):
        # expert adapters: each forward (and its recomputation) merges them into every expert tensor they target,
        # 2 r FLOPs per weight, and the backward takes two products as large for the factors' gradients
        forwards = passes - backward
        seconds += 2 * method.r * layers * merged_expert_parameters(shape, method) * (forwards + 2) / rate
    if probe.device == "cpu":
        optimizer = OPTIMIZER_SECONDS_PER_PARAMETER * trainable_parameters(shape, spec)
        seconds += optimizer / hp.gradient_accumulation_steps
    if isinstance(method, QLoRA) and probe.dequant_per_second:
        dequant_passes = 2 + (1 if hp.gradient_checkpointing else 0)
        seconds += dequant_passes * layers * shape.layer_linear_parameters / probe.dequant_per_second
    return seconds
