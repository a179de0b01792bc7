"""The training loop, readable top to bottom.

One optimizer step consumes ``gradient_accumulation_steps`` micro-batches of ``batch_size`` examples: the global
batch. Under torchrun every rank walks the same micro-batches and trains on its share of each (see
:mod:`phitune.trainer.distributed`). The loss is token-normalised over the whole step (sum of token losses on all
ranks / trainable tokens in the step), so neither accumulation nor the number of processes changes the objective.
A run lasts ``epochs`` passes over the data or, where set, exactly ``max_steps`` optimizer steps, as many passes as
those take (:meth:`~phitune.types.Hyperparameters.plan`). Data order is a pure function of (seed, epoch), so a run
resumed from a checkpoint (weights, optimizer, scheduler, every rank's RNG, step) continues exactly where the
uninterrupted run would be, across epoch boundaries too.

Where the work goes: each rank's examples of a micro-batch are packed into one row with no padding, every example
attending only to itself (:mod:`phitune.trainer.packing`); the LM head runs only at positions that carry loss, in
chunks whose backward is computed on the way (:mod:`phitune.trainer.loss`), so no ``[tokens, vocabulary]`` logits are
ever held; matmuls run under bf16 autocast where the hardware has it. Packing changes how a micro-batch is laid out,
never which examples it holds, so resume and multi-process parity are untouched. Prompt learning (virtual tokens in
front of every example) trains on padded batches through the model's own forward.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from .. import _allocator as allocator
from ..estimate.memory import (
    KeptOutputs,
    attention_probability_bytes,
    available_memory,
    job_peak,
    kept_outputs,
    memory_limit,
    peak_memory,
)
from ..estimate.shapes import model_shape
from ..types import JobSpec, QLoRA
from . import data, distributed, fused, packing, patches
from .decoder import fused_coverage
from .distributed import Engine, Ranks
from .loading import load_for_training, max_rss_bytes
from .loss import linear_cross_entropy
from .model import apply_method, bf16_supported, count_parameters, describe_experts, quantized_footprint

StopReason = Literal["cancelled", "paused", "superseded"]


class Control(Protocol):
    """How the loop reports to, and takes orders from, whoever runs it (the local worker's store)."""

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None: ...

    def metrics(self, data: dict[str, Any]) -> None: ...

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None: ...

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None: ...

    def should_stop(self) -> StopReason | None: ...


class NullControl:
    """A :class:`Control` that records nothing and never asks to stop: the ranks other than 0 of a distributed job
    train with it (rank 0's decision is broadcast), and callers that keep part of what the loop reports subclass
    it."""

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        pass

    def metrics(self, data: dict[str, Any]) -> None:
        pass

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None:
        pass

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        pass

    def should_stop(self) -> StopReason | None:
        return None


@dataclass
class TrainRun:
    """Everything one training attempt needs, resolved to local paths."""

    spec: JobSpec
    base_path: str
    train_path: Path
    valid_path: Path | None
    output_dir: Path
    checkpoint_dir: Path
    resume_from: Path | None = None
    train_name: str | None = None
    """How messages name the training file (a stored file's id and filename); None: its path."""
    valid_name: str | None = None
    """How messages name the validation file, likewise."""
    attempt: int = 1
    """1 for a job's first run, 2 for the run after its first restart, ...: every metrics event carries it, so the
    steps a resumed run repeats can be told from those they supersede."""


@dataclass
class TrainResult:
    status: Literal["succeeded", "cancelled", "paused", "superseded"]
    step: int
    total_steps: int
    trained_tokens: int
    train_loss: float | None
    valid_loss: float | None


def train(run: TrainRun, control: Control, ranks: Ranks | None = None) -> TrainResult:
    """Fine-tune ``run.spec`` and write the output model to ``run.output_dir``. Under torchrun every rank calls
    this with its :class:`Ranks`; only rank 0's ``control`` should record anything."""
    hp = run.spec.hyperparameters
    ranks = ranks or Ranks(device="cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(hp.seed)  # the same seed on every rank: identical adapter initialisation everywhere
    device = ranks.device
    use_bf16 = hp.precision == "bf16" or (hp.precision == "auto" and bf16_supported())

    # -- model and data
    job_data = data.prepare(
        run.spec,
        run.base_path,
        data.DatasetFile(run.train_path, run.train_name),
        data.DatasetFile(run.valid_path, run.valid_name) if run.valid_path else None,
    )
    tokenizer = job_data.tokenizer
    train_set = job_data.train.examples
    valid_set = job_data.valid.examples if job_data.valid else []
    for dataset in (job_data.train, job_data.valid):
        if dataset is not None and dataset.dropped_lines:
            _report_dropped(control, dataset, hp.max_seq_length)
    kept = _plan_checkpointing(run, control, ranks, train_set, "bf16" if use_bf16 else "fp32")  # before loading
    model, load_report = load_for_training(run.base_path, run.spec.method, device=device, precision=hp.precision)
    control.message(load_report.message, data=load_report.data())
    if use_bf16 and device == "cpu":  # now, not in the first step, which would wait for a build in silence
        kernels = fused.status()
        control.message(
            kernels.message,
            level="info" if kernels.available else "warn",
            data={"fused_kernels": {"available": kernels.available, "detail": kernels.detail}},
        )
    if isinstance(run.spec.method, QLoRA):
        _report_quantized_base(control, model, run.spec.method)
    model = apply_method(
        model,
        run.spec.method,
        gradient_checkpointing=hp.gradient_checkpointing,
        keep_matmul_layers=kept.layers if kept else 0,
        keep_down_projections=kept.down_projections if kept else 0,
    )
    for note in patches.left_out():
        control.message(note, level="warn")
    trainable, total = count_parameters(model)
    batch_of = _batching(model, tokenizer.pad_token_id)
    plan = hp.plan(len(train_set))
    total_steps = plan.total_steps
    layout = run.spec.distributed
    control.message(
        f"training {run.spec.method.type} on {len(train_set)} examples: {plan.describe()}; "
        f"{trainable:,} of {total:,} parameters trainable, {device}{' bf16' if use_bf16 else ' fp32'}"
        + (f", {layout.strategy} on {ranks.world} processes" if layout.strategy != "none" else ""),
        data={
            "trainable_parameters": trainable,
            "total_parameters": total,
            "total_steps": total_steps,
            "epochs": round(plan.epochs(), 4),
            "examples": plan.examples,
            "examples_seen": plan.examples_seen(),
        },
    )
    if (experts := describe_experts(model)) is not None:
        control.message(experts[0], data=experts[1])
    if use_bf16 and torch.device(device).type == "cpu" and (aside := fused_coverage(model)) is not None:
        control.message(aside)

    # -- engine (one process, DDP, FSDP or DeepSpeed), schedule, resume
    engine = distributed.build(CausalLMLoss(model), layout, ranks, hp)
    schedule = _schedule(hp.lr_scheduler, hp.warmup_ratio, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, schedule)
    step, trained_tokens, best_valid = 0, 0, math.inf
    if run.resume_from is not None:
        state = torch.load(run.resume_from / "trainer_state.pt", map_location="cpu", mmap=True, weights_only=True)
        engine.load(run.resume_from, state)
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][ranks.rank])
        step, trained_tokens, best_valid = int(state["step"]), int(state["trained_tokens"]), float(state["best_valid"])
        control.message(
            f"resumed from checkpoint at step {step} (attempt {run.attempt})",
            data={"step": step, "attempt": run.attempt},
        )
    saved_step = step  # the newest checkpoint on disk (none at step 0)

    def save_checkpoint(metrics: dict[str, float]) -> Path:
        progress = {"step": step, "trained_tokens": trained_tokens, "best_valid": best_valid}
        return _save_checkpoint(run, control, ranks, engine, tokenizer, scheduler, progress, metrics)

    # -- the loop
    if memory_limit() is None and allocator.keep_freed_memory():  # a limit asks for the leanest peak instead
        control.message("the allocator keeps the memory it frees for the next steps ($PHITUNE_MEMORY_LIMIT unset)")
    last_loss: float | None = None
    valid_loss: float | None = None
    valid_step = -1  # the step valid_loss belongs to
    step_times: list[float] = []
    engine.module.train()
    while step < total_steps:
        if (reason := ranks.broadcast(control.should_stop())) is not None:  # rank 0 decides for all
            if reason == "paused" and step != saved_step:
                save_checkpoint({"train_loss": last_loss} if last_loss is not None else {})
            return TrainResult(reason, step, total_steps, trained_tokens, last_loss, valid_loss)
        started = time.perf_counter()
        micro = [
            _micro_batch(train_set, m, plan.batches_per_epoch, hp.batch_size, hp.seed)
            for m in range(step * hp.gradient_accumulation_steps, (step + 1) * hp.gradient_accumulation_steps)
            if m < plan.micro_batches
        ]
        step_tokens = sum(ex.trainable_tokens for batch in micro for ex in batch)  # global: every rank sees all
        loss_here = 0.0
        for index, batch in enumerate(micro):
            examples, weight = ranks.share(batch)
            tensors = {k: v.to(device) for k, v in batch_of(examples).items()}
            with engine.micro_step(last=index == len(micro) - 1):
                with _autocast(device, use_bf16):
                    loss_sum = engine.module(**tensors) * weight
                engine.backward(loss_sum * (ranks.world / step_tokens))  # engines average gradients over ranks
            loss_here += float(loss_sum.detach())
        lr = scheduler.get_last_lr()[0]
        grad_norm = engine.step(hp.max_grad_norm)
        scheduler.step()
        step += 1

        elapsed = time.perf_counter() - started
        step_times.append(elapsed)
        trained_tokens += step_tokens
        last_loss = ranks.sum(loss_here) / step_tokens
        metrics: dict[str, Any] = {
            "step": step,
            "attempt": run.attempt,
            "train_loss": last_loss,
            "learning_rate": lr,
            "tokens_per_second": step_tokens / elapsed,
            "trainable_tokens": step_tokens,
            "epoch": round(plan.epochs(step), 4),
            "peak_memory_mb": _peak_memory_mb(device),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        improved = False
        if valid_set and hp.eval_every and step % hp.eval_every == 0:
            valid_loss = evaluate(engine, ranks, valid_set, hp.batch_size, batch_of, use_bf16)
            metrics["valid_loss"], valid_step = valid_loss, step
            improved, best_valid = valid_loss < best_valid, min(valid_loss, best_valid)
        control.metrics(metrics)
        recent = step_times[-20:]
        control.progress(step, total_steps, trained_tokens, sum(recent) / len(recent) * (total_steps - step))

        if improved or (hp.checkpoint_every and step % hp.checkpoint_every == 0 and step < total_steps):
            save_checkpoint({k: metrics[k] for k in ("train_loss", "valid_loss") if k in metrics})
            saved_step = step
            if improved:
                control.message(
                    f"best validation loss so far at step {step}: {best_valid:.4f} (checkpoint step-{step:06d})",
                    data={"best_step": step, "valid_loss": best_valid},
                )

    # -- final evaluation and output
    if valid_set:
        if valid_step != step:
            valid_loss = evaluate(engine, ranks, valid_set, hp.batch_size, batch_of, use_bf16)
        control.metrics({"step": step, "attempt": run.attempt, "full_valid_loss": valid_loss})
    weights = engine.weights()
    if ranks.main:
        save_output(engine.model, weights, tokenizer, run)
    ranks.barrier()
    return TrainResult("succeeded", step, total_steps, trained_tokens, last_loss, valid_loss)


class CausalLMLoss(torch.nn.Module):
    """A causal LM whose forward is :func:`token_loss_sum`. This is the module DDP, FSDP and DeepSpeed wrap: they
    act through the forward of the module they are given."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(self.model, batch)


Batching = Callable[[Sequence[data.Example]], dict[str, torch.Tensor]]
"""How a micro-batch's examples become model inputs: packed into one row, or padded."""


def _batching(model: Any, pad_id: int) -> Batching:
    """Packed rows with per-example attention, except for prompt learning, whose virtual tokens go in front of every
    example and so need the plain forward of padded batches."""
    if _body_and_head(model)[0] is None:
        return functools.partial(data.collate, pad_id=pad_id)
    packing.use_varlen_attention(model)
    return functools.partial(packing.pack, pad_id=pad_id)


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions, for a padded batch (:func:`data.collate`) or a packed
    one (:func:`packing.pack`). The LM head runs only where labels are set, in chunks (:mod:`phitune.trainer.loss`).
    A mixture-of-experts model whose config asks for the router's load-balancing loss (``output_router_logits``,
    ``router_aux_loss_coef``) gets it as transformers' model adds it to the mean loss: here times the labelled
    tokens, so that the step's normalisation turns it back into that."""
    labels = batch["labels"][:, 1:]
    selected = labels != data.IGNORE_INDEX
    body, head = _body_and_head(model)
    balance = _router_balance(model)
    routing = {"output_router_logits": True} if balance else {}
    if body is None:  # methods that change the input (prompt tuning): the plain forward
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **routing)
        logits = out.logits[:, -batch["input_ids"].shape[1] :][:, :-1][selected]
        plain = F.cross_entropy(logits.float(), labels[selected], reduction="sum")
        return plain + balance * out.aux_loss * selected.sum() if balance else plain
    packed: dict[str, Any] = {}
    if "cu_seq_lens" in batch:
        if body.config._attn_implementation != packing.ATTENTION:
            raise ValueError("a packed batch needs packing.use_varlen_attention(model), or examples would mix")
        packed = {"position_ids": batch["position_ids"], "segments": tuple(batch["cu_seq_lens"].tolist())}
    # no cache: without gradient checkpointing, transformers would otherwise copy every layer's keys and values into one
    out = body(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **packed, **routing
    )
    hidden = out.last_hidden_state[:, :-1][selected]
    bias = head.bias
    if adjust := getattr(
        model.get_base_model() if hasattr(model, "get_base_model") else model, "head_adjustment", None
    ):
        scale, bias = adjust()  # Phi-3-small: logits divided by its muP width, unused tokens never predicted
        hidden = hidden * scale
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3 gathers the weight in head() only
        logits = head(hidden).float()
        loss = F.cross_entropy(logits if bias is None else logits + bias, labels[selected], reduction="sum")
    else:
        loss = linear_cross_entropy(hidden, head.weight, labels[selected], bias)
    if balance:
        loss = loss + balance * _load_balancing_loss(body.config, out.router_logits, batch) * selected.sum()
    return loss


