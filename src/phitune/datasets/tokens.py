"""Token counts as Phi training sees them: an estimate without a tokenizer, or a tokenizer and the model's chat
template."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from ..chat_template import END_OF_TURN_TOKENS, ChatTemplate
from ..errors import MissingDependencyError
from .examples import AssistantMessage, ChatExample, Example, Message


class TokenCounter(Protocol):
    """Counts tokens as Phi-3 training sees them. ``exact`` is False for estimates."""

    name: str
    exact: bool

    def count(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        """``(total, trainable)`` tokens of each example; trainable tokens are those that carry loss."""
        ...


class ApproximateCounter:
    """Estimates without a tokenizer: ``ceil(UTF-8 bytes / 4)`` per text, plus Phi-3's markup.

    A chat message adds 4 tokens (``<|role|>``, two newlines, ``<|end|>``) and a conversation 1 (``<|endoftext|>``);
    an assistant message with non-zero weight trains on its content and ``<|end|>``. A completion example adds the
    eos token, which trains with the completion. English prose averages about 4 bytes per Phi-3 token.
    """

    name = "approximate"
    exact = False

    def count(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        """``(total, trainable)`` estimated tokens of each example."""
        out: list[tuple[int, int]] = []
        for example in examples:
            if isinstance(example, ChatExample):
                total = 1
                trainable = 0
                for message in example.messages:
                    text = message.content
                    n = ((len(text) if text.isascii() else len(text.encode())) + 3) >> 2
                    total += n + 4
                    if type(message) is AssistantMessage and message.weight != 0:
                        trainable += n + 1
                out.append((total, trainable))
            else:
                completion = _approximate(example.completion) + 1
                out.append((_approximate(example.prompt) + completion, completion))
        return out


def _approximate(text: str) -> int:
    return ((len(text) if text.isascii() else len(text.encode())) + 3) >> 2


class TokenizerCounter:
    """Exact token counts with a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library) and the model's chat
    template (:class:`~phitune.chat_template.ChatTemplate`, from the folder's ``tokenizer_config.json``).

    A conversation is rendered by the template and encoded whole, as the trainer encodes it. An assistant message
    with non-zero weight trains on what follows the template's generation prompt: its content and the end-of-turn
    token (``<|end|>``, Phi-4's ``<|im_end|>``). Without a template, a conversation renders as Phi-3's does
    (``<|role|>\\n{content}<|end|>\\n`` per message, then ``<|endoftext|>``). A completion example is prompt +
    completion + eos, the texts encoded separately; the completion and eos train. Texts go through
    ``encode_batch_fast``, ``batch_size`` at a time. ``exact`` is False without a template when the tokenizer lacks a
    Phi-3 special token as a single token.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        batch_size: int = 256,
        template: ChatTemplate | None = None,
    ) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise MissingDependencyError("tokenizers", "local") from exc
        file = Path(path)
        self._tokenizer = Tokenizer.from_file(str(file))
        self._batch_size = batch_size
        self._template = template
        self.name = name or file.parent.name or file.name
        if template is None:
            self._prompt_text, self._end = "<|assistant|>\n", "<|end|>"
            self.exact = all(self._cost(t) == 1 for t in ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"))
        else:
            self._prompt_text = template.assistant_prompt
            eos = template.special_tokens.get("eos_token", "")
            self._end = next((t for t in END_OF_TURN_TOKENS if self._cost(t) == 1), eos)
            self.exact = True
        self._prompt = self._cost(self._prompt_text)

    def _cost(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _lengths(self, texts: list[str]) -> Iterator[int]:
        encode = self._tokenizer.encode_batch_fast
        for start in range(0, len(texts), self._batch_size):
            for encoding in encode(texts[start : start + self._batch_size], add_special_tokens=False):
                yield len(encoding.ids)

    def _render(self, messages: Sequence[Message]) -> str:
        if self._template is None:
            return "".join(f"<|{m.role}|>\n{m.content}<|end|>\n" for m in messages) + "<|endoftext|>"
        return self._template.render([{"role": m.role, "content": m.content} for m in messages])

    def count(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        """``(total, trainable)`` tokens of each example."""
        texts: list[str] = []
        turns: list[int] = []
        for example in examples:
            if isinstance(example, ChatExample):
                texts.append(self._render(example.messages))
                trained = [
                    f"{self._prompt_text}{m.content}{self._end}"
                    for m in example.messages
                    if type(m) is AssistantMessage and m.weight != 0
                ]
                texts += trained
                turns.append(len(trained))
            else:
                texts += (example.prompt, example.completion)
                turns.append(1)
        lengths = self._lengths(texts)
        out: list[tuple[int, int]] = []
        for example, n in zip(examples, turns, strict=True):
            total = next(lengths)
            if isinstance(example, ChatExample):
                out.append((total, sum(next(lengths) - self._prompt for _ in range(n))))
            else:
                completion = next(lengths) + 1
                out.append((total + completion, completion))
        return out


def counter_for(tokenizer_dir: str | os.PathLike[str] | None) -> TokenCounter:
    """A :class:`TokenizerCounter` with the folder's chat template if ``<tokenizer_dir>/tokenizer.json`` exists, else
    an :class:`ApproximateCounter`."""
    if tokenizer_dir is not None:
        file = Path(tokenizer_dir) / "tokenizer.json"
        if file.is_file():
            return TokenizerCounter(file, name=Path(tokenizer_dir).name, template=ChatTemplate.of(tokenizer_dir))
    return ApproximateCounter()
