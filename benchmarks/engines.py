"""Tokens/s of the two local chat engines, PyTorch and ONNX Runtime GenAI, on the same model and prompt in one run.

Both engines serve the model through a deployment (``engine="torch"`` and ``engine="onnx"``) and generate greedily;
runs alternate between the engines so that load drifting on a shared machine hits both alike. Prints JSON with the
median tokens/s of each engine and their ratio. Offline by default (tiny-phi3 in a temporary home)::

    python benchmarks/engines.py [--home DIR --model MODEL_ID] [--max-tokens 64] [--repeats 5]
    python benchmarks/engines.py --layers 8 --hidden-size 1024     # a random Phi-3 of that shape, tiny's tokenizer

Needs ``pip install 'phitune[local,onnx]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import phitune


def measure(deployment: phitune.Deployment, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One greedy generation: its tokens, seconds and text."""
    started = time.perf_counter()
    completion = deployment.chat(messages, max_tokens=max_tokens, temperature=0.0)
    seconds = time.perf_counter() - started
    assert completion.usage is not None
    return {"tokens": completion.usage.completion_tokens, "seconds": seconds, "text": completion.text}


def run(home: Path, model: str, prompt: str, max_tokens: int, repeats: int) -> dict[str, Any]:
    client = phitune.Client(home=home)
    suffix = f"{os.getpid()}-{int(time.time())}"
    deployments = {}
    setup = {}
    for engine in ("torch", "onnx"):
        started = time.perf_counter()
        deployments[engine] = client.deployments.create(model=model, name=f"bench-{engine}-{suffix}", engine=engine)
        setup[engine] = time.perf_counter() - started  # the ONNX export happens here on first use
    messages = [{"role": "user", "content": prompt}]
    try:
        warm = {engine: measure(dep, messages, max_tokens) for engine, dep in deployments.items()}  # loads models
        runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in deployments}
        for _ in range(repeats):
            for engine, dep in deployments.items():
                runs[engine].append(measure(dep, messages, max_tokens))
    finally:
        for dep in deployments.values():
            client.deployments.delete(dep.name)
        client.close()
    result: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
    }
    for engine, samples in runs.items():
        rates = [s["tokens"] / s["seconds"] for s in samples]
        result[engine] = {
            "tokens_per_second": round(statistics.median(rates), 1),
            "min": round(min(rates), 1),
            "max": round(max(rates), 1),
            "completion_tokens": samples[0]["tokens"],
            "setup_seconds": round(setup[engine], 2),
            "first_call_seconds": round(warm[engine]["seconds"], 2),
        }
    result["onnx_over_torch"] = round(result["onnx"]["tokens_per_second"] / result["torch"]["tokens_per_second"], 2)
    result["same_text"] = runs["onnx"][0]["text"] == runs["torch"][0]["text"]
    return result


def random_phi3(home: Path, layers: int, hidden_size: int) -> str:
    """A random-weight Phi-3 folder of the given shape with tiny-phi3's tokenizer (matmul-bound, unlike tiny-phi3)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from phitune.tiny import ensure_tiny_phi3

    tiny = ensure_tiny_phi3(home / "models" / "base")
    config = AutoConfig.from_pretrained(tiny)
    heads = hidden_size // 64
    config.update(
        {
            "num_hidden_layers": layers,
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 8 // 3 // 64 * 64,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
        }
    )
    folder = home / "models" / f"phi3-random-{layers}x{hidden_size}"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, folder / name)
    return str(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="a phitune home (default: a temporary one with tiny-phi3)")
    parser.add_argument("--model", default="tiny-phi3", help="a model id of that home (default: tiny-phi3)")
    parser.add_argument("--prompt", default="Tell me about the planets of the solar system.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, help="benchmark a random Phi-3 with this many layers instead")
    parser.add_argument("--hidden-size", type=int, default=1024, help="hidden size of that random Phi-3")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="phitune-bench-") as tmp:
        home = args.home or Path(tmp)
        model = random_phi3(home, args.layers, args.hidden_size) if args.layers else args.model
        result = run(home, model, args.prompt, args.max_tokens, args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
