"""Tiny random-init models of each Phi architecture, with their real chat formats, built offline for tests and demos.

Each is the stock transformers class at toy size: ``tiny-phi3`` (``Phi3ForCausalLM``, fused ``qkv_proj`` /
``gate_up_proj``), ``tiny-phi4-mini`` (the same class with Phi-4-mini's rotary on three quarters of each head, LongRoPE,
tied input and output embeddings and grouped-query attention), ``tiny-phi4`` (Phi-4's ``<|im_start|>`` chat format and
grouped-query attention) and ``tiny-phi3.5-moe`` (``PhimoeForCausalLM``: experts, a router, LayerNorm, biases,
LongRoPE); ``tiny-phi3-small`` is phitune's own ``Phi3SmallForCausalLM`` (dense and block-sparse layers, GeGELU,
LayerNorm, muP) with Phi-3-small's tiktoken tokenizer (:mod:`.phi3_small.tiny`). The tokenizer is a byte-level BPE
trained on a bundled English corpus plus the model's special tokens and its real chat template. Everything is built
deterministically, so every machine gets the same bytes. torch, transformers and tokenizers are imported only when a
model is built: the SDK imports this module just to locate the folders.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
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

PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
"""The chat template of microsoft/Phi-3.5-mini-instruct and microsoft/Phi-3.5-MoE-instruct, verbatim."""

PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
"""The chat template of microsoft/Phi-4-mini-instruct, verbatim: no newline after the role tag."""

PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
"""The chat template of microsoft/phi-4, verbatim: ChatML-like turns closed by ``<|im_end|>``."""

# Phi-3's added tokens, in Phi-3's order (its ids 32000-32010); Phi-3.5-mini and Phi-3.5-MoE share them.
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
PHI4_MINI_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|endofprompt|>",
    "<|assistant|>",
    "<|end|>",
    "<|user|>",
    "<|system|>",
    "<|tool|>",
    "<|/tool|>",
    "<|tool_call|>",
    "<|/tool_call|>",
    "<|tool_response|>",
    "<|tag|>",
)
"""Phi-4-mini's special tokens in id order (199999, then 200018-200028)."""
PHI4_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_sep|>",
    "<|endofprompt|>",
    "<|dummy_85|>",
)
"""Phi-4's special tokens in id order (100257-100260, 100264-100266, 100276, and its pad token 100349)."""

_TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    # Larger than transformers' 0.02: behind the final norm the logit margin is bounded by |lm_head row| * |h|,
    # and at 0.02 a 128-wide head caps it near 2.6 nats, so adapters alone could never make a confident prediction.
    "initializer_range": 0.1,
}

