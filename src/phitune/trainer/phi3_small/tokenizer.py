"""``Phi3SmallTokenizer``: Phi-3-small's tiktoken tokenizer, loaded offline from a checkpoint folder.

As the published ``tokenization_phi3_small.py`` (microsoft/Phi-3-small-8k-instruct) defines it: cl100k_base's
byte-pair ranks (the folder's ``cl100k_base.tiktoken``, one ``base64(token) rank`` per line) and split pattern, then
96 special ids past the ranks: ``<|dummy_id_2|>``, ``<|endoftext|>``, ``<|fim_prefix|>``, ``<|fim_middle|>``,
``<|fim_suffix|>``, ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|dummy_id_0|>``, ``<|dummy_id_1|>``,
``<|end|>``, ``<|dummy_id_3|>`` ... ``<|dummy_id_11|>``, ``<|endofprompt|>``, ``<|dummy_id_12|>`` ...
``<|dummy_id_86|>`` (100256-100351 with cl100k's 100256 ranks). The published class downloads cl100k_base when it
can; this one reads only the folder, so a smaller rank file (tiny-phi3-small's) gets the same special-token layout
after its own ranks.

Tokens are strings in the byte-level alphabet of GPT-2 (``Ġ`` for a space, ...), as transformers' byte-level
tokenizers spell them; ids, text and decoding are tiktoken's.
"""

from __future__ import annotations

import base64
import functools
import os
from pathlib import Path
from typing import Any

from transformers import AddedToken, PreTrainedTokenizer

VOCAB_FILE = "cl100k_base.tiktoken"

CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
"""cl100k_base's pre-tokenisation pattern (tiktoken 0.14's ``tiktoken_ext.openai_public``)."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|dummy_id_2|>",
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|dummy_id_0|>",
    "<|dummy_id_1|>",
    "<|end|>",
    *(f"<|dummy_id_{n}|>" for n in range(3, 12)),
    "<|endofprompt|>",
    *(f"<|dummy_id_{n}|>" for n in range(12, 87)),
)
"""The special tokens in id order, from the first id past the byte-pair ranks (96 of them)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
"""The chat template of microsoft/Phi-3-small-8k-instruct: ``<|endoftext|>`` first, each turn ``<|role|>\\n ...
<|end|>\\n``."""


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


@functools.cache
def _byte_values() -> dict[str, int]:
    return {char: value for value, char in enumerate(_byte_alphabet())}


def _as_text(token: bytes) -> str:
    alphabet = _byte_alphabet()
    return "".join(alphabet[b] for b in token)


def _as_bytes(token: str) -> bytes:
    values = _byte_values()
    return bytes(values[c] for c in token)


def read_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """A tiktoken rank file: ``base64(token) rank`` per line."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_ranks(ranks: dict[bytes, int], path: str | os.PathLike[str]) -> None:
    lines = (
        f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda x: x[1])
    )
    Path(path).write_text("".join(lines), encoding="utf-8")


class Phi3SmallTokenizer(PreTrainedTokenizer):  # type: ignore[misc]
    """Phi-3-small's tokenizer (module docstring): ``AutoTokenizer`` loads it from a folder whose
    ``tokenizer_config.json`` names ``Phi3SmallTokenizer``, once :func:`phitune.trainer.phi3_small.register` ran."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file: str | None = None, errors: str = "replace", **kwargs: Any) -> None:
        import tiktoken

        if vocab_file is None:
            raise ValueError(f"Phi3SmallTokenizer needs its rank file ({VOCAB_FILE}) in the model folder")
        self.mergeable_ranks = read_ranks(vocab_file)
        first = len(self.mergeable_ranks)
        if sorted(self.mergeable_ranks.values()) != list(range(first)):
            raise ValueError(f"{vocab_file}: the ranks are not 0..{first - 1}")
        self.special_tokens = {token: first + offset for offset, token in enumerate(SPECIAL_TOKENS)}
        self.errors = errors
        self.encoding = tiktoken.Encoding(
            name="phi3small",
            pat_str=CL100K_PATTERN,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.decoder = {rank: _as_text(token) for token, rank in self.mergeable_ranks.items()}
        self.encoder = {text: rank for rank, text in self.decoder.items()}
        self._added_tokens_decoder = {
            index: AddedToken(token, special=True, normalized=False) for token, index in self.special_tokens.items()
        }
        for name in ("bos_token", "eos_token"):
            kwargs.setdefault(name, "<|endoftext|>")
        super().__init__(errors=errors, **kwargs)

    @property
    def vocab_size(self) -> int:
        return int(self.encoding.n_vocab)

    def get_vocab(self) -> dict[str, int]:
        return {**self.encoder, **self.special_tokens}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self.decoder[index] for index in self.encoding.encode_ordinary(text)]

    def _convert_token_to_id(self, token: str) -> int | None:
        """The token's id; an unknown token gives ``unk_token_id``, None: the vocabulary has no unknown token."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        found: int | None = self.encoder.get(token, self.unk_token_id)
        return found

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.decoder:
            return self.decoder[index]
        return str(self._added_tokens_decoder[index].content)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        pieces: list[str] = []
        pending = b""
        for token in tokens:
            if token in self.special_tokens:
                pieces.append(pending.decode("utf-8", errors=self.errors) + token)
                pending = b""
            else:
                pending += _as_bytes(token)
        return "".join(pieces) + pending.decode("utf-8", errors=self.errors)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i in self.decoder]
        return str(self.encoding.decode(ids, errors=self.errors))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        write_ranks(self.mergeable_ranks, path)
        return (path,)
