"""phitune's trainer against TRL's SFTTrainer + peft on the same CPU, side by side, in one invocation.

Both sides train the same thing: the same model (a Phi-3-architecture config with Phi-3's real vocabulary of 32064,
shrunk to ~32M parameters: hidden 384, intermediate 1024, 4 layers, 6 heads; random weights, seed 0), the same
tokenizer (tiny-phi3's byte-level BPE with Phi-3's chat format and special tokens; its ids all fall below 32064, so the
model keeps the full-width embedding and LM head), the same chat data, LoRA init, optimizer, learning-rate schedule,
sequence length, and the same examples in every optimizer step (TRL reads the examples in the order phitune's loop
visits them, with a sequential sampler). The objective is the same too: phitune finds the assistant spans itself from
Phi-3's own template; TRL gets ``assistant_only_loss`` with a ``{% generation %}`` variant of that template that renders
the same text; the tokens and loss masks of both are compared example by example (``objective``).

Each run is a fresh child process, so its peak RSS (the kernel's ``ru_maxrss`` through ``os.wait4``) is its own. The
sides alternate (ours, TRL, ours, TRL, ...) to share the machine's drift; the figures are medians over rounds of the
per-round median trainable tokens/s after ``--warmup`` steps. TRL is first tried, in short runs, in each configuration
it offers on CPU, and the fastest goes into the rounds (``trl_variants``; variants that change which examples share a
step are measured for speed only; ``--quick`` goes straight to ``plain_loss_padding_free``, the fastest in the full
sweep here). Dense GEMM FLOP/s (bf16 and fp32, 2048^3, torch's threads) is measured just before each round.

Our side runs as a user's job would, with the trainer's defaults: a bf16 frozen base, packed micro-batches with the GEMM
attention kernel per example (rows padded to a bucket length and each example's attention to a multiple of 32 tokens,
so that matmul shapes repeat: oneDNN builds a primitive for every new shape; on this narrow model it keeps the
probabilities of examples from 185 tokens for the backward), LoRA layers that add the adapter inside
one GEMM, the chunked head-only loss, the fused CPU kernels (``phitune.trainer.fused``: RMSNorm, rotary queries and
keys, SwiGLU, the attention's causal softmax, the loss's softmax; built before the runs, as a job's first use builds
them), mimalloc keeping the memory it frees (no ``$PHITUNE_MEMORY_LIMIT``), and no
gradient checkpointing: it is off by default, and here memory allows every activation (``--checkpointing`` turns it
on; the trainer then keeps every layer's matmul outputs, which holds about as much memory, and recomputes only
element-wise work, ~15% slower on this model).

FLOPs (``flops``): the useful work of LoRA on a frozen base, counted the same for both sides — 2·N·T forward + 2·N·T
backward (input gradients only) for the frozen decoder weights N over all T tokens, 6·n·T for the LoRA adapters n, 4·V·H
per trainable token for the LM head (the loss needs it only there), and causal attention 6·L²·H per layer per example of
length L. Recomputation, padding and unneeded head rows are not counted, so a side that does extra work scores a lower
utilisation. ``mfu``: our achieved FLOP/s over the bf16 GEMM FLOP/s measured just before, median over rounds. ``levers``
(full runs): one process, the same micro-batches, forward and backward only: ``all_on`` (no checkpointing), each lever
switched off alone, as the median of its time over all_on's on the same micro-batch (in an order that rotates every
repeat) (``sdpa_per_example``: SDPA's CPU kernel instead of ``phitune.trainer.attention``;
``recomputed_probabilities``: that kernel recomputing every example's probabilities in the backward;
``peft_lora_forward``: peft's own LoRA forward; ``transformers_rms_norm``: transformers' RMSNorm instead of
``phitune.trainer.norm``; ``torch_element_wise_ops``: torch's ops in place of the fused kernels), and the cost
of full and of selective checkpointing and the gain of ``torch.compile`` on the decoder layers (not used by the
trainer: ~40 s of compilation per job).

    python benchmarks/train_vs_trl.py --quick --json     # under 5 minutes on 2 cores
    python benchmarks/train_vs_trl.py --json             # the full sweep and 3 rounds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_CHAT = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "azureml-examples-maas" / "chat-completion_train.jsonl"
)

MODEL: dict[str, Any] = {
    "vocab_size": 32064,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": None,
    "tie_word_embeddings": False,
}
"""Phi3Config keyword arguments of the benchmark model (~31.7M parameters, 24.6M of them the embedding and head)."""

LORA: dict[str, Any] = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
SEED = 0
LEARNING_RATE = 2e-4

GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n'}}"
    "{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}{{'\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
"""Phi-3's chat template with the assistant content and its ``<|end|>`` inside ``{% generation %}``: the same text,
and the same loss positions as phitune's, for TRL's ``assistant_only_loss``."""

TRL_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {"gradient_checkpointing": True},
    "no_checkpointing": {"gradient_checkpointing": False},
    "padding_free": {"gradient_checkpointing": False, "padding_free": True},
    "plain_loss": {"gradient_checkpointing": False, "plain_loss": True},
    "plain_loss_padding_free": {"gradient_checkpointing": False, "plain_loss": True, "padding_free": True},
    "group_by_length": {"gradient_checkpointing": False, "group_by_length": True},
    "packing_bfd": {"gradient_checkpointing": False, "packing": True},
    "fp32": {"gradient_checkpointing": False, "bf16": False},
}
"""TRL 1.16 configurations tried on CPU (a bf16 frozen base and bf16 autocast, as ours, unless ``bf16: False``).
``default`` is SFTConfig's defaults (gradient checkpointing on, TRL's fused LM head, padded batches). ``plain_loss``
replaces TRL's fused head — which on a CPU (no Triton) scores every position — by transformers' own model loss through
``Trainer.compute_loss``. ``padding_free`` flattens each micro-batch into one row (on CPU transformers then builds a
block-diagonal mask for SDPA). ``group_by_length`` and ``packing_bfd`` change which examples share a step, so their loss
curves are not comparable (speed only). Liger's fused loss (``use_liger_kernel``) needs Triton and a GPU: not available
on CPU."""

QUICK_VARIANTS = ("plain_loss_padding_free",)
SAME_BATCHES = {"default", "no_checkpointing", "padding_free", "plain_loss", "plain_loss_padding_free", "fp32"}


# ------------------------------------------------------------------------------------------------------ set-up
def prepare(work: Path, seq: int, micro_batch: int) -> dict[str, Any]:
    """The shared model folder and training file under ``work``; returns what both sides need to know."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from phitune.tiny import ensure_tiny_phi3
    from phitune.trainer import data

    tiny = ensure_tiny_phi3(work / "cache")
    model_dir = work / "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    if not (model_dir / "config.json").exists():
        torch.manual_seed(SEED)
        ids = {k: getattr(tokenizer, f"{k}_id") for k in ("bos_token", "eos_token", "pad_token")}
        config = Phi3Config(**MODEL, **{k.replace("_token", "_token_id"): v for k, v in ids.items()})
        Phi3ForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)

    records, source = _chat_records()
    kept, lengths = [], []
    for record in records:  # whole examples only: both sides must train on exactly the same tokens
        try:
            example = data.encode_chat(tokenizer, record["messages"], max_seq_length=10**9)
        except data.ExampleError:
            continue
        if len(example.input_ids) <= seq:
            kept.append(record)
            lengths.append(len(example.input_ids))
    usable = len(kept) - len(kept) % micro_batch  # full micro-batches only, so TRL's batches line up with ours
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps(record) + "\n" for record in kept[:usable]))
    parameters = sum(p.numel() for p in Phi3ForCausalLM.from_pretrained(model_dir).parameters())
    return {
        "model_dir": str(model_dir),
        "train_file": str(train_file),
        "data_source": source,
        "examples": usable,
        "dropped_longer_than_seq": len(records) - len(kept),
        "dropped_for_full_batches": len(kept) - usable,
        "mean_tokens_per_example": round(statistics.mean(lengths[:usable]), 1),
        "parameters": parameters,
    }


