"""Will it fit? A local job's peak memory, tokens per epoch and time per epoch on this machine, before anything is
submitted: :func:`estimate` combines the memory model (:mod:`.memory`), the speed model (:mod:`.speed`) and the
machine's probe (:mod:`.probe`); :func:`check_fits` refuses a job that cannot fit, with the changes that would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..errors import SpecError, WontFitError
from ..types import PEFT, Distributed, DoRA, JobSpec, LoRA, QLoRA, Response
from .memory import (
    GiB,
    MemoryBreakdown,
    attention_probability_bytes,
    available_memory,
    compute_dtype,
    job_peak,
    kept_outputs,
    pads_batches,
    peak_memory,
    process_peak,
    trainable_parameters,
    weight_dtype,
)
from .probe import MachineProbe, default_probe_cache, probe_machine
from .shapes import ModelShape, model_folder, model_shape
from .speed import seconds


class Estimate(Response):
    """A job's predicted peak memory and speed on this machine, and whether it fits."""

    model: str
    method: str
    device: str
    weight_dtype: Literal["bf16", "fp32"] = Field(
        description="The dtype of the base's weights; with QLoRA, of those not quantised (embeddings, norms, LM head)."
    )
    quantization: Literal["nf4", "fp4"] | None = Field(
        None, description="QLoRA: the 4-bit type of the base's linear layers, which hold most of its weights."
    )
    compute_dtype: Literal["bf16", "fp32"]
    parameters: int
    trainable_parameters: int
    micro_batch_tokens: int = Field(description="Tokens of the largest micro-batch of one process (batch x length).")
    kept_matmul_layers: int = Field(
        0, description="Decoder layers whose matmul outputs gradient checkpointing keeps instead of recomputing."
    )
    kept_down_projections: int = Field(
        0, description="Other decoder layers that keep the output of their MLP's down projection alone."
    )
    processes: int = 1
    memory: MemoryBreakdown = Field(description="Per process.")
    peak_bytes: int = Field(description="Peak memory of the job: every process together.")
    available_bytes: int
    fits: bool
    examples: int | None = None
    tokens_per_epoch: int | None = Field(None, description="Tokens fed to the model per epoch (after truncation).")
    trainable_tokens_per_epoch: int | None = Field(None, description="Those of them that carry loss.")
    steps_per_epoch: int | None = None
    tokens_per_second: float = Field(
        description="The data's tokens trained per second, padding excluded: with a dataset, tokens_per_epoch / "
        "seconds_per_epoch."
    )
    trainable_tokens_per_second: float | None = Field(
        None, description="Those of them that carry loss: the rate a job's metrics events report as tokens_per_second."
    )
    seconds_per_epoch: float | None = None
    probe: MachineProbe
    suggestions: list[str] = Field(default_factory=list)

    @property
    def summary(self) -> str:
        """One line: the peak, the available memory and the time per epoch."""
        time_part = f", ~{self.seconds_per_epoch / 60:.1f} min per epoch" if self.seconds_per_epoch else ""
        return (
            f"{self.method} of {self.model}: peak ~{self.peak_bytes / GiB:.2f} GiB of "
            f"{self.available_bytes / GiB:.2f} GiB available ({'fits' if self.fits else 'does not fit'}), "
            f"~{self.tokens_per_second:.1f} tokens/s{time_part}"
        )


class _Data(BaseModel):
    examples: int | None
    mean_tokens: float
    max_tokens: int
    p95_tokens: int
    trainable_fraction: float


