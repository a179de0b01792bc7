"""Real Phi sizes on one machine: load peaks, training tokens/s and peak RSS, and the estimator against them.

Every measurement runs in a fresh child process; its peak RSS is the kernel's own count for that child
(``os.wait4``'s ``ru_maxrss``), so nothing of the parent or of earlier runs is in it. Training goes through phitune's
trainer (``phitune.trainer.loop.train`` with a recording Control) on chat examples cut to ``--seq`` tokens.

``train --peer`` then runs the peer on the same examples in its own child: plain transformers + peft as a user would
write it (``from_pretrained`` in bf16, or 4-bit NF4 with ``prepare_model_for_kbit_training`` for QLoRA; the same LoRA
rank, alpha and targets; gradient checkpointing; AdamW; the model's own loss), and prints the ratios.

``--threads N`` sets torch's intra-op threads in the child and for the probe. On a machine shared with other busy
processes, two OpenMP threads on two cores wait for each other at every parallel region (an elementwise op on a
256 x 512 tensor took 8 ms instead of 22 us here): one thread then measures a core's throughput far more faithfully.

Steps: one warm-up step (page faults, first allocations) is excluded from tokens/s; ``tokens_per_second`` counts every
token of the batch (``batch x seq``), ``trainable_tokens_per_second`` only those with loss (the loop's metric).

    python benchmarks/write_random_checkpoint.py mini /tmp/phitune-real/mini
    python benchmarks/real_sizes.py load  /tmp/phitune-real/mini --method qlora
    python benchmarks/real_sizes.py train /tmp/phitune-real/mini --method lora --steps 4 --seq 256 --peer
    python benchmarks/write_random_checkpoint.py phi4-mini /tmp/phitune-real/phi4-mini     # phi3.5-mini alike
    python benchmarks/real_sizes.py train /tmp/phitune-real/phi4-mini --method qlora --steps 4 --seq 256 --peer
    python benchmarks/real_sizes.py probe
    python benchmarks/real_sizes.py table results/*.json                # measured against estimated, markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any
from unittest import mock

CORPUS = Path(__file__).resolve().parents[1] / "src" / "phitune" / "assets" / "tiny_corpus.txt"


# ---------------------------------------------------------------------------------------------------- parent side
def run_child(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run this script's ``child`` command; return its JSON result with ``peak_rss_bytes`` (the child's ru_maxrss)
    and ``wall_seconds``. Our children run in the environment the local worker gives its trainers (the allocator
    preloaded); the peer in this process's, as its users run it."""
    from phitune.local.worker import trainer_env
    from phitune.types import Distributed

    env = dict(os.environ) if args[0] == "peer" else trainer_env(Distributed())
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "child", "--out", out.name, *args]
        process = subprocess.Popen(command, stdout=sys.stderr, env=env)  # the child's chatter stays off our JSON
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"child {args} ran past {timeout} s")
            time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"child {args} exited with {process.returncode}")
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
    scale = 1 if sys.platform == "darwin" else 1024
    result["peak_rss_bytes"] = usage.ru_maxrss * scale
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def gib(value: float) -> float:
    return round(value / 2**30, 2)


