"""Write a random-weight Phi checkpoint with the exact config of a real one, shard by shard, without a download.

The folder looks like a Hugging Face repository of the model: ``config.json``, bf16 safetensors shards (at most
``--max-shard-gb`` each, 5 GB by default like the hub's), ``model.safetensors.index.json``, a tokenizer and a
generation config. Tensors are drawn one at a time (normal(0, initializer_range), RMSNorm weights 1) and streamed
into their shard, so writing Phi-3-medium (28 GB) needs the memory of its largest tensor (0.37 GB), not the model's.
A tied LM head (Phi-4-mini's) is not written, as the hub's checkpoint does not hold it.

The configurations are those of the hub's ``config.json`` files (microsoft/Phi-3-mini-4k-instruct,
microsoft/Phi-3-medium-4k-instruct, microsoft/Phi-3.5-mini-instruct, microsoft/Phi-4-mini-instruct, LongRoPE
factors included, and microsoft/Phi-3-small-8k-instruct, written with phitune's ``Phi3SmallForCausalLM`` names);
``mid`` is a 60M-parameter Phi-3 of the same vocabulary for quick checks.

The tokenizer: tiny-phi3's byte-level BPE (its vocabulary is ~1.9k, not the real one's, so it cannot be reused as is)
laid out like the model's: ids 0-2 ``<unk> <s> </s>``, the BPE tokens, unused filler tokens up to the first special
token, then the model's special tokens at their real ids — Phi-3's 11 at 32000-32010 (``<|endoftext|>`` 32000,
``<|assistant|>`` 32001, ``<|end|>`` 32007, ``<|user|>`` 32010, ...), Phi-4-mini's ``<|endoftext|>`` at 199999 and
``<|endofprompt|>``, ``<|assistant|>``, ``<|end|>``, ``<|user|>``, ``<|system|>``, ... at 200018-200028 — and the
model's chat template. As in the real models the embedding has 32064 or 200064 rows (the vocabulary padded).

    python benchmarks/write_random_checkpoint.py mini /tmp/phitune-real/mini
    python benchmarks/write_random_checkpoint.py medium /tmp/phitune-real/medium
    python benchmarks/write_random_checkpoint.py phi3.5-mini /tmp/phitune-real/phi3.5-mini
    python benchmarks/write_random_checkpoint.py phi4-mini /tmp/phitune-real/phi4-mini
    python benchmarks/write_random_checkpoint.py small /tmp/phitune-real/small
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
from typing import Any, NamedTuple

import torch

from phitune.tiny import (
    PHI3_ADDED_TOKENS,
    PHI3_CHAT_TEMPLATE,
    PHI4_MINI_ADDED_TOKENS,
    PHI4_MINI_CHAT_TEMPLATE,
    PHI4_MINI_LONG_FACTOR,
    PHI35_CHAT_TEMPLATE,
)

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

PHI35_LONG_FACTOR = (
    *(1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115),
    *(1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863),
    *(4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137),
    *(17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523),
    *(32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156),
    *(50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457),
    *(62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457),
    *(63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688),
    *(64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336),
    *(64.51000213623047, 64.52999877929688, 64.83999633789062),
)
PHI35_SHORT_FACTOR = (
    *(1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842),
    *(1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684),
    *(1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378),
    *(1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788),
    *(1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346),
    *([2.0199997425079346] * 5),
    *([2.0299997329711914] * 9),
    *(2.0799996852874756, 2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533),
    *(2.729999542236328, 2.749999523162842, 2.8399994373321533),
)

PHI35_MINI: dict[str, Any] = {
    **PHI3_MINI_4K,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_scaling": {
        "type": "longrope",
        "long_factor": list(PHI35_LONG_FACTOR),
        "short_factor": list(PHI35_SHORT_FACTOR),
    },
    "sliding_window": 262144,
}
"""microsoft/Phi-3.5-mini-instruct: Phi-3-mini's 3,821,079,552 parameters with LongRoPE to a 128k context."""

PHI4_MINI: dict[str, Any] = {
    **_COMMON,
    "bos_token_id": 199999,
    "eos_token_id": 200020,
    "pad_token_id": 199999,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "partial_rotary_factor": 0.75,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_scaling": {"type": "longrope", "long_factor": list(PHI4_MINI_LONG_FACTOR), "short_factor": [1.0] * 48},
    "sliding_window": 262144,
    "tie_word_embeddings": True,
    "vocab_size": 200064,
    "full_attn_mod": 1,
    "interpolate_factor": 1,
    "lm_head_bias": False,
    "mlp_bias": False,
}
"""microsoft/Phi-4-mini-instruct: 3,836,021,760 parameters (rotary on 96 of each head's 128 dimensions, 8 key/value
heads, tied embeddings, a 200064-row vocabulary)."""