def estimate(
    spec: JobSpec,
    *,
    home: Path | None = None,
    dataset: str | os.PathLike[str] | None = None,
    tokens_per_example: int | None = None,
    available_bytes: int | None = None,
    probe: MachineProbe | None = None,
) -> Estimate:
    """Predict ``spec``'s peak memory and speed on this machine with the local trainer.

    Token counts come from ``dataset`` (a JSONL file; counted with the model's tokenizer where it is on this machine,
    else approximately), else every example is taken as ``tokens_per_example`` long (default: ``max_seq_length``,
    the worst case). ``available_bytes`` defaults to the memory available now (GPU memory on CUDA).
    """
    hp = spec.hyperparameters
    shape = model_shape(spec.model, home)
    data = _dataset_tokens(dataset, spec, home) if dataset is not None else None
    length = min(hp.max_seq_length, data.max_tokens if data else tokens_per_example or hp.max_seq_length)
    probe = probe or probe_machine(default_probe_cache(), quantized=isinstance(spec.method, QLoRA))
    device = probe.device
    compute = compute_dtype(hp.precision, probe.bf16)
    processes = spec.distributed.nproc
    micro = math.ceil(hp.batch_size / processes)
    embedding_rows = round(data.examples * data.mean_tokens) if data and data.examples and device == "cpu" else None
    probabilities = attention_probability_bytes(shape, length, compute, device)
    memory = peak_memory(shape, spec, micro * length, compute, probabilities, embedding_rows=embedding_rows)
    peak = job_peak(memory, spec)
    available = available_bytes if available_bytes is not None else available_memory(device)
    kept = kept_outputs(shape, spec, micro * length, compute, available - peak, probabilities)
    if kept.layers or kept.down_projections:
        memory.activations += kept.bytes(shape, micro * length, compute, probabilities)
        peak = job_peak(memory, spec)
    trainable = trainable_parameters(shape, spec)

    # -- speed. A process's micro-batch is its examples packed into one row, so it costs their own tokens (the mean
    # length each); prompt learning pads them to the longest of the batch instead (about the p95 length).
    mean = min(hp.max_seq_length, data.mean_tokens) if data else float(length)
    padded = data is not None and hp.batch_size > 1 and pads_batches(spec)
    cost_length = min(hp.max_seq_length, data.p95_tokens) if data is not None and padded else mean
    seconds_per_micro = seconds(shape, spec, micro, cost_length, compute, probe, kept)
    tokens_per_second = processes * micro * mean / seconds_per_micro
    examples = data.examples if data else None
    epoch_tokens = trainable_tokens = steps = epoch_seconds = trainable_per_second = None
    if examples and data is not None:
        epoch_tokens = round(examples * mean)
        trainable_tokens = round(epoch_tokens * data.trainable_fraction)
        full, rest = divmod(examples, hp.batch_size)  # the last micro-batch of an epoch may be short
        steps = math.ceil((full + (rest > 0)) / hp.gradient_accumulation_steps)
        epoch_seconds = full * seconds_per_micro
        if rest:
            epoch_seconds += seconds(shape, spec, math.ceil(rest / processes), cost_length, compute, probe, kept)
        tokens_per_second = epoch_tokens / epoch_seconds  # the printed figures agree: time x tokens/s = tokens
        trainable_per_second = trainable_tokens / epoch_seconds
    result = Estimate(
        model=spec.model,
        method=spec.method.type,
        device=device,
        weight_dtype=weight_dtype(spec.method, compute),
        quantization=spec.method.quant_type if isinstance(spec.method, QLoRA) else None,
        compute_dtype=compute,
        parameters=shape.parameters,
        trainable_parameters=trainable,
        micro_batch_tokens=micro * length,
        kept_matmul_layers=kept.layers,
        kept_down_projections=kept.down_projections,
        processes=processes,
        memory=memory,
        peak_bytes=peak,
        available_bytes=available,
        fits=peak <= available,
        examples=examples,
        tokens_per_epoch=epoch_tokens,
        trainable_tokens_per_epoch=trainable_tokens,
        steps_per_epoch=steps,
        tokens_per_second=tokens_per_second,
        trainable_tokens_per_second=trainable_per_second,
        seconds_per_epoch=epoch_seconds,
        probe=probe,
    )
    if not result.fits:
        result.suggestions = _suggestions(shape, spec, length, compute, available, embedding_rows, device)
    return result


def check_fits(
    spec: JobSpec,
    *,
    home: Path | None = None,
    dataset: str | os.PathLike[str] | None = None,
    available_bytes: int | None = None,
) -> Estimate | None:
    """Refuse a job that cannot fit: :func:`estimate`, raising :class:`~phitune.errors.WontFitError` (with the numbers
    and the changes that would fit) when the predicted peak exceeds the available memory. Returns the estimate, or
    None where the model's shape is not on this machine (a hub id not downloaded yet): then nothing is refused."""
    try:
        model_shape(spec.model, home)
    except SpecError:
        return None
    result = estimate(spec, home=home, dataset=dataset, available_bytes=available_bytes)
    if not result.fits:
        memory = result.memory
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in memory.model_dump().items() if v)
        per_process = f" per process, {result.processes} processes" if result.processes > 1 else ""
        raise WontFitError(
            f"{result.method} fine-tuning of {result.model} needs ~{result.peak_bytes / GiB:.1f} GiB at its peak "
            f"({parts} GiB{per_process}) but {result.available_bytes / GiB:.1f} GiB is available on this "
            f"{result.device}. What would fit:",
            result,
            result.suggestions or ["nothing within reach: a smaller model, or a machine with more memory"],
        )
    return result


def _dataset_tokens(dataset: str | os.PathLike[str], spec: JobSpec, home: Path | None) -> _Data:
    from ..datasets import counter_for, validate

    folder = model_folder(spec.model, home)
    tokenizer_dir = folder if folder is not None and (folder / "tokenizer.json").is_file() else None
    report = validate(dataset, model=spec.model, counter=counter_for(tokenizer_dir))
    stats = report.tokens
    return _Data(
        examples=report.examples,
        mean_tokens=stats.mean,
        max_tokens=stats.max,
        p95_tokens=stats.p95,
        trainable_fraction=stats.trainable / stats.total if stats.total else 1.0,
    )