# ----------------------------------------------------------------------------------------------------- child side
def write_dataset(path: Path, examples: int, approx_chars: int) -> Path:
    """Chat examples whose assistant turn is a long stretch of the bundled corpus (cut to the sequence length)."""
    text = " ".join(CORPUS.read_text(encoding="utf-8").split())
    with open(path, "w", encoding="utf-8") as out:
        for i in range(examples):
            start = (i * 977) % max(1, len(text) - approx_chars)
            answer = text[start : start + approx_chars]
            messages = [{"role": "user", "content": "Continue the text."}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def child_train(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from phitune.estimate import available_memory
    from phitune.trainer import loop
    from phitune.types import Hyperparameters, JobSpec

    work = Path(tempfile.mkdtemp(prefix="phitune-real-"))
    data = write_dataset(work / "train.jsonl", examples=args.batch * (args.steps + 1), approx_chars=args.seq * 8)
    hp = Hyperparameters(
        max_steps=args.steps,
        batch_size=args.batch,
        max_seq_length=args.seq,
        gradient_checkpointing=not args.no_checkpointing,
        learning_rate=1e-4,
        lr_scheduler="constant",
    )
    spec = JobSpec(model=args.model, training_file=str(data), method=args.method, hyperparameters=hp)
    run = loop.TrainRun(
        spec=spec,
        base_path=args.model,
        train_path=data,
        valid_path=None,
        output_dir=work / "out",
        checkpoint_dir=work / "checkpoints",
    )

    class RecordingControl(loop.NullControl):
        """A trainer Control that keeps every message and metrics event."""

        def __init__(self) -> None:
            self.messages: list[dict[str, Any]] = []
            self.steps: list[dict[str, Any]] = []

        def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
            self.messages.append({"text": text, "data": data})

        def metrics(self, data: dict[str, Any]) -> None:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.steps.append({**data, "major_faults": usage.ru_majflt, "cpu_seconds": usage.ru_utime + usage.ru_stime})

    control = RecordingControl()
    available = available_memory()  # what the trainer plans its checkpointing against (PHITUNE_MEMORY_LIMIT or free)
    started = time.perf_counter()
    result = loop.train(run, control)
    seconds = time.perf_counter() - started
    timed = control.steps[1:] or control.steps
    step_seconds = [s["trainable_tokens"] / s["tokens_per_second"] for s in timed]
    cpu_seconds = [b["cpu_seconds"] - a["cpu_seconds"] for a, b in pairwise(control.steps)]
    tokens_per_step = args.batch * args.seq
    threads = torch.get_num_threads()
    return {
        "kind": "train",
        "model": args.model,
        "method": args.method,
        "side": "phitune",
        "dataset": str(data),
        "available_bytes": available,
        "batch": args.batch,
        "seq": args.seq,
        "gradient_checkpointing": not args.no_checkpointing,
        "threads": threads,
        "steps": result.step,
        "losses": [round(s["train_loss"], 4) for s in control.steps],
        "step_seconds": [round(s["trainable_tokens"] / s["tokens_per_second"], 2) for s in control.steps],
        "step_cpu_seconds": [round(c, 1) for c in cpu_seconds],
        "step_major_faults": [b["major_faults"] - a["major_faults"] for a, b in pairwise(control.steps)],
        "tokens_per_second": round(tokens_per_step / statistics.median(step_seconds), 2),
        # what the step would take with the machine's threads to itself: CPU time / threads (a lower bound on the
        # uncontended speed: OpenMP threads spin while they wait for a descheduled sibling)
        "cpu_normalised_tokens_per_second": round(tokens_per_step * threads / statistics.median(cpu_seconds), 2)
        if cpu_seconds
        else None,
        "trainable_tokens_per_second": round(statistics.median(s["tokens_per_second"] for s in timed), 2),
        "load": next((m["data"]["load"] for m in control.messages if m["data"] and "load" in m["data"]), None),
        "train_seconds": round(seconds, 1),
        "messages": [m["text"] for m in control.messages],
    }


def transformers_kwargs(method: str) -> dict[str, Any]:
    """``from_pretrained`` arguments as a user of plain transformers would pass them: bf16, 4-bit NF4 with double
    quantisation for QLoRA, fp32 for full fine-tuning."""
    import torch
    from transformers import BitsAndBytesConfig

    if method == "qlora":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return {"dtype": torch.bfloat16, "quantization_config": config, "device_map": {"": "cpu"}}
    return {"dtype": torch.float32 if method == "full" else torch.bfloat16}


def child_peer(args: argparse.Namespace) -> dict[str, Any]:
    """Plain transformers + peft on the examples phitune trains on: the loop a user would write without phitune."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from phitune.trainer import data
    from phitune.trainer.model import load_tokenizer
    from phitune.types import LoRA

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="phitune-real-peer-"))
    path = write_dataset(work / "train.jsonl", examples=args.batch * (args.steps + 1), approx_chars=args.seq * 8)
    tokenizer = load_tokenizer(args.model)
    examples = data.load_examples(path, tokenizer, max_seq_length=args.seq)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, **transformers_kwargs(args.method))
    checkpointing = not args.no_checkpointing
    if args.method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoRA()
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets(model.config.model_type)),
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    model.train()
    load_seconds = time.perf_counter() - started
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses, step_seconds = [], []
    for step in range(args.steps):
        began = time.perf_counter()
        batch = data.collate(examples[step * args.batch : (step + 1) * args.batch], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 4))
        step_seconds.append(time.perf_counter() - began)
    timed = step_seconds[1:] or step_seconds
    return {
        "kind": "train",
        "side": "transformers+peft",
        "model": args.model,
        "method": args.method,
        "batch": args.batch,
        "seq": args.seq,
        "gradient_checkpointing": checkpointing,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "losses": losses,
        "step_seconds": [round(x, 2) for x in step_seconds],
        "tokens_per_second": round(args.batch * args.seq / statistics.median(timed), 2),
        "load_seconds": round(load_seconds, 1),
    }


def child_load(args: argparse.Namespace) -> dict[str, Any]:

    from phitune.trainer.loading import LoadReport, PeakRSS, load_for_training, rss_bytes
    from phitune.types import Full, LoRA, QLoRA

    method = {"lora": LoRA(), "qlora": QLoRA(), "full": Full()}[args.method]
    if args.loader == "lean":
        _, report = load_for_training(args.model, method, device="cpu")
        return {"kind": "load", **report.model_dump()}
    from transformers import AutoModelForCausalLM

    kwargs = transformers_kwargs(args.method)
    started = time.perf_counter()
    with PeakRSS() as peak:
        model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    report = LoadReport(
        path=args.model,
        loader="from_pretrained",
        dtype="fp32" if args.method == "full" else "bf16",
        quantized=args.method == "qlora",
        seconds=round(time.perf_counter() - started, 2),
        peak_rss_bytes=peak.peak_bytes,
        peak_scope=peak.scope,
        rss_after_bytes=rss_bytes(),
        weight_bytes=sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
    )
    return {"kind": "load", "transformers": True, **report.model_dump()}


def child_probe(args: argparse.Namespace) -> dict[str, Any]:
    from phitune.runtime.probe import measure

    return {"kind": "probe", **measure(quantized=True).model_dump(mode="json")}


# ------------------------------------------------------------------------------------------------------------ main
def predict(result: dict[str, Any], probe: Any) -> Any:
    """The estimator's prediction for a training run, with the memory it planned against and the allocator it ran on
    (runs recorded before the trainer reported one ran on glibc's)."""
    from phitune._allocator import ALLOCATOR_ENV
    from phitune.estimate import estimate
    from phitune.types import Hyperparameters, JobSpec

    hp = Hyperparameters(
        batch_size=result["batch"],
        max_seq_length=result["seq"],
        gradient_checkpointing=result["gradient_checkpointing"],
    )
    spec = JobSpec(model=result["model"], training_file="-", method=result["method"], hyperparameters=hp)
    dataset = result.get("dataset")
    ran_on = {ALLOCATOR_ENV: (result.get("load") or {}).get("allocator", "system")}
    with mock.patch.dict(os.environ, ran_on):
        if dataset and Path(dataset).is_file():  # as a job's fit check counts it (tokens, embedding rows touched)
            return estimate(spec, dataset=dataset, probe=probe, available_bytes=result["available_bytes"])
        return estimate(spec, tokens_per_example=result["seq"], probe=probe, available_bytes=result["available_bytes"])


def with_estimate(result: dict[str, Any]) -> dict[str, Any]:
    """Add the estimator's prediction for a training run, and its errors against the measured peak and speed. The
    machine is probed afresh right after the run (not from the cache), with the run's threads."""
    import torch

    from phitune.runtime.probe import measure

    torch.set_num_threads(result["threads"])
    probe = measure(quantized=result["method"] == "qlora")
    predicted = predict(result, probe)
    result["estimate"] = {
        "peak_bytes": predicted.peak_bytes,
        "tokens_per_second": round(predicted.tokens_per_second, 2),
        "kept_matmul_layers": predicted.kept_matmul_layers,
        "kept_down_projections": predicted.kept_down_projections,
        "memory": predicted.memory.model_dump(),
        "probe": probe.model_dump(),
        "peak_error": round(predicted.peak_bytes / result["peak_rss_bytes"] - 1, 3),
        "speed_error": round(predicted.tokens_per_second / result["tokens_per_second"] - 1, 3),
    }
    return result


def table(paths: list[str]) -> str:
    """A markdown table of ``train`` results (one JSON object per line or per file) against the estimator as it is
    now, from each run's probe and available memory."""
    from phitune.estimate import MachineProbe

    rows = []
    for path in paths:
        text = Path(path).read_text()
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError:
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
    lines = [
        "| model | method | batch x seq | checkpointing | allocator | peak RSS | estimated | error | tokens/s | "
        "estimated | transformers+peft: peak RSS, tokens/s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.get("kind") != "train":
            continue
        # a probe recorded without "bf16" ran on the AVX512-BF16 machine of benchmarks/README.md
        probe = MachineProbe.model_validate({"bf16": True, **row["estimate"]["probe"]})
        predicted, peer = predict(row, probe), row.get("peer")
        layers, down = predicted.kept_matmul_layers, predicted.kept_down_projections
        kept = (f", keeps {layers}" + (f" + {down} down" if down else "")) if layers or down else ""
        lines.append(
            f"| {Path(row['model']).name} | {row['method']} | {row['batch']} x {row['seq']} | "
            f"{'yes' if row['gradient_checkpointing'] else 'no'}{kept} | "
            f"{(row.get('load') or {}).get('allocator', 'system')} | {gib(row['peak_rss_bytes'])} GiB | "
            f"{gib(predicted.peak_bytes)} GiB | {predicted.peak_bytes / row['peak_rss_bytes'] - 1:+.1%} | "
            f"{row['tokens_per_second']} | {predicted.tokens_per_second:.2f} | "
            + (f"{gib(peer['peak_rss_bytes'])} GiB, {peer['tokens_per_second']} |" if peer else "— |")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("load", "train", "peer"):
        command = commands.add_parser(name)
        command.add_argument("model", help="a model folder (see write_random_checkpoint.py)")
        command.add_argument("--method", choices=("lora", "qlora", "full"), default="qlora")
        if name == "load":
            command.add_argument("--loader", choices=("lean", "transformers"), default="lean")
        else:
            command.add_argument("--steps", type=int, default=4)
            command.add_argument("--seq", type=int, default=256)
            command.add_argument("--batch", type=int, default=1)
            command.add_argument("--no-checkpointing", action="store_true")
            command.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
        if name == "train":
            command.add_argument("--peer", action="store_true", help="also run plain transformers + peft (see above)")
    commands.add_parser("probe")
    commands.add_parser("table", help="a markdown table of saved train results").add_argument("results", nargs="+")
    child = commands.add_parser("child")
    child.add_argument("--out", required=True)
    child.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.command == "child":
        inner = parser.parse_args(args.rest)
        handlers = {"load": child_load, "train": child_train, "peer": child_peer, "probe": child_probe}
        Path(args.out).write_text(json.dumps(handlers[inner.command](inner)))
        return
    if args.command == "table":
        print(table(args.results))
        return
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--peer"]
    result = run_child(forwarded)
    if args.command == "train":
        result = with_estimate(result)
        if args.peer:
            peer = run_child(["peer", *forwarded[1:]])
            result["peer"] = peer
            result["tokens_per_second_ratio"] = round(result["tokens_per_second"] / peer["tokens_per_second"], 3)
            result["peak_rss_ratio"] = round(result["peak_rss_bytes"] / peer["peak_rss_bytes"], 3)
    result["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