PHI3_SMALL_8K: dict[str, Any] = {
    "architectures": ["Phi3SmallForCausalLM"],
    "attention_dropout_prob": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
        "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
        "AutoModelForSequenceClassification": "modeling_phi3_small.Phi3SmallForSequenceClassification",
        "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer",
    },
    "blocksparse_block_size": 64,
    "blocksparse_homo_head_pattern": False,
    "blocksparse_num_local_blocks": 16,
    "blocksparse_triton_kernel_block_size": 64,
    "blocksparse_vert_stride": 8,
    "bos_token_id": 100257,
    "dense_attention_every_n_layers": 2,
    "embedding_dropout_prob": 0.1,
    "eos_token_id": 100257,
    "ff_dim_multiplier": None,
    "ff_intermediate_size": 14336,
    "ffn_dropout_prob": 0.1,
    "gegelu_limit": 20.0,
    "gegelu_pad_to_256": True,
    "hidden_act": "gegelu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "max_position_embeddings": 8192,
    "model_type": "phi3small",
    "mup_attn_multiplier": 1.0,
    "mup_embedding_multiplier": 10.0,
    "mup_use_scaling": True,
    "mup_width_multiplier": 8.0,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_sequence_to_multiple_of_64": True,
    "reorder_and_upcast_attn": False,
    "rope_embedding_base": 1000000,
    "rope_position_scale": 1.0,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "attention_bias": False,
    "vocab_size": 100352,
}
"""microsoft/Phi-3-small-8k-instruct's config.json: 7,392,272,384 parameters (tied embeddings, 8 key/value heads,
every second layer block-sparse). Its tokenizer here is tiny-phi3-small's rank file padded with unused byte strings to
cl100k_base's 100256 ranks, so the 96 special tokens get their real ids (``<|endoftext|>`` 100257, ``<|end|>``
100266, ...)."""

CONFIGS: dict[str, dict[str, Any]] = {
    "mini": PHI3_MINI_4K,
    "small": PHI3_SMALL_8K,
    "medium": PHI3_MEDIUM_4K,
    "mid": PHI3_MID,
    "phi3.5-mini": PHI35_MINI,
    "phi4-mini": PHI4_MINI,
}


class TokenizerLayout(NamedTuple):
    """Where a model's special tokens sit and how its chat is written."""

    first_special: int
    special: dict[str, int]
    chat_template: str
    tokens: dict[str, str]
    """bos, eos, pad and unk."""
    stop: tuple[str, ...]
    """The generation config's eos tokens."""


PHI3_LAYOUT = TokenizerLayout(
    first_special=32000,
    special={token: 32000 + i for i, token in enumerate(PHI3_ADDED_TOKENS)},
    chat_template=PHI3_CHAT_TEMPLATE,
    tokens={"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
    stop=("<|endoftext|>", "<|end|>"),
)
PHI4_MINI_LAYOUT = TokenizerLayout(
    first_special=199999,
    special={PHI4_MINI_ADDED_TOKENS[0]: 199999} | {t: 200017 + i for i, t in enumerate(PHI4_MINI_ADDED_TOKENS[1:], 1)},
    chat_template=PHI4_MINI_CHAT_TEMPLATE,
    tokens={key: "<|endoftext|>" for key in ("bos_token", "eos_token", "pad_token", "unk_token")},
    stop=("<|end|>", "<|endoftext|>"),
)
LAYOUTS: dict[str, TokenizerLayout] = {
    "mini": PHI3_LAYOUT,
    "medium": PHI3_LAYOUT,
    "mid": PHI3_LAYOUT,
    "phi3.5-mini": PHI3_LAYOUT._replace(chat_template=PHI35_CHAT_TEMPLATE),
    "phi4-mini": PHI4_MINI_LAYOUT,
    "small": PHI3_LAYOUT,  # unused: Phi-3-small's tiktoken files come from write_small_tokenizer
}
_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Phi3ForCausalLM's (or phitune's Phi3SmallForCausalLM's) weights, in module order (built
    on the meta device: no memory); a tied LM head is the embedding's, not a tensor of its own."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from phitune.trainer.phi3_small import Phi3SmallConfig, Phi3SmallForCausalLM

    small = config["model_type"] == "phi3small"
    fields = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "model_type")}
    with torch.device("meta"):
        model = Phi3SmallForCausalLM(Phi3SmallConfig(**fields)) if small else Phi3ForCausalLM(Phi3Config(**config))
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings", small) else set()
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name not in tied}