def _chat_records() -> tuple[list[dict[str, Any]], str]:
    """The azureml-examples chat set when it is there, else a generated one with a realistic spread of lengths."""
    if SHARED_CHAT.exists():
        lines = SHARED_CHAT.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()], str(SHARED_CHAT)
    import random

    words = (ROOT / "src" / "phitune" / "assets" / "tiny_corpus.txt").read_text(encoding="utf-8").split()
    rng = random.Random(SEED)
    records = []
    for _ in range(96):
        turns = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            question = " ".join(rng.choices(words, k=int(rng.lognormvariate(4.0, 0.7))))
            answer = " ".join(rng.choices(words, k=int(rng.lognormvariate(3.3, 0.8)) + 1))
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": turns})
    return records, "generated (lognormal turn lengths)"


def step_plan(setup: dict[str, Any], micro_batch: int, accumulation: int, steps: int) -> list[list[list[int]]]:
    """Example indices of every micro-batch of every step, in phitune's loop order (a seeded permutation per
    epoch)."""
    from phitune.trainer.loop import _micro_batch

    count = setup["examples"]
    index = list(range(count))
    per_epoch = count // micro_batch
    return [
        [
            _micro_batch(index, m, per_epoch, micro_batch, SEED)  # type: ignore[arg-type]
            for m in range(step * accumulation, (step + 1) * accumulation)
        ]
        for step in range(steps)
    ]


