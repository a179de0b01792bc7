"""Real Phi-3 sizes on one machine: load peaks, training tokens/s and peak RSS, and the estimator against them.

Every measurement runs in a fresh child process; its peak RSS is the kernel's own count for that child
(``os.wait4``'s ``ru_maxrss``), so nothing of the parent or of earlier runs is in it. Training goes through phitune's
trainer (``phitune.trainer.loop.train`` with a recording Control) on chat examples cut to ``--seq`` tokens.

``--loader lean`` runs the trainer as it is with the proposed wiring applied in the child: the base is loaded by
:func:`phitune.trainer.loading.load_for_training` (bf16 base for LoRA, streamed 4-bit quantisation for QLoRA) and
QLoRA's base preparation freezes it without peft's fp32 upcast of the embeddings, norms and LM head, and subnormal
floats are flushed to zero (``torch.set_flush_denormal``: with them a mid-sized QLoRA step ran 5-35x slower here).
``--loader current`` runs the trainer untouched (fp32 base).

Steps: one warm-up step (page faults, first allocations) is excluded from tokens/s; ``tokens_per_second`` counts every
token of the batch (``batch x seq``), ``trainable_tokens_per_second`` only those with loss (the loop's metric).

    python benchmarks/write_random_checkpoint.py mini /tmp/phitune-real/mini
    python benchmarks/real_sizes.py load  /tmp/phitune-real/mini --method qlora --loader lean
    python benchmarks/real_sizes.py train /tmp/phitune-real/mini --method qlora --steps 4 --seq 256
    python benchmarks/real_sizes.py probe
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

CORPUS = Path(__file__).resolve().parents[1] / "src" / "phitune" / "assets" / "tiny_corpus.txt"


# ---------------------------------------------------------------------------------------------------- parent side
def run_child(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run this script's ``child`` command; return its JSON result with ``peak_rss_bytes`` (the child's ru_maxrss)
    and ``wall_seconds``."""
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "child", "--out", out.name, *args]
        process = subprocess.Popen(command, stdout=sys.stderr)  # the child's chatter stays off our JSON
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
class RecordingControl:
    """A trainer Control that keeps every message and metrics event."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.messages.append({"text": text, "data": data})

    def metrics(self, data: dict[str, Any]) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.steps.append({**data, "major_faults": usage.ru_majflt, "cpu_seconds": usage.ru_utime + usage.ru_stime})

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None:
        pass

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        pass

    def should_stop(self) -> None:
        return None


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


def apply_lean_wiring(report_sink: list[Any]) -> None:
    """The proposed trainer wiring, applied in this process only (see the module docstring)."""
    import peft
    import torch

    from phitune.trainer import loop
    from phitune.trainer.loading import load_for_training

    torch.set_flush_denormal(True)  # subnormal floats are 10-100x slower on x86; LoRA's small updates make them

    def load_model(path: str, method: Any, *, device: str) -> Any:
        model, report = load_for_training(path, method, device=device)
        report_sink.append(report)
        return model

    def freeze_base(model: Any, use_gradient_checkpointing: bool = True, **_: Any) -> Any:
        return model.requires_grad_(False)

    loop.load_model = load_model  # type: ignore[assignment]
    peft.prepare_model_for_kbit_training = freeze_base


def child_train(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from phitune.trainer import loop
    from phitune.types import Hyperparameters, JobSpec

    reports: list[Any] = []
    if args.loader == "lean":
        apply_lean_wiring(reports)
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
    control = RecordingControl()
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
        "loader": args.loader,
        "batch": args.batch,
        "seq": args.seq,
        "gradient_checkpointing": not args.no_checkpointing,
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
        "load": reports[0].model_dump() if reports else None,
        "train_seconds": round(seconds, 1),
        "messages": [m["text"] for m in control.messages],
    }


def child_load(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from phitune.trainer.loading import LoadReport, PeakRSS, load_for_training, rss_bytes
    from phitune.types import Full, LoRA, QLoRA

    method = {"lora": LoRA(), "qlora": QLoRA(), "full": Full()}[args.method]
    if args.loader == "lean":
        _, report = load_for_training(args.model, method, device="cpu")
        return {"kind": "load", **report.model_dump()}
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    if args.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": "cpu"}
    elif args.method == "full":
        kwargs["dtype"] = torch.float32
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
    from phitune.estimate import probe_machine

    return {"kind": "probe", **probe_machine(None, refresh=True, quantized=True).model_dump(mode="json")}


# ------------------------------------------------------------------------------------------------------------ main
def with_estimate(result: dict[str, Any]) -> dict[str, Any]:
    """Add the estimator's prediction for a training run, and its errors against the measured peak and speed. The
    machine is probed afresh right after the run (not from the cache), so both see the same load."""
    from phitune.estimate import estimate, probe_machine
    from phitune.types import Hyperparameters, JobSpec

    hp = Hyperparameters(
        batch_size=result["batch"],
        max_seq_length=result["seq"],
        gradient_checkpointing=result["gradient_checkpointing"],
    )
    spec = JobSpec(model=result["model"], training_file="-", method=result["method"], hyperparameters=hp)
    probe = probe_machine(None, quantized=result["method"] == "qlora")
    predicted = estimate(spec, tokens_per_example=result["seq"], probe=probe)
    result["estimate"] = {
        "peak_bytes": predicted.peak_bytes,
        "tokens_per_second": round(predicted.tokens_per_second, 2),
        "memory": predicted.memory.model_dump(),
        "probe": probe.model_dump(),
        "peak_error": round(predicted.peak_bytes / result["peak_rss_bytes"] - 1, 3),
        "speed_error": round(predicted.tokens_per_second / result["tokens_per_second"] - 1, 3),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("load", "train"):
        command = commands.add_parser(name)
        command.add_argument("model", help="a model folder (see write_random_checkpoint.py)")
        command.add_argument("--method", choices=("lora", "qlora", "full"), default="qlora")
        other = "current" if name == "train" else "transformers"
        command.add_argument("--loader", choices=("lean", other), default="lean", help=f"lean, or {other} (see above)")
        if name == "train":
            command.add_argument("--steps", type=int, default=4)
            command.add_argument("--seq", type=int, default=256)
            command.add_argument("--batch", type=int, default=1)
            command.add_argument("--no-checkpointing", action="store_true")
    commands.add_parser("probe")
    child = commands.add_parser("child")
    child.add_argument("--out", required=True)
    child.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.command == "child":
        inner = parser.parse_args(args.rest)
        handlers = {"load": child_load, "train": child_train, "probe": child_probe}
        Path(args.out).write_text(json.dumps(handlers[inner.command](inner)))
        return
    forwarded = argv if argv is not None else sys.argv[1:]
    result = run_child(forwarded)
    if args.command == "train":
        result = with_estimate(result)
    result["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