def _router_balance(model: Any) -> float:
    """The weight of the router's load-balancing loss: the config's ``router_aux_loss_coef`` where it asks for the
    router logits (``output_router_logits``), else 0 (dense models; Phi-3.5-MoE as released)."""
    config = model.config
    return float(config.router_aux_loss_coef) if getattr(config, "output_router_logits", False) else 0.0


def _load_balancing_loss(config: Any, router_logits: tuple[torch.Tensor, ...], batch: dict[str, Any]) -> torch.Tensor:
    """transformers' load-balancing loss of the routers' logits, over the examples' tokens: a packed row's trailing
    padding (past ``example_tokens``) is masked out as padding is in a padded batch."""
    from transformers.models.phimoe.modeling_phimoe import load_balancing_loss_func

    mask = batch["attention_mask"]
    if "example_tokens" in batch:
        mask = (torch.arange(mask.shape[1], device=mask.device) < batch["example_tokens"])[None].to(mask.dtype)
    loss: torch.Tensor = load_balancing_loss_func(
        router_logits, config.num_local_experts, config.num_experts_per_tok, mask
    )
    return loss


def _body_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack and LM head of a (possibly peft-wrapped) causal LM, or (None, None) for prompt learning."""
    if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
        return None, None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def evaluate(
    engine: Engine, ranks: Ranks, examples: list[data.Example], batch_size: int, batch_of: Batching, use_bf16: bool
) -> float:
    """Token-mean validation loss; each rank scores its share of every batch."""
    engine.module.eval()
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk, weight = ranks.share(examples[i : i + batch_size])
        tensors = {k: v.to(ranks.device) for k, v in batch_of(chunk).items()}
        with torch.no_grad(), _autocast(ranks.device, use_bf16):
            total += float(engine.module(**tensors)) * weight
    engine.module.train()
    return ranks.sum(total) / max(sum(ex.trainable_tokens for ex in examples), 1)


def _micro_batch(
    examples: list[data.Example], index: int, batches_per_epoch: int, batch_size: int, seed: int
) -> list[data.Example]:
    """The ``index``-th micro-batch of the flat stream over epochs; each epoch is a seeded permutation."""
    epoch, within = divmod(index, batches_per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return [examples[i] for i in order[within * batch_size : (within + 1) * batch_size].tolist()]


def _schedule(kind: str, warmup_ratio: float, total_steps: int) -> Any:
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def _autocast(device: str, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast without its cache of cast weights: a cached copy lives until the forward ends, and the C
    allocator places those small copies inside the space of each layer's freed activations, so the next layer's
    no longer fit there (0.47 GB of heap at a Phi-3-mini LoRA peak). Casting at each use costs little next to the
    matmul, and the values are the same."""
    if not enabled:
        return contextlib.nullcontext()
    context: contextlib.AbstractContextManager[Any] = torch.autocast(
        device_type=torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False
    )
    return context


