"""``tiny-phi3``: a small random-init Phi-3 with a real Phi-3 chat format, built offline for tests and demos.

The model is the stock ``Phi3ForCausalLM`` (fused ``qkv_proj`` / ``gate_up_proj``) at toy size; the tokenizer is a
byte-level BPE trained on a bundled English corpus plus Phi-3's special tokens and chat template. Both are built
deterministically, so every machine gets the same bytes. torch, transformers and tokenizers are imported only when
the model is built: the SDK imports this module just to locate the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TINY_NAME = "tiny-phi3"

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
"""The chat template of microsoft/Phi-3-mini-4k-instruct, verbatim (it has no ``{% generation %}`` tags)."""

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "original_max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    # Larger than transformers' 0.02: behind the final RMSNorm the logit margin is bounded by |lm_head row| * |h|,
    # and at 0.02 a 128-wide head caps it near 2.6 nats, so adapters alone could never make a confident prediction.
    "initializer_range": 0.1,
}
"""``Phi3Config`` keyword arguments of tiny-phi3 (``vocab_size`` and the special-token ids come from the tokenizer)."""

_SEED = 0
_BPE_VOCAB_SIZE = 2048  # a target: merges seen fewer than twice in the corpus are not learnt, so the BPE stops early
_BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Phi-3
# Phi-3's added tokens, in Phi-3's order (its ids 32000-32010).
PHI3_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)
_CORPUS = Path(__file__).resolve().parent.parent / "assets" / "tiny_corpus.txt"
_TOKENIZER_CONFIG: dict[str, Any] = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<unk>",
    "add_bos_token": False,
    "add_eos_token": False,
    "chat_template": PHI3_CHAT_TEMPLATE,
    "model_max_length": TINY_CONFIG["max_position_embeddings"],
    "padding_side": "left",
    "clean_up_tokenization_spaces": False,
}


def ensure_tiny_phi3(cache_dir: Path) -> Path:
    """Return ``cache_dir / "tiny-phi3"``, a transformers model folder, building it on first use.

    The build is deterministic (identical weights and tokenizer on every machine), atomic (built in a temporary
    folder beside the target, then renamed; a killed build's leftovers go at the next build) and safe when several
    processes ask at once (they wait on a lock file, and only the first builds). ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load the folder fully offline.
    """
    import fcntl

    target = Path(cache_dir) / TINY_NAME
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{TINY_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            for stale in target.parent.glob(f".{TINY_NAME}-*"):  # left by a build that was killed
                shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=target.parent))
            try:
                _build(staging)
                for path in (staging, *staging.iterdir()):
                    path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp and safetensors make them private
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return target


def _build(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    tokenizer = _train_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")

    def token_id(token: str) -> int:
        found = tokenizer.token_to_id(token)
        assert found is not None, token
        return found

    eos = token_id("<|endoftext|>")
    config = Phi3Config(
        **TINY_CONFIG,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        bos_token_id=token_id("<s>"),
        eos_token_id=eos,
        pad_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = Phi3ForCausalLM(config)
    # A generation config of its own (not derived from the model config), so generate() stops at <|end|> too.
    model.generation_config = GenerationConfig.from_dict(
        {"bos_token_id": config.bos_token_id, "eos_token_id": [eos, token_id("<|end|>")], "pad_token_id": eos}
    )
    model.save_pretrained(folder)


def _train_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on the bundled corpus, plus Phi-3's special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(_BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(_CORPUS)], trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI3_ADDED_TOKENS])
    return tokenizer
