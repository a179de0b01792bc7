"""Write a random-weight Phi-3 checkpoint with the exact shapes of a real one, shard by shard, without a download.

The folder looks like a Hugging Face Phi-3 repository: ``config.json``, bf16 safetensors shards (at most
``--max-shard-gb`` each, 5 GB by default like the hub's), ``model.safetensors.index.json``, a tokenizer and a
generation config. Tensors are drawn one at a time (normal(0, initializer_range), RMSNorm weights 1) and streamed
into their shard, so writing Phi-3-medium (28 GB) needs the memory of its largest tensor (0.37 GB), not the model's.

The configurations are those of the hub's ``config.json`` files (microsoft/Phi-3-mini-4k-instruct,
microsoft/Phi-3-medium-4k-instruct); ``mid`` is a 60M-parameter Phi-3 of the same vocabulary for quick checks.

The tokenizer: tiny-phi3's byte-level BPE (its vocabulary is ~1.9k, not Phi-3's, so it cannot be reused as is) laid
out like Phi-3's: ids 0-2 ``<unk> <s> </s>``, the BPE tokens, unused filler tokens up to id 31999, then Phi-3's 11
special tokens at their real ids 32000-32010 (``<|endoftext|>`` 32000, ``<|assistant|>`` 32001, ``<|end|>`` 32007,
``<|user|>`` 32010, ...). As in Phi-3 the embedding has 32064 rows (vocabulary padded to a multiple of 64).

    python benchmarks/write_random_checkpoint.py mini /tmp/phitune-real/mini
    python benchmarks/write_random_checkpoint.py medium /tmp/phitune-real/medium
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from phitune.trainer.tiny import PHI3_ADDED_TOKENS

_COMMON: dict[str, Any] = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 32064,
    "torch_dtype": "bfloat16",
}

PHI3_MINI_4K: dict[str, Any] = {
    **_COMMON,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
"""microsoft/Phi-3-mini-4k-instruct: 3,821,079,552 parameters."""

PHI3_MEDIUM_4K: dict[str, Any] = {
    **_COMMON,
    "hidden_size": 5120,
    "intermediate_size": 17920,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 10,
}
"""microsoft/Phi-3-medium-4k-instruct: 13,960,238,080 parameters."""

PHI3_MID: dict[str, Any] = {
    **_COMMON,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
"""Not a released model: a 60M-parameter Phi-3 with the real vocabulary, for checks between tiny and mini."""

CONFIGS: dict[str, dict[str, Any]] = {"mini": PHI3_MINI_4K, "medium": PHI3_MEDIUM_4K, "mid": PHI3_MID}

PHI3_SPECIAL_TOKENS = PHI3_ADDED_TOKENS
"""Phi-3's added tokens in id order, starting at 32000."""

_BASE_VOCAB = 32000
_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Phi3ForCausalLM's weights, in module order (built on the meta device: no memory)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config(**config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def write_checkpoint(
    folder: Path, config: dict[str, Any], *, max_shard_bytes: int = 5_000_000_000, seed: int = 0
) -> dict[str, Any]:
    """Write a random bf16 checkpoint of ``config`` with a Phi-3-layout tokenizer into ``folder`` (atomically)."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    started = time.perf_counter()
    try:
        shapes = tensor_shapes(config)
        shards = _plan_shards(shapes, max_shard_bytes)
        weight_map: dict[str, str] = {}
        generator = torch.Generator().manual_seed(seed)
        for index, names in enumerate(shards, start=1):
            filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(staging / filename, {n: shapes[n] for n in names}, config["initializer_range"], generator)
            weight_map.update(dict.fromkeys(names, filename))
        total = sum(2 * math.prod(shape) for shape in shapes.values())
        index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps({**config, "transformers_version": "5.24.0"}, indent=2))
        write_tokenizer(staging)
        for path in (staging, *staging.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp makes the folder private
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "folder": str(folder),
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "bytes": total,
        "shards": len(shards),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _plan_shards(shapes: dict[str, tuple[int, ...]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], std: float, generator: torch.Generator) -> None:
    """Stream one safetensors file: the header (computable from the shapes), then each tensor as it is drawn."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        end = offset + 2 * math.prod(shape)
        header[name] = {"dtype": _DTYPES[torch.bfloat16], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)
            out.write(tensor.view(torch.uint8).numpy().data)
            del tensor


def write_tokenizer(folder: Path) -> None:
    """tiny-phi3's BPE with Phi-3's id layout: special tokens at 32000-32010 (see the module docstring)."""
    from phitune.trainer.tiny import ensure_tiny_phi3

    with tempfile.TemporaryDirectory() as cache:
        tiny = ensure_tiny_phi3(Path(cache))
        spec = json.loads((tiny / "tokenizer.json").read_text())
        tokenizer_config = json.loads((tiny / "tokenizer_config.json").read_text())
    special = set(PHI3_SPECIAL_TOKENS)
    vocab: dict[str, int] = {t: i for t, i in spec["model"]["vocab"].items() if t not in special}
    if len(vocab) > _BASE_VOCAB or sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("tiny-phi3's BPE vocabulary is not a dense range of ids below 32000")
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), _BASE_VOCAB)})  # never produced by a merge
    spec["model"]["vocab"] = vocab
    base_added = [t for t in spec["added_tokens"] if t["content"] not in special]
    template = next(t for t in spec["added_tokens"] if t["content"] in special)
    spec["added_tokens"] = base_added + [
        {**template, "id": _BASE_VOCAB + i, "content": token} for i, token in enumerate(PHI3_SPECIAL_TOKENS)
    ]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    tokenizer_config["model_max_length"] = 4096
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": [32000, 32007], "pad_token_id": 32000}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.folder.parent.mkdir(parents=True, exist_ok=True)
    result = write_checkpoint(
        args.folder, CONFIGS[args.config], max_shard_bytes=int(args.max_shard_gb * 1e9), seed=args.seed
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
