"""GPU smoke test of the trainer's CUDA paths: LoRA and bitsandbytes QLoRA on one GPU, DeepSpeed ZeRO-2 on every GPU.

Each run is a real job of the local backend (worker, trainer subprocess, torchrun for DeepSpeed) in a temporary home,
on tiny-phi3 and on a random-weight model of Phi-3's shape (vocabulary 32064, fused ``qkv_proj`` / ``gate_up_proj``)
built offline with tiny-phi3's tokenizer. Prints one JSON document: per run its status, tokens/s (median of the steps
after the first two), peak GPU memory, first and last loss, and for QLoRA the measured 4-bit base footprint::

    python benchmarks/gpu_smoke.py                          # tiny-phi3, then an 8-layer 2048-wide Phi-3 shape
    python benchmarks/gpu_smoke.py --sizes tiny --steps 4   # the quick check
    python benchmarks/gpu_smoke.py --layers 32 --hidden-size 3072 --intermediate-size 8192   # Phi-3-mini's shape

Needs a CUDA build of torch and ``pip install 'phitune[local,qlora,distributed]'``; nothing is downloaded.
Exits 1 if a run that could run did not succeed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import phitune
from phitune.errors import PhituneError

CORPUS = Path(phitune.__file__).resolve().parent / "assets" / "tiny_corpus.txt"


def phi3_shaped(home: Path, layers: int, hidden_size: int, intermediate_size: int) -> Path:
    """A random-weight Phi-3 folder of the given shape (bf16 on disk) with tiny-phi3's tokenizer."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from phitune.tiny import ensure_tiny_phi3

    tiny = ensure_tiny_phi3(home / "models" / "base")
    folder = home / "models" / f"phi3-{layers}x{hidden_size}"
    config = Phi3Config.from_pretrained(tiny)
    config.update(
        {
            "vocab_size": 32064,  # Phi-3's (padded) vocabulary; tiny's token ids all fall inside it
            "num_hidden_layers": layers,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_attention_heads": hidden_size // 96 if hidden_size % 96 == 0 else hidden_size // 64,
            "num_key_value_heads": hidden_size // 96 if hidden_size % 96 == 0 else hidden_size // 64,
            "initializer_range": 0.02,
        }
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, folder / name)
    del model
    torch.cuda.empty_cache()
    return folder


def chat_data(path: Path, examples: int, words: int) -> Path:
    """Chat examples whose answers are ``words``-word passages of the bundled corpus."""
    text = CORPUS.read_text(encoding="utf-8").split()
    with open(path, "w", encoding="utf-8") as out:
        for i in range(examples):
            start = (i * 97) % max(1, len(text) - words)
            answer = " ".join(text[start : start + words])
            messages = [
                {"role": "user", "content": f"Continue the story from passage {i}."},
                {"role": "assistant", "content": answer},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_job(client: phitune.Client, model: str, data: Path, name: str, **options: Any) -> dict[str, Any]:
    """One job to completion: its status, speed, memory and losses."""
    started = time.perf_counter()
    try:
        job = client.finetune.create(model=model, training_file=data, **options)
    except PhituneError as exc:  # an option this machine cannot honour (e.g. deepspeed not installed)
        return {"run": name, "status": "skipped", "reason": str(exc)}
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    result: dict[str, Any] = {"run": name, "status": job.status, "seconds": round(time.perf_counter() - started, 1)}
    events = client.finetune.events(job.id)
    steps = [e.data for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
    if job.error is not None:
        result["error"] = job.error.message[-2000:]
    if steps:
        speeds = [s["tokens_per_second"] for s in steps[2:]] or [s["tokens_per_second"] for s in steps]
        result |= {
            "steps": len(steps),
            "tokens_per_second": round(statistics.median(speeds), 1),
            "peak_memory_mb": round(max(s["peak_memory_mb"] for s in steps), 1),
            "first_loss": round(steps[0]["train_loss"], 4),
            "last_loss": round(steps[-1]["train_loss"], 4),
        }
    for event in events:
        if event.data and "quantized_base" in event.data:
            result["quantized_base"] = event.data["quantized_base"]
            result["quantized_base_message"] = event.message
        elif event.data and "trainable_parameters" in event.data:
            result["trainable_parameters"] = event.data["trainable_parameters"]
            result["total_parameters"] = event.data["total_parameters"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,phi3", help="comma-separated: tiny, phi3 (the shape below)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--intermediate-size", type=int, default=5632)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--words", type=int, default=180, help="words per answer (about 1.3 tokens each)")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed ZeRO-2 run")
    args = parser.parse_args(argv)

    import torch

    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "runs": []}
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device: this smoke test exercises the GPU paths only"
        print(json.dumps(report, indent=2))
        return 1
    gpus = torch.cuda.device_count()
    report["gpus"] = [torch.cuda.get_device_name(i) for i in range(gpus)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PHITUNE_WORKER_IDLE_TIMEOUT", "5")

    # the home goes once its worker has exited (it writes heartbeats until idle for PHITUNE_WORKER_IDLE_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="phitune-gpu-smoke-", ignore_cleanup_errors=True) as tmp:
        home = Path(tmp) / "home"
        client = phitune.Client(home=home)
        data = chat_data(Path(tmp) / "train.jsonl", examples=8 * args.batch_size, words=args.words)
        hp = {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": 2e-4, "max_seq_length": 512}
        lora = phitune.LoRA(r=16, alpha=32, dropout=0.0)
        for size in args.sizes.split(","):
            if size == "tiny":
                model = "tiny-phi3"
            else:
                model = str(phi3_shaped(home, args.layers, args.hidden_size, args.intermediate_size))
            runs = [
                (f"{size}/lora", {"method": lora}),
                (f"{size}/qlora-nf4", {"method": phitune.QLoRA(r=16, alpha=32, dropout=0.0)}),
            ]
            if not args.no_deepspeed:
                zero2 = {"strategy": "deepspeed", "zero_stage": 2, "nproc": gpus}
                runs.append((f"{size}/lora-deepspeed-zero2-x{gpus}", {"method": lora, "distributed": zero2}))
            for name, options in runs:
                batch = max(args.batch_size, gpus)
                result = run_job(client, model, data, name, hyperparameters={**hp, "batch_size": batch}, **options)
                report["runs"].append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
        client.close()
        time.sleep(float(os.environ["PHITUNE_WORKER_IDLE_TIMEOUT"]) + 2)
    print(json.dumps(report, indent=2))
    return 1 if any(r["status"] not in ("succeeded", "skipped") for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
