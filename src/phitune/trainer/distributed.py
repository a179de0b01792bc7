"""Multi-process training under torchrun: each rank's share of the global batch, and one engine per strategy.

``batch_size`` is the global batch whatever the number of processes: every rank walks the same global micro-batches
and trains on its share of each (examples ``rank``, ``rank + world``, ...). The loss of a step is the sum of token
losses over all ranks divided by the step's trainable tokens — a number every rank knows without communicating, since
every rank sees the whole global batch — and each rank's part is multiplied by the world size, because DDP, FSDP and
DeepSpeed average gradients over ranks. The gradient is then the one a single process computes on the same global
batch, so the strategy never changes the optimisation.

Engines: :class:`Engine` (one process; FSDP2 ``fully_shard`` per decoder layer, then the root — ZeRO-3 sharding of
parameters, gradients and optimizer state), :class:`DDPEngine` and :class:`DeepSpeedEngine` (ZeRO stage 1, 2 or 3,
optionally with the optimizer offloaded to the CPU). The first three checkpoint through
``torch.distributed.checkpoint.state_dict``: whole tensors gathered on rank 0, keyed by parameter name, so their
checkpoints are the same files whatever the layout. DeepSpeed writes its own per-rank checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import MissingDependencyError, SpecError, UnsupportedOptionError
from ..types import PEFT, Distributed, Hyperparameters, JobSpec, QLoRA

T = TypeVar("T")

DEFAULT_ZERO_STAGE = 2
"""The ZeRO stage of ``strategy="deepspeed"`` when ``zero_stage`` is None."""

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)


# ---------------------------------------------------------------------------------------------------- refusals
def check(spec: JobSpec, backend: str) -> None:
    """Refuse, before anything runs, a distributed option this machine cannot honour (the error names the field)."""
    options = spec.distributed
    if options.strategy == "none":
        return
    if options.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise MissingDependencyError("deepspeed", "distributed")
    if torch.cuda.is_available():
        devices, kind = torch.cuda.device_count(), "GPUs"
    else:
        devices, kind = len(os.sched_getaffinity(0)), "CPU cores"
    if options.nproc > devices:
        raise UnsupportedOptionError(
            "distributed.nproc", backend, f"{options.nproc} processes, but this machine has {devices} {kind}"
        )
    if spec.hyperparameters.batch_size < options.nproc:
        raise SpecError(
            "hyperparameters.batch_size",
            f"the global batch ({spec.hyperparameters.batch_size}) must give each of the {options.nproc} processes "
            "at least one example",
        )
    sharded = options.strategy == "fsdp" or (options.strategy == "deepspeed" and options.zero_stage == 3)
    if isinstance(spec.method, QLoRA) and options.strategy != "ddp":
        raise UnsupportedOptionError(
            "distributed.strategy",
            backend,
            f"QLoRA's 4-bit base cannot be partitioned by {options.strategy}; use strategy='ddp' (or 'none')",
        )
    if sharded and isinstance(spec.method, PEFT):
        from .._specs import peft_config

        if peft_config(spec.method).is_prompt_learning:
            raise UnsupportedOptionError(
                "distributed.strategy",
                backend,
                f"prompt-learning tuners ({spec.method.config['peft_type']}) save their virtual tokens from the "
                "unsharded model; use strategy='ddp' or DeepSpeed zero_stage 1 or 2",
            )


# ------------------------------------------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes events, checkpoints and the output, and reads the stop flag."""
        return self.rank == 0

    def share(self, batch: Sequence[T]) -> tuple[list[T], float]:
        """This rank's examples of a global micro-batch and the weight of their loss. A rank left without an
        example (a short last batch) runs the first one with weight 0, since every rank must join each collective."""
        mine = list(batch[self.rank :: self.world])
        return (mine, 1.0) if mine else (list(batch[:1]), 0.0)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float) -> float:
        """The sum of ``value`` over ranks."""
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item())

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(strategy: str) -> Ranks:
    """Join torchrun's process group (gloo on CPU, NCCL on GPUs), or stay a single process for strategy 'none'."""
    cuda = torch.cuda.is_available()
    if strategy == "none":
        return Ranks(device="cuda" if cuda else "cpu")
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError(f"distributed.strategy={strategy!r} must run under torchrun (the local worker starts it)")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------- engines
class Engine:
    """One process, or FSDP2 (when ``module`` was sharded by :func:`build`): how a micro-batch's gradient is
    accumulated, how a step is taken, and how weights and optimizer state are gathered and restored."""

    def __init__(self, module: Any, model: Any, ranks: Ranks, optimizer: Any) -> None:
        self.module = module  # what the loop calls: forward returns the token-loss sum
        self.model = model  # the causal LM (peft or transformers) inside, as save_pretrained knows it
        self.ranks = ranks
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around the forward and backward of one micro-batch; ``last`` is the step's final micro-batch."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float | None) -> float | None:
        """Clip, update and zero the gradients; returns the gradient norm before clipping."""
        norm = None
        if max_grad_norm is not None:
            norm = _item(torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained weights (trainable parameters and buffers), whole, on rank 0's CPU (empty on other ranks)."""
        return _trained(self.model, get_model_state_dict(self.model, options=_GATHER))

    def save(self, folder: Path) -> dict[str, Any]:
        """Collective: what a checkpoint needs, gathered on rank 0 (``weights`` and ``optimizer``)."""
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=_GATHER)
        return {"weights": self.weights(), "optimizer": optimizer}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        """Collective: restore :meth:`save`'s state (every rank reads the file; each keeps its own shard)."""
        set_model_state_dict(self.model, state["weights"], options=_SCATTER)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=_SCATTER)