def lora_config() -> Any:
    """peft's config for :data:`LORA`: the same adapters on both sides."""
    import peft

    return peft.LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=list(LORA["target_modules"]),
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------------------------------------- children
class Timeline:
    """Wall time at the end of every optimizer step, and the step's train loss."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.trainable: list[int] = []

    def end_step(self, loss: float, trainable: int) -> None:
        self.ends.append(time.perf_counter())
        self.losses.append(loss)
        self.trainable.append(trainable)

    def result(self, started: float, rss_after_imports: int) -> dict[str, Any]:
        from phitune.trainer.loading import max_rss_bytes

        return {
            "step_seconds": [round(b - a, 4) for a, b in pairwise([started, *self.ends])],
            "losses": self.losses,
            "trainable_tokens_per_step": self.trainable,
            "rss_after_imports_bytes": rss_after_imports,
            "peak_rss_self_bytes": max_rss_bytes(),
        }


def child_ours(args: argparse.Namespace, rss_after_imports: int) -> dict[str, Any]:
    from phitune.trainer import loop
    from phitune.types import Hyperparameters, JobSpec, LoRA

    timeline = Timeline()

    class Control(loop.NullControl):
        def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
            print(text, file=sys.stderr)

        def metrics(self, data: dict[str, Any]) -> None:
            if "train_loss" in data:
                timeline.end_step(float(data["train_loss"]), int(data["trainable_tokens"]))

    hp = Hyperparameters(
        epochs=1000,
        max_steps=args.steps,
        batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=LEARNING_RATE,
        lr_scheduler="linear",
        max_seq_length=args.seq,
        seed=SEED,
        gradient_checkpointing=args.checkpointing,
        precision="auto",
    )
    spec = JobSpec(model=args.model_dir, training_file=args.train_file, method=LoRA(**LORA), hyperparameters=hp)
    work = Path(tempfile.mkdtemp(prefix="phitune-bench-ours-"))
    run = loop.TrainRun(spec, args.model_dir, Path(args.train_file), None, work / "out", work / "checkpoints")
    started = time.perf_counter()
    loop.train(run, Control())
    result = timeline.result(started, rss_after_imports)
    shutil.rmtree(work, ignore_errors=True)
    return result


def child_trl(args: argparse.Namespace, rss_after_imports: int) -> dict[str, Any]:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    variant = TRL_VARIANTS[args.variant]
    plan: list[list[list[int]]] = json.loads(args.plan)
    records = [json.loads(line) for line in Path(args.train_file).read_text(encoding="utf-8").splitlines()]
    ordered = [records[i] for step in plan for batch in step for i in batch]

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.chat_template = GENERATION_TEMPLATE
    torch.manual_seed(SEED)  # as phitune's loop: seed, load, wrap (identical LoRA initialisation)
    dtype = torch.bfloat16 if variant.get("bf16", True) else torch.float32  # a frozen base as the trainer keeps it
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    model = peft.get_peft_model(model, lora_config())
    timeline = Timeline()
    counted = [0]  # trainable tokens of the step in progress

    class Recorder(TrainerCallback):  # type: ignore[misc]
        def on_log(self, _args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if logs and "loss" in logs:
                timeline.end_step(float(logs["loss"]), counted[0])
                counted[0] = 0

    class Counting(SFTTrainer):  # type: ignore[misc]
        """SFTTrainer, counting the positions that carry loss in every micro-batch it trains on."""

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            counted[0] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    class PlainLoss(Counting):
        """TRL's data pipeline with transformers' own model loss in place of TRL's fused LM head."""

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    packing = bool(variant.get("packing"))
    padding_free = bool(variant.get("padding_free"))
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="phitune-bench-trl-"),
        per_device_train_batch_size=args.packed_rows if packing else args.micro_batch,
        gradient_accumulation_steps=args.accumulation,
        max_steps=args.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=SEED,
        bf16=variant.get("bf16", True),
        gradient_checkpointing=variant["gradient_checkpointing"],
        assistant_only_loss=True,
        max_length=args.seq if packing or not padding_free else None,  # examples are whole and <= seq already
        packing=packing,
        padding_free=padding_free,
        train_sampling_strategy="group_by_length" if variant.get("group_by_length") else "sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer_type = PlainLoss if variant.get("plain_loss") else Counting
    trainer = trainer_type(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(ordered),
        processing_class=tokenizer,
        callbacks=[Recorder()],
    )
    tokens = _trl_tokens(trainer.train_dataset) if args.dump_tokens else None
    started = time.perf_counter()
    trainer.train()
    result = timeline.result(started, rss_after_imports)
    if tokens is not None:
        result["tokens"] = tokens
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return result


