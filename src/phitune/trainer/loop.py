"""The training loop, readable top to bottom.

One optimizer step consumes ``gradient_accumulation_steps`` micro-batches of ``batch_size`` examples. The loss is
token-normalised over the whole step (sum of token losses / trainable tokens in the step), so accumulation never
changes the objective. Data order is a pure function of (seed, epoch), so a run resumed from a checkpoint (weights,
optimizer, scheduler, RNG, step) continues exactly where the uninterrupted run would be.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from ..types import JobSpec
from . import data
from .model import apply_method, bf16_supported, count_parameters, load_model, load_tokenizer

StopReason = Literal["cancelled", "paused", "superseded"]


class Control(Protocol):
    """How the loop reports to, and takes orders from, whoever runs it (the local worker's store)."""

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None: ...

    def metrics(self, data: dict[str, Any]) -> None: ...

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None: ...

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None: ...

    def should_stop(self) -> StopReason | None: ...


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


@dataclass
class TrainResult:
    status: Literal["succeeded", "cancelled", "paused", "superseded"]
    step: int
    total_steps: int
    trained_tokens: int
    train_loss: float | None
    valid_loss: float | None


def train(run: TrainRun, control: Control) -> TrainResult:
    """Fine-tune ``run.spec`` and write the output model to ``run.output_dir``."""
    hp = run.spec.hyperparameters
    torch.manual_seed(hp.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    use_bf16 = hp.precision == "bf16" or (hp.precision == "auto" and bf16_supported())

    # -- model and data
    tokenizer = load_tokenizer(run.base_path)
    model = load_model(run.base_path, run.spec.method, device=device)
    model = apply_method(model, run.spec.method, gradient_checkpointing=hp.gradient_checkpointing)
    trainable, total = count_parameters(model)
    train_set = data.load_examples(run.train_path, tokenizer, max_seq_length=hp.max_seq_length)
    valid_set = (
        data.load_examples(run.valid_path, tokenizer, max_seq_length=hp.max_seq_length) if run.valid_path else []
    )
    batches_per_epoch = math.ceil(len(train_set) / hp.batch_size)
    total_micro = hp.epochs * batches_per_epoch
    total_steps = math.ceil(total_micro / hp.gradient_accumulation_steps)
    if hp.max_steps is not None:
        total_steps = min(total_steps, hp.max_steps)
    control.message(
        f"training {run.spec.method.type} on {len(train_set)} examples: {total_steps} steps, "
        f"{trainable:,} of {total:,} parameters trainable, {device}{' bf16' if use_bf16 else ' fp32'}",
        data={"trainable_parameters": trainable, "total_parameters": total, "total_steps": total_steps},
    )

    # -- optimizer, schedule, resume
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(hp.lr_scheduler, hp.warmup_ratio, total_steps))
    step = 0
    if run.resume_from is not None:
        step = _load_checkpoint(run.resume_from, model, optimizer, scheduler)
        control.message(f"resumed from checkpoint at step {step}", data={"step": step})

    # -- the loop
    trained_tokens = 0
    last_loss: float | None = None
    valid_loss: float | None = None
    best_valid = math.inf
    step_times: list[float] = []
    model.train()
    while step < total_steps:
        if (reason := control.should_stop()) is not None:
            if reason == "paused":
                _save_checkpoint(run, control, model, tokenizer, optimizer, scheduler, step, {})
            return TrainResult(reason, step, total_steps, trained_tokens, last_loss, valid_loss)
        started = time.perf_counter()
        micro = [
            _micro_batch(train_set, m, batches_per_epoch, hp.batch_size, hp.seed)
            for m in range(step * hp.gradient_accumulation_steps, (step + 1) * hp.gradient_accumulation_steps)
            if m < total_micro
        ]
        step_tokens = sum(ex.trainable_tokens for batch in micro for ex in batch)
        loss_total = 0.0
        for batch in micro:
            tensors = {k: v.to(device) for k, v in data.collate(batch, tokenizer.pad_token_id).items()}
            with _autocast(device, use_bf16):
                loss_sum = token_loss_sum(model, tensors)
            (loss_sum / step_tokens).backward()
            loss_total += float(loss_sum.detach())
        if hp.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        elapsed = time.perf_counter() - started
        step_times.append(elapsed)
        trained_tokens += step_tokens
        last_loss = loss_total / step_tokens
        metrics: dict[str, Any] = {
            "step": step,
            "train_loss": last_loss,
            "learning_rate": lr,
            "tokens_per_second": step_tokens / elapsed,
            "trainable_tokens": step_tokens,
            "epoch": round(min(step * hp.gradient_accumulation_steps, total_micro) / batches_per_epoch, 4),
        }
        if valid_set and hp.eval_every and step % hp.eval_every == 0:
            valid_loss = evaluate(model, valid_set, hp.batch_size, tokenizer.pad_token_id, device, use_bf16)
            metrics["valid_loss"] = valid_loss
        control.metrics(metrics)
        recent = step_times[-20:]
        control.progress(step, total_steps, trained_tokens, sum(recent) / len(recent) * (total_steps - step))
        if hp.checkpoint_every and step % hp.checkpoint_every == 0 and step < total_steps:
            ckpt_metrics = {k: float(v) for k, v in metrics.items() if k in ("train_loss", "valid_loss")}
            _save_checkpoint(run, control, model, tokenizer, optimizer, scheduler, step, ckpt_metrics)
            if valid_loss is not None and "valid_loss" in metrics and valid_loss < best_valid:
                best_valid = valid_loss
                control.message(
                    f"best validation loss so far at step {step}: {valid_loss:.4f}",
                    data={"best_step": step, "valid_loss": valid_loss},
                )

    # -- final evaluation and output
    if valid_set:
        valid_loss = evaluate(model, valid_set, hp.batch_size, tokenizer.pad_token_id, device, use_bf16)
        control.metrics({"step": step, "full_valid_loss": valid_loss})
    save_output(model, tokenizer, run)
    return TrainResult("succeeded", step, total_steps, trained_tokens, last_loss, valid_loss)


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions; the LM head runs only where labels are set."""
    labels = batch["labels"][:, 1:]
    selected = labels != -100
    body, head = _body_and_head(model)
    if body is None:  # methods that change the input (prompt tuning): the plain forward
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1] :][:, :-1][selected]
    else:
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][selected])
    return F.cross_entropy(logits.float(), labels[selected], reduction="sum")


def _body_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack and LM head of a (possibly peft-wrapped) causal LM, or (None, None) for prompt learning."""
    if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
        return None, None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def evaluate(
    model: Any, examples: list[data.Example], batch_size: int, pad_id: int, device: str, use_bf16: bool
) -> float:
    """Token-mean validation loss."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        tensors = {k: v.to(device) for k, v in data.collate(chunk, pad_id).items()}
        with torch.no_grad(), _autocast(device, use_bf16):
            total += float(token_loss_sum(model, tensors))
        tokens += sum(ex.trainable_tokens for ex in chunk)
    model.train()
    return total / max(tokens, 1)


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
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(
    run: TrainRun,
    control: Control,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    metrics: dict[str, float],
) -> None:
    """Write a resumable checkpoint atomically (temp folder, then rename) and register it."""
    final = run.checkpoint_dir / f"step-{step:06d}"
    tmp = run.checkpoint_dir / f".step-{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    state = {
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    control.checkpoint(step, metrics, final)


def _load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = set(state["trainable"]) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def save_output(model: Any, tokenizer: Any, run: TrainRun) -> None:
    """Write the result: a PEFT adapter folder, or a full transformers model folder for full fine-tuning."""
    tmp = run.output_dir.with_name(run.output_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "phitune_job.json").write_text(run.spec.model_dump_json(indent=2))
    shutil.rmtree(run.output_dir, ignore_errors=True)
    os.replace(tmp, run.output_dir)


def iter_checkpoints(folder: Path) -> Iterator[Path]:
    """Completed checkpoint folders, oldest first."""
    yield from sorted(p for p in folder.glob("step-*") if (p / "trainer_state.pt").exists())