def _peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of this process on CPU."""
    if torch.device(device).type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)) / 2**20
    return max_rss_bytes() / 2**20


def _plan_checkpointing(
    run: TrainRun, control: Control, ranks: Ranks, train_set: list[data.Example], compute: str
) -> KeptOutputs | None:
    """What gradient checkpointing keeps of the matmul outputs, in the memory free now (:func:`available_memory`)
    beside the job's predicted peak (:func:`phitune.estimate.memory.kept_outputs`), for micro-batches of the longest
    packed row; None where that is unknown or nothing fits."""
    hp = run.spec.hyperparameters
    if not hp.gradient_checkpointing or ranks.world > 1 or not train_set:
        return None
    longest = max(len(example.input_ids) for example in train_set)
    tokens = packing.bucket(min(hp.batch_size, len(train_set)) * longest)  # the longest packed row, padded
    device = torch.device(ranks.device).type
    rows = len({token for example in train_set for token in example.input_ids}) if device == "cpu" else None
    try:
        shape = model_shape(run.base_path)
        probabilities = attention_probability_bytes(shape, longest, compute, device)
        peak = job_peak(peak_memory(shape, run.spec, tokens, compute, probabilities, embedding_rows=rows), run.spec)
    except ValueError:  # SpecError or pydantic's ValidationError: a config without a decoder's dimensions
        return None
    kept = kept_outputs(shape, run.spec, tokens, compute, available_memory(device) - peak, probabilities)
    layers = shape.num_hidden_layers
    if kept.layers or kept.down_projections:
        down = f", the down projection's in {kept.down_projections} more" if kept.down_projections else ""
        control.message(
            f"gradient checkpointing keeps the matmul outputs of {kept.layers} of {layers} decoder layers{down} "
            "(memory allows): their backward recomputes no such matmul",
            data={"kept_matmul_layers": kept.layers, "kept_down_projections": kept.down_projections, "layers": layers},
        )
    return kept


def _report_dropped(control: Control, dataset: data.Dataset, max_seq_length: int) -> None:
    lines = dataset.dropped_lines
    shown = ", ".join(map(str, lines[:20])) + (f" and {len(lines) - 20} more" if len(lines) > 20 else "")
    control.message(
        f"left out {len(lines)} of {len(lines) + len(dataset.examples)} examples of {dataset.file.label} "
        f"(drop_untrainable_examples): no token with loss within max_seq_length={max_seq_length}; lines {shown}",
        level="warn",
        data={"file": dataset.file.label, "dropped_examples": len(lines), "dropped_lines": lines},
    )


def _report_quantized_base(control: Control, model: Any, method: QLoRA) -> None:
    footprint = quantized_footprint(model)
    if footprint is None:
        return
    mib = {k: footprint[k] / 2**20 for k in ("bytes", "bf16_bytes", "fp32_bytes")}
    control.message(
        f"QLoRA base: {footprint['layers']} linear layers ({footprint['weights']:,} weights) take "
        f"{mib['bytes']:.2f} MiB in {method.quant_type}{' + double quantisation' if method.double_quant else ''}, "
        f"against {mib['bf16_bytes']:.2f} MiB in bf16 ({footprint['bf16_bytes'] / footprint['bytes']:.2f}x) "
        f"and {mib['fp32_bytes']:.2f} MiB in fp32 ({footprint['fp32_bytes'] / footprint['bytes']:.2f}x)",
        data={"quantized_base": footprint},
    )


# --------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(
    run: TrainRun,
    control: Control,
    ranks: Ranks,
    engine: Engine,
    tokenizer: Any,
    scheduler: Any,
    progress: dict[str, Any],
    metrics: dict[str, float],
) -> Path:
    """Collective: write a resumable checkpoint atomically (temporary folder, then rename); rank 0 registers it.
    ``progress`` holds the step, the tokens trained so far and the best validation loss."""
    step = progress["step"]
    final = run.checkpoint_dir / f"step-{step:06d}"
    made = tempfile.mkdtemp(prefix=f".{final.name}.", dir=run.checkpoint_dir) if ranks.main else ""
    tmp = Path(ranks.broadcast(made))
    state = engine.save(tmp)
    rng = ranks.gather(_rng_state())
    if ranks.main:
        engine.model.save_pretrained(tmp / "model", state_dict=state["weights"])
        tokenizer.save_pretrained(tmp / "model")
        torch.save({**state, **progress, "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        control.checkpoint(step, metrics, final)
    ranks.barrier()
    return final


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_output(model: Any, weights: dict[str, torch.Tensor], tokenizer: Any, run: TrainRun) -> None:
    """Write the result from the gathered ``weights``: a PEFT adapter folder, or a full transformers model folder
    for full fine-tuning."""
    tmp = run.output_dir.with_name(run.output_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    (tmp / "phitune_job.json").write_text(run.spec.model_dump_json(indent=2))
    shutil.rmtree(run.output_dir, ignore_errors=True)
    os.replace(tmp, run.output_dir)


def iter_checkpoints(folder: Path) -> Iterator[Path]:
    """Completed checkpoint folders, oldest first."""
    yield from sorted(p for p in folder.glob("step-*") if (p / "trainer_state.pt").exists())