class DDPEngine(Engine):
    """DistributedDataParallel: a full replica per rank; gradients are all-reduced at each step's last micro-batch."""

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if last else self.module.no_sync()


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 1, 2 or 3, optionally with the optimizer and its state offloaded to the CPU.

    DeepSpeed's own accumulation boundary is set at each step's last micro-batch (a short last step included), its
    loss scaling by the accumulation count is off (the loop's loss is already normalised over the step), and it clips
    the gradients itself (``gradient_clipping``)."""

    def __init__(self, loss: Any, options: Distributed, ranks: Ranks, hp: Hyperparameters) -> None:
        import deepspeed

        params = [p for p in loss.parameters() if p.requires_grad]
        zero: dict[str, Any] = {"stage": options.zero_stage or DEFAULT_ZERO_STAGE}
        if options.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if options.offload_optimizer and ranks.device.startswith("cuda"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # DeepSpeed's vectorised CPU Adam (a JIT-built op)

            optimizer = DeepSpeedCPUAdam(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, adamw_mode=True)
        else:  # on a CPU-only machine the optimizer runs on the CPU anyway: torch's AdamW, like the other engines
            optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        config = {
            "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed; the loop feeds its own micro-batches
            "gradient_accumulation_steps": hp.gradient_accumulation_steps,
            "gradient_clipping": hp.max_grad_norm or 0.0,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31,
        }
        engine, *_ = deepspeed.initialize(model=loss, optimizer=optimizer, config=config, dist_init_required=False)
        super().__init__(engine, loss.model, ranks, optimizer)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        self.module.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)
        self.module.step()  # DeepSpeed's step after every micro-batch: it updates only at the boundary

    def step(self, max_grad_norm: float | None) -> float | None:
        return _item(self.module.get_global_grad_norm()) if max_grad_norm is not None else None

    def weights(self) -> dict[str, torch.Tensor]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(self.params):  # ZeRO-3 partitions parameters; 1 and 2 do not
            if not self.ranks.main:
                return {}
            return {name: t.detach().cpu().clone() for name, t in _trained(self.model, self.model.state_dict()).items()}

    def save(self, folder: Path) -> dict[str, Any]:
        self.module.save_checkpoint(str(folder), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)
        return {"weights": self.weights()}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        self.module.load_checkpoint(
            str(folder), tag="deepspeed", load_module_strict=False, load_lr_scheduler_states=False
        )


def build(loss: Any, options: Distributed, ranks: Ranks, hp: Hyperparameters) -> Engine:
    """The engine of ``options.strategy`` around ``loss`` (a module whose ``model`` attribute is the causal LM)."""
    if options.strategy == "deepspeed":
        return DeepSpeedEngine(loss, options, ranks, hp)
    module = loss
    if options.strategy == "ddp":
        index = torch.device(ranks.device).index
        module = torch.nn.parallel.DistributedDataParallel(loss, device_ids=None if index is None else [index])
    elif options.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layer_types = set(getattr(_base(loss.model), "_no_split_modules", None) or ())
        for layer in [m for m in loss.model.modules() if type(m).__name__ in layer_types]:
            fully_shard(layer)
        fully_shard(loss)
    params = [p for p in loss.parameters() if p.requires_grad]  # after sharding: the sharded parameters
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    engine_type = DDPEngine if options.strategy == "ddp" else Engine
    return engine_type(module, loss.model, ranks, optimizer)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trained(model: Any, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` restricted to trainable parameters and buffers (no frozen weights, no 4-bit base's quant state)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in keep}


def _item(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "full_tensor"):  # a DTensor (FSDP2)
        value = value.full_tensor()
    return float(value)