def _suggestions(
    shape: ModelShape,
    spec: JobSpec,
    length: int,
    compute: str,
    available: int,
    embedding_rows: int | None,
    device: str,
) -> list[str]:
    """Changes to ``spec`` that would fit, each with its predicted peak: per kind of change (gradient checkpointing,
    QLoRA, a smaller micro-batch, shorter sequences) the mildest that fits alone; where none does, the first
    combination of them, in that order, that fits."""
    hp = spec.hyperparameters
    adapter = spec.method.model_dump(exclude={"type"}) if isinstance(spec.method, LoRA | DoRA) else {}
    kinds: list[list[tuple[str, dict[str, Any]]]] = []
    if not hp.gradient_checkpointing:
        kinds.append([("gradient_checkpointing=True", {"gradient_checkpointing": True})])
    if not isinstance(spec.method, QLoRA | PEFT):
        kinds.append([("method='qlora'", {"method": QLoRA(**adapter)})])
    batches: list[tuple[str, dict[str, Any]]] = []
    batch = hp.batch_size
    while batch > 1:
        batch //= 2
        accumulation = hp.gradient_accumulation_steps * math.ceil(hp.batch_size / batch)
        label = f"batch_size={batch} with gradient_accumulation_steps={accumulation} (the same global batch)"
        batches.append((label, {"batch_size": batch, "gradient_accumulation_steps": accumulation}))
    lengths: list[tuple[str, dict[str, Any]]] = []
    seq = min(hp.max_seq_length, length)
    while seq > 256:
        seq //= 2
        lengths.append((f"max_seq_length={seq}", {"max_seq_length": seq}))
    kinds += [k for k in (batches, lengths) if k]

    def memory_of(changes: dict[str, Any]) -> tuple[MemoryBreakdown, JobSpec]:
        method, layout = changes.get("method", spec.method), changes.get("distributed", spec.distributed)
        hyper = hp.model_copy(update={k: v for k, v in changes.items() if k not in ("method", "distributed")})
        changed = spec.model_copy(update={"method": method, "hyperparameters": hyper, "distributed": layout})
        longest = min(length, hyper.max_seq_length)
        tokens = math.ceil(hyper.batch_size / layout.nproc) * longest
        probabilities = attention_probability_bytes(shape, longest, compute, device)
        return peak_memory(shape, changed, tokens, compute, probabilities, embedding_rows=embedding_rows), changed

    def peak_of(changes: dict[str, Any]) -> int:
        return job_peak(*memory_of(changes))

    found: list[str] = []
    for options in kinds:
        for label, changes in options:
            if (peak := peak_of(changes)) <= available:
                found.append(f"{label}: ~{peak / GiB:.1f} GiB")
                break
    if found:
        return found
    combined: dict[str, Any] = {}
    labels: list[str] = []
    peak = peak_of(combined)
    for options in kinds:
        for label, changes in options:
            if (peak := peak_of({**combined, **changes})) <= available or (label, changes) == options[-1]:
                combined.update(changes)
                labels.append(label)
                break
        if peak <= available:
            return [f"{', '.join(labels)}: ~{peak / GiB:.1f} GiB"]
    return _elsewhere(spec, labels, combined, peak, memory_of)


GPU_BYTES = 80 * 10**9
"""The memory of the largest common training GPU (an 80 GB A100 or H100), for :func:`_elsewhere`."""


def _elsewhere(
    spec: JobSpec,
    labels: list[str],
    leanest: dict[str, Any],
    peak: int,
    memory_of: Callable[[dict[str, Any]], tuple[MemoryBreakdown, JobSpec]],
) -> list[str]:
    """Where a job that nothing fits on this machine would run: the memory of its leanest single-process form
    (``leanest``, the ``labels`` changes, predicted at ``peak``), and the fewest 80 GB GPUs that FSDP would share
    its unquantised method across."""
    leanest_form = ", ".join(labels) or "the job as it is"
    found = [f"{leanest_form} on a machine (or GPU) with ~{peak / GiB:.0f} GiB or more: ~{peak / GiB:.1f} GiB"]
    method = spec.method
    if isinstance(method, QLoRA):
        method = LoRA(**method.model_dump(include={"r", "alpha", "dropout", "target_modules", "target_parameters"}))
    hp = spec.hyperparameters
    unquantised = {k: v for k, v in leanest.items() if k != "method"} | {"method": method}
    for gpus in (2, 4, 8):
        accumulation = hp.gradient_accumulation_steps * max(1, math.ceil(hp.batch_size / gpus))
        layout = Distributed(strategy="fsdp", nproc=gpus)
        changes = unquantised | {"batch_size": gpus, "gradient_accumulation_steps": accumulation, "distributed": layout}
        per_gpu = process_peak(*memory_of(changes))
        if per_gpu <= GPU_BYTES:
            found.append(
                f"method={method.type!r} with distributed=Distributed(strategy='fsdp', nproc={gpus}) on {gpus} GPUs "
                f"of 80 GB (batch_size={gpus}, gradient_accumulation_steps={accumulation}): ~{per_gpu / GiB:.1f} GiB "
                "per GPU"
            )
            break
    return found