def _trl_tokens(dataset: Any) -> list[dict[str, list[int]]]:
    """Per example: TRL's input ids and the positions its loss mask keeps."""
    out = []
    for row in dataset:
        mask = row.get("assistant_masks") or row.get("completion_mask")
        if mask is None:
            mask = [int(label != -100) for label in row["labels"]]
        out.append({"input_ids": list(row["input_ids"]), "trained": [i for i, m in enumerate(mask) if m]})
    return out


def child_levers(args: argparse.Namespace, rss_after_imports: int) -> dict[str, Any]:
    """Each lever of our trainer switched off alone, timed against all levers on, in one process: forward and backward
    of the same micro-batches (the first step's), the configurations alternating, medians over repeats."""
    import copy

    import peft
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from phitune import _allocator as allocator
    from phitune import attention, data, fused, packing
    from phitune.trainer.decoder import use_fused_decoder
    from phitune.trainer.loop import token_loss_sum
    from phitune.trainer.lora import fuse_lora_layers
    from phitune.trainer.loss import linear_cross_entropy
    from phitune.trainer.model import keep_matmul_outputs
    from phitune.trainer.norm import use_training_rms_norm

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    examples = data.load_examples(args.train_file, tokenizer, max_seq_length=args.seq)
    plan: list[list[list[int]]] = json.loads(args.plan)
    batches = [[examples[i] for i in batch] for step in plan[:2] for batch in step]
    allocator.keep_freed_memory()  # as the trainer does without $PHITUNE_MEMORY_LIMIT
    pack = functools.partial(packing.pack, pad_id=tokenizer.pad_token_id)  # as the trainer packs: rows to a bucket

    def adapted(dtype: Any, fused: bool = True, norm: bool = True) -> Any:
        torch.manual_seed(SEED)
        base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
        if norm:
            use_training_rms_norm(base)  # as the trainer's apply_method does
        use_fused_decoder(base)  # as apply_method does
        model = peft.get_peft_model(base, lora_config()).train()
        if fused:
            fuse_lora_layers(model)  # as apply_method does
        return model

    sdpa = adapted(torch.bfloat16)  # transformers' own attention; a bf16 frozen base, as the trainer loads it
    varlen = copy.deepcopy(sdpa)
    packing.use_varlen_attention(varlen)
    unfused = adapted(torch.bfloat16, fused=False)
    packing.use_varlen_attention(unfused)
    plain_norm = adapted(torch.bfloat16, norm=False)
    packing.use_varlen_attention(plain_norm)
    fp32 = adapted(torch.float32)
    packing.use_varlen_attention(fp32)
    checkpointed = copy.deepcopy(varlen)
    checkpointed.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.enable_input_require_grads()
    selective = copy.deepcopy(checkpointed)
    keep_matmul_outputs(selective, MODEL["num_hidden_layers"], adapter_rank=LORA["r"])
    compiled = copy.deepcopy(varlen)
    for layer in compiled.get_base_model().model.layers:
        layer.compile(dynamic=True)
    varlen_fn = packing.varlen_attention
    compiled_attention = torch.compiler.disable(varlen_fn)  # the per-example loop stays eager
    longest_gemm_attention = attention.MAX_LENGTH
    keeps_probabilities = packing._keeps_probabilities
    fused_operators = fused.operators

    def full_logits(model: Any, batch: dict[str, Any]) -> Any:
        """transformers' loss path: the LM head on every position, then cross-entropy where labels are set."""
        segments = {"segments": tuple(batch["cu_seq_lens"].tolist()), "position_ids": batch["position_ids"]}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **segments).logits
        return F.cross_entropy(logits[0, :-1].float(), batch["labels"][0, 1:], reduction="sum")

    def transformers_packed(model: Any, batch: dict[str, Any]) -> Any:
        """Packed rows through transformers' SDPA: packed position ids and no attention mask, from which transformers
        builds a block-diagonal [tokens, tokens] mask."""
        base = model.get_base_model()
        hidden = base.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        labels = batch["labels"][:, 1:]
        selected = labels != -100
        return linear_cross_entropy(hidden[:, :-1][selected], base.lm_head.weight, labels[selected])

    levers: dict[str, tuple[Any, Any, Any, bool]] = {  # model, batching, loss, bf16
        "all_on": (varlen, pack, token_loss_sum, True),
        "padded_batches": (varlen, lambda e: data.collate(e, tokenizer.pad_token_id), token_loss_sum, True),
        "packed_with_block_mask": (sdpa, pack, transformers_packed, True),
        "sdpa_per_example": (varlen, pack, token_loss_sum, True),
        "recomputed_probabilities": (varlen, pack, token_loss_sum, True),
        "peft_lora_forward": (unfused, pack, token_loss_sum, True),
        "transformers_rms_norm": (plain_norm, pack, token_loss_sum, True),
        "torch_element_wise_ops": (varlen, pack, token_loss_sum, True),
        "head_on_every_position": (varlen, pack, full_logits, True),
        "fp32": (fp32, pack, token_loss_sum, False),
        "gradient_checkpointing": (checkpointed, pack, token_loss_sum, True),
        "selective_checkpointing": (selective, pack, token_loss_sum, True),
        "torch_compile": (compiled, pack, token_loss_sum, True),
    }
    # torch.compile goes last, in a phase of its own against all_on: its compile workers linger and would slow
    # whatever ran next
    phases = [[name for name in levers if name != "torch_compile"], ["all_on", "torch_compile"]]
    wall: dict[str, list[float]] = {name: [] for name in levers}
    cpu: dict[str, list[float]] = {name: [] for name in levers}
    slowdowns: dict[str, list[float]] = {name: [] for name in levers}
    for names in phases:
        for repeat in range(args.steps + 2):  # the first two rounds warm up (and compile)
            batch_examples = batches[repeat % len(batches)]
            timed: dict[str, float] = {}
            # a rotating order: what ran just before (a lever that frees a [tokens, tokens] mask, say) changes the
            # next one's time by up to 10-20% here, so no lever always follows the same one
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                model, batching, loss_of, bf16 = levers[name]
                AttentionInterface.register(
                    packing.ATTENTION, compiled_attention if name == "torch_compile" else varlen_fn
                )
                attention.MAX_LENGTH = 0 if name == "sdpa_per_example" else longest_gemm_attention
                packing._keeps_probabilities = (
                    (lambda config, length: False) if name == "recomputed_probabilities" else keeps_probabilities
                )
                fused.operators = (lambda: None) if name == "torch_element_wise_ops" else fused_operators
                batch = batching(batch_examples)
                started, started_cpu = time.perf_counter(), time.process_time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    value = loss_of(model, batch)
                value.backward()
                model.zero_grad(set_to_none=True)
                timed[name] = time.perf_counter() - started
                if repeat >= 2:
                    wall[name].append(timed[name])
                    cpu[name].append(time.process_time() - started_cpu)
            if repeat >= 2:
                for name in names:
                    slowdowns[name].append(timed[name] / timed["all_on"])
    return {
        name: {
            "seconds": round(statistics.median(wall[name]), 3),
            "cpu_seconds": round(statistics.median(cpu[name]), 3),
            "slowdown_vs_all_on": round(statistics.median(slowdowns[name]), 3),
        }
        for name in levers
    }