TINY_CONFIG: dict[str, Any] = {
    **_TINY_SHAPE,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "original_max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
"""``Phi3Config`` keyword arguments of tiny-phi3 (``vocab_size`` and the special-token ids come from the tokenizer)."""

PHI4_MINI_LONG_FACTOR = (
    *(1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649),
    *(2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533),
    *(5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651),
    *(14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03),
    *(32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77),
)
"""microsoft/Phi-4-mini-instruct's LongRoPE ``long_factor`` (48 values: its 96 rotary dimensions; the short factors
are all 1.0)."""


@dataclass(frozen=True)
class TinyTokens:
    """A tokenizer's special tokens, as the real model has them."""

    added: tuple[str, ...]
    """Added after the BPE, in the real model's id order."""
    bos: str
    eos: str
    pad: str
    unk: str
    stop: tuple[str, ...]
    """The generation config's ``eos_token_id`` tokens: where generation ends."""
    base: tuple[str, ...] = ()
    """Special tokens trained into the BPE first (ids 0, 1, ...)."""


PHI3_TOKENS = TinyTokens(
    added=PHI3_ADDED_TOKENS,
    bos="<s>",
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    unk="<unk>",
    stop=("<|endoftext|>", "<|end|>"),
    base=("<unk>", "<s>", "</s>"),  # ids 0, 1, 2 of Phi-3's SentencePiece vocabulary
)
"""Phi-3's, Phi-3.5-mini's and Phi-3.5-MoE's."""


@dataclass(frozen=True)
class TinySpec:
    """How to build one tiny model: its transformers class and config, its tokens and chat template."""

    name: str
    architecture: str
    """The ``transformers`` causal LM class name."""
    config: dict[str, Any]
    """Config keyword arguments, in the hub's ``config.json`` spelling (``vocab_size`` and token ids come later)."""
    tokens: TinyTokens
    chat_template: str


TINY_MODELS: dict[str, TinySpec] = {
    spec.name: spec
    for spec in (
        TinySpec(
            name=TINY_NAME,
            architecture="Phi3ForCausalLM",
            config=TINY_CONFIG,
            tokens=PHI3_TOKENS,
            chat_template=PHI3_CHAT_TEMPLATE,
        ),
        TinySpec(
            name="tiny-phi4-mini",
            architecture="Phi3ForCausalLM",
            config={
                **_TINY_SHAPE,
                # heads of 64: onnxruntime's attention takes rotary halves (here 0.75 * 64 / 2) in multiples of 8
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "partial_rotary_factor": 0.75,
                "tie_word_embeddings": True,
                "max_position_embeddings": 8192,
                "original_max_position_embeddings": 256,
                # 24 rotary frequencies: every other of the real model's 48
                "rope_scaling": {
                    "type": "longrope",
                    "short_factor": [1.0] * 24,
                    "long_factor": list(PHI4_MINI_LONG_FACTOR[::2]),
                },
                "sliding_window": 16384,
            },
            tokens=TinyTokens(
                added=PHI4_MINI_ADDED_TOKENS,
                bos="<|endoftext|>",
                eos="<|endoftext|>",
                pad="<|endoftext|>",
                unk="<|endoftext|>",
                stop=("<|end|>", "<|endoftext|>"),
            ),
            chat_template=PHI4_MINI_CHAT_TEMPLATE,
        ),
        TinySpec(
            name="tiny-phi4",
            architecture="Phi3ForCausalLM",
            config={
                **_TINY_SHAPE,
                "num_key_value_heads": 1,
                "max_position_embeddings": 2048,
                "original_max_position_embeddings": 2048,
                "rope_theta": 250000.0,
                "tie_word_embeddings": False,
            },
            tokens=TinyTokens(
                added=PHI4_ADDED_TOKENS,
                bos="<|endoftext|>",
                eos="<|im_end|>",
                pad="<|dummy_85|>",
                unk="<|endoftext|>",
                stop=("<|im_end|>",),
            ),
            chat_template=PHI4_CHAT_TEMPLATE,
        ),
        TinySpec(
            name="tiny-phi3-small",
            architecture="Phi3SmallForCausalLM",
            config={},  # phi3_small.tiny.TINY_CONFIG: imports torch, which this module must not
            tokens=TinyTokens(added=(), bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", unk="", stop=()),
            chat_template="",  # phi3_small.CHAT_TEMPLATE, written by its builder
        ),
        TinySpec(
            name="tiny-phi3.5-moe",
            architecture="PhimoeForCausalLM",
            config={
                **_TINY_SHAPE,
                "intermediate_size": 96,
                "num_key_value_heads": 2,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "attention_bias": True,
                "lm_head_bias": True,
                "input_jitter_noise": 0.01,
                "router_jitter_noise": 0.01,
                "output_router_logits": False,
                "router_aux_loss_coef": 0.0,
                "rope_theta": 10000.0,
                "max_position_embeddings": 8192,
                "original_max_position_embeddings": 256,
                "rope_scaling": {
                    "type": "longrope",
                    "short_factor": [1.0] * 16,
                    "long_factor": [1.0 + i / 4 for i in range(16)],
                    "short_mscale": 1.1,
                    "long_mscale": 1.243163121016122,
                    "original_max_position_embeddings": 256,
                },
                "sliding_window": 8192,
                "tie_word_embeddings": False,
            },
            tokens=PHI3_TOKENS,
            chat_template=PHI35_CHAT_TEMPLATE,
        ),
    )
}
"""The built-in tiny models by name. tiny-phi3.5-moe keeps Phi-3.5-MoE's own routing settings (jitter 0.01, no router
auxiliary loss: ``output_router_logits`` false, coefficient 0)."""

_SEED = 0
_BPE_VOCAB_SIZE = 2048  # a target: merges seen fewer than twice in the corpus are not learnt, so the BPE stops early
_CORPUS = Path(__file__).resolve().parent / "assets" / "tiny_corpus.txt"
_MAX_LENGTH = 2048  # the tokenizers' model_max_length


def ensure_tiny_phi3(cache_dir: Path) -> Path:
    """Return ``cache_dir / "tiny-phi3"``, building it on first use (:func:`ensure_tiny`)."""
    return ensure_tiny(cache_dir, TINY_NAME)


def ensure_tiny(cache_dir: Path, name: str) -> Path:
    """Return ``cache_dir / name``, a transformers model folder of the tiny model ``name`` (:data:`TINY_MODELS`),
    building it on first use.

    The build is deterministic (identical weights and tokenizer on every machine), atomic (built in a temporary
    folder beside the target, then renamed; a killed build's leftovers go at the next build) and safe when several
    processes ask at once (they wait on a lock file, and only the first builds). ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load the folder fully offline.
    """
    import fcntl

    spec = TINY_MODELS[name]
    target = Path(cache_dir) / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            for stale in target.parent.glob(f".{name}-*"):  # left by a build that was killed
                shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
            try:
                _build(staging, spec)
                for path in (staging, *staging.iterdir()):
                    path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp and safetensors make them private
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return target


def _build(folder: Path, spec: TinySpec) -> None:
    import torch
    import transformers

    if spec.architecture == "Phi3SmallForCausalLM":  # its own tiktoken tokenizer and model class
        from .trainer.phi3_small import tiny

        tiny.build(folder, corpus=_CORPUS, vocab_size=_BPE_VOCAB_SIZE, seed=_SEED, max_length=_MAX_LENGTH)
        return

    tokenizer = _train_tokenizer(spec)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.tokens.bos,
        "eos_token": spec.tokens.eos,
        "pad_token": spec.tokens.pad,
        "unk_token": spec.tokens.unk,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": spec.chat_template,
        "model_max_length": _MAX_LENGTH,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")

    def token_id(token: str) -> int:
        found = tokenizer.token_to_id(token)
        assert found is not None, token
        return found

    model_class = getattr(transformers, spec.architecture)
    config = model_class.config_class(
        **spec.config,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        bos_token_id=token_id(spec.tokens.bos),
        eos_token_id=token_id(spec.tokens.eos),
        pad_token_id=token_id(spec.tokens.pad),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = model_class(config)
    # A generation config of its own (not derived from the model config), so generate() stops at the end of a turn.
    model.generation_config = transformers.GenerationConfig.from_dict(
        {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": [token_id(token) for token in spec.tokens.stop],
            "pad_token_id": config.pad_token_id,
        }
    )
    model.save_pretrained(folder)


def _train_tokenizer(spec: TinySpec) -> Tokenizer:
    """A byte-level BPE trained on the bundled corpus, plus the model's special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(spec.tokens.base),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(_CORPUS)], trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.tokens.added])
    return tokenizer
