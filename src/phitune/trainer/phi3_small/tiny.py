"""tiny-phi3-small: Phi-3-small's architecture, tokenizer format and chat template at toy size, built offline.

The tokenizer is Phi-3-small's (:mod:`.tokenizer`) over a small rank file: byte-level BPE merges learnt from the
bundled English corpus, written as ``cl100k_base.tiktoken`` is (all 256 bytes, then the merges in the order they were
learnt), so the 96 special ids follow the ranks exactly as in the real vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Phi3SmallConfig
from .tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, VOCAB_FILE, _as_bytes, write_ranks

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "ff_intermediate_size": 256,
    "max_position_embeddings": 2048,
    "blocksparse_block_size": 16,
    "blocksparse_num_local_blocks": 2,
    "blocksparse_vert_stride": 4,
    "blocksparse_triton_kernel_block_size": 16,
    # no dropout, so that tests and resumed runs are deterministic (the real model trains with 0.1 on both)
    "embedding_dropout_prob": 0.0,
    "ffn_dropout_prob": 0.0,
    "initializer_range": 0.1,  # as tiny-phi3's: at 0.02 a 128-wide head could barely make a confident prediction
}
"""``Phi3SmallConfig`` keyword arguments of tiny-phi3-small: two dense and two block-sparse layers whose blocks of 16
tokens (2 local, vertical stride 4) make chat examples of a few dozen tokens cross several blocks; grouped-query
attention; Phi-3-small's own muP multipliers."""


def train_ranks(corpus: Path, vocab_size: int) -> dict[bytes, int]:
    """Byte-pair ranks learnt from ``corpus``: the 256 bytes, then up to ``vocab_size - 256`` merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train([str(corpus)], trainer)
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        ranks.setdefault(_as_bytes(token), len(ranks))
    return ranks


def build(folder: Path, *, corpus: Path, vocab_size: int, seed: int, max_length: int) -> None:
    """Write tiny-phi3-small into ``folder``: config, weights, generation config, rank file, tokenizer config."""
    import torch
    import transformers

    from .modeling import Phi3SmallForCausalLM

    ranks = train_ranks(corpus, vocab_size)
    write_ranks(ranks, folder / VOCAB_FILE)
    special = {token: len(ranks) + offset for offset, token in enumerate(SPECIAL_TOKENS)}
    tokenizer_config = {
        "tokenizer_class": "Phi3SmallTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_phi3_small.Phi3SmallTokenizer", None]},
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    endoftext = special["<|endoftext|>"]
    config = Phi3SmallConfig(
        **TINY_CONFIG,
        vocab_size=len(ranks) + len(SPECIAL_TOKENS),
        bos_token_id=endoftext,
        eos_token_id=endoftext,
        pad_token_id=endoftext,
        architectures=["Phi3SmallForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
            "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
            "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer",
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3SmallForCausalLM(config)
    model.generation_config = transformers.GenerationConfig.from_dict(
        {"bos_token_id": endoftext, "eos_token_id": [endoftext, special["<|end|>"]], "pad_token_id": endoftext}
    )
    model.save_pretrained(folder)