def child_gemm(args: argparse.Namespace, rss_after_imports: int) -> dict[str, Any]:
    """Dense GEMM FLOP/s, median of repeated 2048^3 products (bf16 and fp32), on this machine's torch threads."""
    import torch

    def rate(dtype: Any, size: int = 2048, repeats: int = 12) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
        return 2 * size**3 / statistics.median(times)

    return {"bf16_flops": rate(torch.bfloat16), "fp32_flops": rate(torch.float32), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------- parent
def child_env(kind: str) -> dict[str, str]:
    """Our sides run in the environment the local worker gives its trainers (the allocator preloaded); TRL and the
    GEMM probe in this process's, as TRL's users run it."""
    from phitune.local.worker import trainer_env
    from phitune.types import Distributed

    return trainer_env(Distributed()) if kind in ("ours", "levers") else dict(os.environ)


def run_child(kind: str, args: argparse.Namespace, extra: list[str], steps: int | None = None) -> dict[str, Any]:
    """Run this script as a child process; its JSON result plus ``peak_rss_bytes`` (the kernel's ru_maxrss of that
    child alone) and ``wall_seconds``."""
    common = [
        f"--seq={args.seq}",
        f"--micro-batch={args.micro_batch}",
        f"--accumulation={args.accumulation}",
        f"--steps={steps or args.steps}",
    ]
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--child", kind, "--out", out.name, *common, *extra]
        process = subprocess.Popen(command, stdout=sys.stderr, env={**child_env(kind), "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"{kind} child {extra[-1:]} exited with {process.returncode}")
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def rates(run: dict[str, Any], warmup: int) -> float:
    """Median trainable tokens/s of a run's steps after the warm-up (the tokens each side counted itself)."""
    timed = zip(run["trainable_tokens_per_step"][warmup:], run["step_seconds"][warmup:], strict=True)
    return statistics.median(tokens / seconds for tokens, seconds in timed)


def summarise(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Medians over runs of: per-run median trainable tokens/s after the warm-up, peak RSS."""
    per_run = [rates(run, warmup) for run in runs]
    return {
        "trainable_tokens_per_second": round(statistics.median(per_run), 1),
        "trainable_tokens_per_second_runs": [round(x, 1) for x in per_run],
        "peak_rss_mib": round(statistics.median(r["peak_rss_bytes"] for r in runs) / 2**20, 1),
        "peak_rss_mib_runs": [round(r["peak_rss_bytes"] / 2**20, 1) for r in runs],
        "rss_after_imports_mib": round(statistics.median(r["rss_after_imports_bytes"] for r in runs) / 2**20, 1),
        "losses": [round(x, 5) for x in runs[0]["losses"]],
        "trainable_tokens_per_step": runs[0]["trainable_tokens_per_step"],
    }


def step_flops(plan: list[list[list[int]]], lengths: list[int], trained: list[int]) -> list[float]:
    """Useful FLOPs of every step (see the module docstring)."""
    h, i, layers, vocab = (MODEL[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    frozen = layers * h * (3 * h + h + 2 * i + i)  # qkv_proj, o_proj, gate_up_proj, down_proj
    adapters = layers * LORA["r"] * ((h + 3 * h) + (h + h) + (h + 2 * i) + (i + h))
    out = []
    for step in plan:
        examples = [e for batch in step for e in batch]
        tokens = sum(lengths[e] for e in examples)
        labelled = sum(trained[e] for e in examples)
        attention = sum(6 * lengths[e] ** 2 * h * layers for e in examples)
        out.append(4 * frozen * tokens + 6 * adapters * tokens + 4 * vocab * h * labelled + attention)
    return out


def our_tokens(setup: dict[str, Any], seq: int) -> list[Any]:
    from transformers import AutoTokenizer

    from phitune.trainer import data

    tokenizer = AutoTokenizer.from_pretrained(setup["model_dir"])
    return data.load_examples(setup["train_file"], tokenizer, max_seq_length=seq)


def compare_objective(ours: list[Any], trl: list[dict[str, list[int]]], plan: list[list[list[int]]]) -> dict[str, Any]:
    """Token ids and trained positions, example by example, in TRL's (planned) order."""
    order = [i for step in plan for batch in step for i in batch]
    same_ids = same_mask = 0
    for position, index in enumerate(order):
        example = ours[index]
        same_ids += example.input_ids == trl[position]["input_ids"]
        trained = [k for k, label in enumerate(example.labels) if label != -100]
        same_mask += trained == trl[position]["trained"]
    return {"examples_compared": len(order), "same_input_ids": same_ids, "same_loss_positions": same_mask}


def environment() -> dict[str, Any]:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "mem_available_gib": round(int(meminfo["MemAvailable"].split()[0]) / 2**20, 1),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="TRL's fastest configuration only, shorter steps, 2 rounds (< 5 min)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--rounds", type=int, help="alternating rounds of ours and TRL's best (3; quick: 2)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (10; quick: 6)")
    parser.add_argument("--sweep-steps", type=int, help="optimizer steps of each TRL variant tried (4)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--seq", type=int, default=1024, help="maximum sequence length (longer examples dropped)")
    parser.add_argument("--micro-batch", type=int, default=8, help="examples per micro-batch")
    parser.add_argument("--accumulation", type=int, help="micro-batches per optimizer step (2; quick: 1)")
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="gradient checkpointing on our side (default: off, as the trainer's; on, it keeps the matmul outputs that "
        "memory allows)",
    )
    parser.add_argument(
        "--variants", help="comma-separated TRL variants to try (default: all; quick: plain_loss_padding_free)"
    )
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction, help="time each lever (default: not quick)")
    parser.add_argument("--work", type=Path, help="folder for the model and data (default: a temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--train-file", help=argparse.SUPPRESS)
    parser.add_argument("--dump-tokens", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--packed-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rss_after_imports = _imports_for(args.child)
        children = {"ours": child_ours, "trl": child_trl, "gemm": child_gemm, "levers": child_levers}
        result = children[args.child](args, rss_after_imports)
        Path(args.out).write_text(json.dumps(result))
        return
    args.steps = args.steps or (6 if args.quick else 10)
    args.accumulation = args.accumulation or (1 if args.quick else 2)
    sweep_steps = args.sweep_steps or 4
    rounds = args.rounds or (2 if args.quick else 3)
    variants = args.variants.split(",") if args.variants else list(QUICK_VARIANTS if args.quick else TRL_VARIANTS)
    levers = not args.quick if args.levers is None else args.levers

    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="phitune-vs-trl-"))
    report: dict[str, Any] = {"command": " ".join(["python", "benchmarks/train_vs_trl.py", *sys.argv[1:]])}
    report["environment_before"] = environment()
    setup = prepare(work, args.seq, args.micro_batch)
    from phitune.trainer import fused

    report["fused_kernels"] = fused.operators() is not None  # built here, before the runs, as a job's first use would
    plan = step_plan(setup, args.micro_batch, args.accumulation, args.steps)
    examples = our_tokens(setup, args.seq)
    lengths = [len(e.input_ids) for e in examples]
    trained = [e.trainable_tokens for e in examples]
    trainable_per_step = [sum(trained[e] for batch in step for e in batch) for step in plan]
    side = ["--model-dir", setup["model_dir"], "--train-file", setup["train_file"], "--plan", json.dumps(plan)]
    micro_batch_tokens = statistics.mean(sum(lengths[e] for e in batch) for step in plan for batch in step)
    packed_rows = max(1, round(micro_batch_tokens / args.seq))  # TRL's packed rows: about our tokens per micro-batch

    def trl(variant: str, steps: int | None = None, dump: bool = False) -> dict[str, Any]:
        extra = [*side, f"--packed-rows={packed_rows}", *(["--dump-tokens"] if dump else []), "--variant", variant]
        return run_child("trl", args, extra, steps)

    # TRL's configurations, each once (short runs), when there is a choice; then the fastest against ours,
    # alternating, each round's GEMM peak measured just before it
    sweep: dict[str, dict[str, Any]] = {}
    for variant in variants if len(variants) > 1 else []:
        sweep[variant] = summarise([trl(variant, sweep_steps)], args.warmup)
        print(f"trl {variant}: {sweep[variant]['trainable_tokens_per_second']} trainable tokens/s", file=sys.stderr)
    best = max(sweep, key=lambda v: sweep[v]["trainable_tokens_per_second"]) if sweep else variants[0]
    ours_runs, trl_runs, gemm = [], [], []
    ours_extra = [*side, "--checkpointing" if args.checkpointing else "--no-checkpointing"]
    for _ in range(rounds):
        gemm.append(run_child("gemm", args, []))
        ours_runs.append(run_child("ours", args, ours_extra))
        trl_runs.append(trl(best, dump=not trl_runs))
    report["objective"] = compare_objective(examples, trl_runs[0].pop("tokens"), plan)
    if levers:
        report["levers"] = run_child("levers", args, side, steps=16)

    ours = summarise(ours_runs, args.warmup)
    theirs = summarise(trl_runs, args.warmup)
    report["objective"]["same_trainable_tokens_per_step"] = {
        "ours": ours["trainable_tokens_per_step"] == trainable_per_step,
        f"trl {best}": theirs["trainable_tokens_per_step"] == trainable_per_step,
    }
    parity = best if best in SAME_BATCHES else None
    reference = theirs["losses"] if parity else []
    differences = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], reference, strict=False)]
    flops = step_flops(plan, lengths, trained)
    timed = slice(args.warmup, args.steps)
    flops_per_trainable = sum(flops[timed]) / sum(trainable_per_step[timed])
    # utilisation per round: that round's rate against the GEMM peak measured just before it
    ours_mfu = [
        rates(r, args.warmup) * flops_per_trainable / g["bf16_flops"] for r, g in zip(ours_runs, gemm, strict=True)
    ]
    trl_mfu = [
        rates(r, args.warmup) * flops_per_trainable / g["bf16_flops"] for r, g in zip(trl_runs, gemm, strict=True)
    ]
    report.update(
        {
            "setup": {
                **{k: v for k, v in setup.items() if k not in ("model_dir", "train_file")},
                "model": MODEL,
                "lora": {**LORA, "target_modules": list(LORA["target_modules"])},
                "tokenizer": "tiny-phi3's BPE (Phi-3 chat format and special tokens), model vocab_size 32064",
                "seq": args.seq,
                "micro_batch": args.micro_batch,
                "accumulation": args.accumulation,
                "steps": args.steps,
                "warmup_steps_excluded": args.warmup,
                "rounds": rounds,
                "tokens_per_step": [sum(lengths[e] for batch in step for e in batch) for step in plan],
                "trainable_tokens_per_step": trainable_per_step,
                "learning_rate": LEARNING_RATE,
                "lr_scheduler": "linear, no warm-up",
                "our_gradient_checkpointing": args.checkpointing,
            },
            "ours": ours,
            "trl": {"variant": best, **theirs},
            "trl_variants": {"steps": sweep_steps, **sweep},
            "loss_parity": {
                "against": f"trl {parity}" if parity else None,
                "max_relative_difference": round(max(differences), 6) if differences else None,
                "relative_differences": [round(d, 6) for d in differences],
                "tolerance": LOSS_TOLERANCE,
                "within_tolerance": bool(differences) and max(differences) <= LOSS_TOLERANCE,
            },
            "gemm": {
                "bf16_gflops_runs": [round(g["bf16_flops"] / 1e9, 1) for g in gemm],
                "fp32_gflops_runs": [round(g["fp32_flops"] / 1e9, 1) for g in gemm],
                "threads": gemm[0]["threads"],
            },
            "flops": {
                "per_trainable_token": round(flops_per_trainable),
                "ours_gflops": round(ours["trainable_tokens_per_second"] * flops_per_trainable / 1e9, 1),
                "trl_gflops": round(theirs["trainable_tokens_per_second"] * flops_per_trainable / 1e9, 1),
                "ours_mfu_runs": [round(x, 3) for x in ours_mfu],
                "trl_mfu": round(statistics.median(trl_mfu), 3),
            },
            "tokens_per_second_ratio": round(
                ours["trainable_tokens_per_second"] / theirs["trainable_tokens_per_second"], 3
            ),
            "peak_rss_ratio": round(ours["peak_rss_mib"] / theirs["peak_rss_mib"], 3),
            "mfu": round(statistics.median(ours_mfu), 3),
            "environment_after": environment(),
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


LOSS_TOLERANCE = 1e-3
"""Largest relative difference of the train loss at a matched step. Both sides run bf16 matmuls in different groupings
(packed rows against padded batches, the head in chunks against whole), so their roundings differ and the difference
grows a little with every update: ~1e-5 was measured over 6-10 steps here."""


def _imports_for(kind: str) -> int:
    """Import what the child needs before anything is measured; the RSS after imports."""
    if kind == "trl":
        from trl import SFTTrainer  # noqa: F401  (trl itself imports lazily)
    elif kind == "ours":
        import phitune.trainer.loop  # noqa: F401
    else:
        import torch  # noqa: F401
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