def write_checkpoint(
    folder: Path,
    config: dict[str, Any],
    layout: TokenizerLayout = PHI3_LAYOUT,
    *,
    max_shard_bytes: int = 5_000_000_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a random bf16 checkpoint of ``config`` with a tokenizer laid out as ``layout`` into ``folder``
    (atomically)."""
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
        if config["model_type"] == "phi3small":
            write_small_tokenizer(staging, config["max_position_embeddings"])
        else:
            write_tokenizer(staging, layout, config["max_position_embeddings"])
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
            elif name.endswith("norm.bias") or name.endswith(".bias"):
                tensor = torch.zeros(shape, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)
            out.write(tensor.view(torch.uint8).numpy().data)
            del tensor


def write_tokenizer(folder: Path, layout: TokenizerLayout, max_length: int) -> None:
    """tiny-phi3's BPE with the model's special tokens at their real ids (reserved tokens between them) and its chat
    template (see the module docstring)."""
    from phitune.tiny import ensure_tiny_phi3

    with tempfile.TemporaryDirectory() as cache:
        tiny = ensure_tiny_phi3(Path(cache))
        spec = json.loads((tiny / "tokenizer.json").read_text())
        tokenizer_config = json.loads((tiny / "tokenizer_config.json").read_text())
    tiny_special = set(PHI3_ADDED_TOKENS)
    vocab: dict[str, int] = {t: i for t, i in spec["model"]["vocab"].items() if t not in tiny_special}
    if len(vocab) > layout.first_special or sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError(f"tiny-phi3's BPE vocabulary is not a dense range of ids below {layout.first_special}")
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), layout.first_special)})  # never produced by a merge
    spec["model"]["vocab"] = vocab
    base_added = [t for t in spec["added_tokens"] if t["content"] not in tiny_special]
    template = next(t for t in spec["added_tokens"] if t["content"] in tiny_special)
    by_id = {token_id: token for token, token_id in layout.special.items()}
    reserved = range(layout.first_special, max(by_id) + 1)  # added tokens from the first special on, as the real ones
    spec["added_tokens"] = base_added + [
        {**template, "id": i, "content": by_id.get(i, f"<|reserved_{i}|>")} for i in reserved
    ]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    tokenizer_config.update(layout.tokens, chat_template=layout.chat_template, model_max_length=max_length)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    ids = {**layout.special, "<s>": 1}
    generation = {
        "bos_token_id": ids[layout.tokens["bos_token"]],
        "eos_token_id": [ids[token] for token in layout.stop],
        "pad_token_id": ids[layout.tokens["pad_token"]],
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_small_tokenizer(folder: Path, max_length: int) -> None:
    """tiny-phi3-small's tokenizer files with its rank file padded to cl100k_base's 100256 ranks by byte strings that no
    merge produces (``0xff 0xfe`` then a number: no rank holds that pair), and a generation config stopping at
    ``<|endoftext|>`` and ``<|end|>``."""
    from phitune.tiny import ensure_tiny
    from phitune.trainer.phi3_small.tokenizer import SPECIAL_TOKENS, VOCAB_FILE, read_ranks, write_ranks

    with tempfile.TemporaryDirectory() as cache:
        tiny = ensure_tiny(Path(cache), "tiny-phi3-small")
        ranks = read_ranks(tiny / VOCAB_FILE)
        tokenizer_config = json.loads((tiny / "tokenizer_config.json").read_text())
    ranks.update({b"\xff\xfe" + str(i).encode(): i for i in range(len(ranks), 100256)})
    write_ranks(ranks, folder / VOCAB_FILE)
    tokenizer_config["model_max_length"] = max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    ids = {token: 100256 + offset for offset, token in enumerate(SPECIAL_TOKENS)}
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|endoftext|>"], ids["<|end|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
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
        args.folder,
        CONFIGS[args.config],
        LAYOUTS[args.config],
        max_shard_bytes=int(args.max_shard_gb * 1e9),
        seed=args.seed,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
