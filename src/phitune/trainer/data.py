"""Training examples: token ids plus labels that carry loss only where the model should learn to write.

Chat data is rendered with the model's own chat template; loss falls on each assistant message's content and the
end-of-turn token that closes it (``<|end|>`` for Phi-3, Phi-3.5 and Phi-4-mini, ``<|im_end|>`` for Phi-4), so the
model learns both what to say and when to stop.
The assistant spans are found by rendering the conversation up to each assistant message, so templates without
``{% generation %}`` tags (such as Phi-3's own) work, and a template that breaks the method is an error, never a
silently all-masked or all-trained example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .. import datasets
from ..chat_template import END_OF_TURN_TOKENS
from ..errors import DatasetError, PhituneError, SpecError
from ..types import DatasetIssue, JobSpec
from .model import check_method, open_base

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""The label of a position that carries no loss."""

_TEMPLATE_FIELD = "model.chat_template"


@dataclass(frozen=True)
class Example:
    """One tokenised training example. ``labels`` align with ``input_ids`` (the loss shifts them by one) and hold
    ``IGNORE_INDEX`` where there is no loss."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.labels)} labels")

    @property
    def trainable_tokens(self) -> int:
        """How many positions carry loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


class ExampleError(PhituneError, ValueError):
    """One example cannot be trained on. ``category`` is the matching ``DatasetIssue`` category; for ``too_long``,
    ``needed_length`` is the shortest ``max_seq_length`` that keeps a token with loss."""

    def __init__(
        self,
        category: Literal["too_long", "no_assistant", "turn_order"],
        message: str,
        needed_length: int | None = None,
    ) -> None:
        self.category = category
        self.needed_length = needed_length
        super().__init__(message)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the first of :data:`END_OF_TURN_TOKENS` that the tokenizer has as a token of its own, else the eos
    id."""
    for token in END_OF_TURN_TOKENS:
        found = tokenizer.convert_tokens_to_ids(token)
        if isinstance(found, int) and found != tokenizer.unk_token_id:
            return found
    return _eos_id(tokenizer)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, max_seq_length: int) -> Example:
    """Tokenise a conversation with the tokenizer's chat template; loss on assistant content and its end-of-turn.

    Assistant messages with ``"weight": 0`` (OpenAI's format) carry no loss. Each assistant span starts where the
    rendering of the messages before it, with the generation prompt, ends; that rendering must be a token prefix of
    the whole conversation's, and the span must hold the message's content followed by the end-of-turn token,
    else :class:`SpecError` (``model.chat_template``). Sequences longer than ``max_seq_length`` keep their start;
    :class:`ExampleError` when no position is left with loss.
    """
    eot = end_of_turn_id(tokenizer)
    input_ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if index == 0:
            raise ExampleError("turn_order", "the conversation starts with an assistant message: it has no prompt")
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        turn = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        start = len(prompt)
        if input_ids[:start] != prompt or turn[:start] != prompt:
            raise SpecError(
                _TEMPLATE_FIELD,
                f"the chat template is not prefix-stable: the tokens of messages[:{index}] with the generation "
                "prompt are not a prefix of the conversation's, so the assistant turns cannot be located",
            )
        turn_end = _common_prefix_length(turn, input_ids)  # where this turn's rendering stops matching the whole
        try:
            end = input_ids.index(eot, start, turn_end)
        except ValueError:
            raise SpecError(
                _TEMPLATE_FIELD,
                f"the chat template does not close assistant message {index} with "
                f"{tokenizer.convert_ids_to_tokens(eot)!r}; the model would never learn to stop",
            ) from None
        content = message.get("content")
        rendered = tokenizer.decode(input_ids[start:end], clean_up_tokenization_spaces=False)
        if isinstance(content, str) and content.strip() not in rendered:
            raise SpecError(
                _TEMPLATE_FIELD,
                f"the content of assistant message {index} is not where the chat template's generation prompt "
                f"ends; rendered there: {rendered[:80]!r}",
            )
        if message.get("weight", 1) != 0:
            labels[start : end + 1] = input_ids[start : end + 1]
    return _truncated(input_ids, labels, max_seq_length, "no assistant message carries loss (none, or all weight 0)")


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *, max_seq_length: int
) -> Example:
    """Tokenise a prompt/completion pair (or Azure's text/ground_truth); loss on the completion and eos."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    completion_ids = [*tokenizer.encode(completion, add_special_tokens=False), _eos_id(tokenizer)]
    return _truncated(
        prompt_ids + completion_ids,
        [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        max_seq_length,
        "the prompt and the completion are both empty",
    )


@dataclass(frozen=True)
class DatasetFile:
    """A dataset file, and how messages name it: a stored file by its id and original filename (never the store's
    path), a file of the user's by its path (the default)."""

    path: Path
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or str(self.path)


@dataclass(frozen=True)
class Dataset:
    """The examples of a dataset file that train, and the lines of those left out as untrainable."""

    file: DatasetFile
    examples: list[Example]
    dropped_lines: list[int]


@dataclass(frozen=True)
class JobData:
    """A job's tokenizer and datasets, as training sees them."""

    tokenizer: Any
    train: Dataset
    valid: Dataset | None


def prepare(spec: JobSpec, base_path: str, train: DatasetFile, valid: DatasetFile | None) -> JobData:
    """Open the job's base (config and tokenizer: :func:`~phitune.trainer.model.open_base`) and encode its datasets
    with :func:`read_dataset` under its ``max_seq_length``, the model's context length and
    ``drop_untrainable_examples``; a method the model cannot take is refused first
    (:func:`~phitune.trainer.model.check_method`). What the trainer runs first, and what the local backend checks at
    ``create``."""
    base = open_base(spec.model, base_path)
    check_method(spec.method, base.model_type)
    hp = spec.hyperparameters

    def read(file: DatasetFile) -> Dataset:
        return read_dataset(
            file,
            base.tokenizer,
            max_seq_length=hp.max_seq_length,
            context_length=base.context_length,
            drop_untrainable=hp.drop_untrainable_examples,
        )

    return JobData(base.tokenizer, read(train), read(valid) if valid is not None else None)


def read_dataset(
    file: DatasetFile,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int,
    context_length: int | None = None,
    drop_untrainable: bool = False,
) -> Dataset:
    """Encode a JSONL dataset whose lines are chat (``messages``), ``prompt``/``completion`` or
    ``text``/``ground_truth`` records, as :func:`phitune.datasets.parse` reads them (the validator's own reading).
    Every unusable line is collected into one :class:`DatasetError` naming the file and saying what would fix it:
    lines the validator refuses, examples longer than ``context_length`` even truncated, and examples with no token
    with loss within ``max_seq_length`` (``too_long``) unless ``drop_untrainable`` leaves them out. A file with no
    example left is a ``DatasetError`` too."""
    parsed = datasets.parse(file.path)
    examples: list[Example] = []
    issues = list(parsed.report.errors)
    unlisted = parsed.report.error_count - len(issues)  # the validator keeps the first 1000 of its errors
    dropped: list[int] = []
    needed = 0  # the max_seq_length under which every untrainable example would keep a token with loss
    overlong = False
    for number, record in parsed.examples:
        try:
            example = _encode_example(record, tokenizer, max_seq_length)
        except ExampleError as error:
            needed = max(needed, error.needed_length or 0)
            if error.needed_length is not None and drop_untrainable:
                dropped.append(number)
            else:
                issues.append(DatasetIssue(line=number, category=error.category, message=error.message))
        else:
            if context_length is not None and len(example.input_ids) > context_length:
                overlong = True
                message = (
                    f"{len(example.input_ids)} tokens within max_seq_length={max_seq_length}: longer than the "
                    f"model's {context_length}-token context"
                )
                issues.append(DatasetIssue(line=number, category="too_long", message=message))
            else:
                examples.append(example)
    if not issues and not examples:
        why = f"no example keeps a token with loss within max_seq_length={max_seq_length}" if dropped else "no example"
        issues.append(DatasetIssue(line=0, category="too_long" if dropped else "empty_file", message=why))
    if issues:
        fixes = _fixes(max_seq_length, context_length, needed, overlong=overlong, dropping=drop_untrainable)
        issues.sort(key=lambda issue: issue.line)
        raise DatasetError(file.label, issues, total=len(issues) + unlisted, fixes=fixes)
    return Dataset(file, examples, dropped)


def _fixes(
    max_seq_length: int, context_length: int | None, needed: int, *, overlong: bool, dropping: bool
) -> list[str]:
    """What would make a dataset's examples train: ``needed`` is the ``max_seq_length`` under which each untrainable
    example would keep a token with loss (0 where none is untrainable); ``overlong`` examples exceed the model's
    context even truncated; ``dropping`` is whether ``drop_untrainable_examples`` is set already."""
    fixes: list[str] = []
    if overlong:
        fixes.append(f"lower hyperparameters.max_seq_length to the model's context of {context_length} tokens or less")
    if needed and (context_length is None or needed <= context_length):
        fixes.append(
            f"raise hyperparameters.max_seq_length (now {max_seq_length}) to at least {needed}, so that every "
            "example keeps a token with loss"
        )
    elif needed:
        fixes.append(
            f"shorten the prompts that come before the first token with loss: one needs {needed} tokens to reach it, "
            f"more than the model's {context_length}-token context"
        )
    if needed and not dropping:
        fixes.append("or set hyperparameters.drop_untrainable_examples=True to train without these examples")
    return fixes


def load_examples(path: str | Path, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int) -> list[Example]:
    """The examples of a JSONL dataset (:func:`read_dataset`), named by its path in errors."""
    return read_dataset(DatasetFile(Path(path)), tokenizer, max_seq_length=max_seq_length).examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest: ``input_ids``, ``attention_mask`` and ``labels`` (pads ignored), int64."""
    if not examples:
        raise ValueError("collate needs at least one example")
    shape = (len(examples), max(len(example.input_ids) for example in examples))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _encode_example(example: datasets.Example, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> Example:
    if isinstance(example, datasets.ChatExample):
        messages: list[dict[str, Any]] = [
            {"role": m.role, "content": m.content, **({"weight": m.weight} if m.weight is not None else {})}
            for m in example.messages
        ]
        return encode_chat(tokenizer, messages, max_seq_length=max_seq_length)
    return encode_completion(tokenizer, example.prompt, example.completion, max_seq_length=max_seq_length)


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, add_generation_prompt: bool
) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return list(tokenizer.encode(text, add_special_tokens=False))


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _truncated(input_ids: list[int], labels: list[int], max_seq_length: int, why_empty: str) -> Example:
    """Cut to ``max_seq_length`` keeping the start; the first token never carries loss (nothing predicts it)."""
    labels = [IGNORE_INDEX if position == 0 else label for position, label in enumerate(labels)]
    example = Example(input_ids[:max_seq_length], labels[:max_seq_length])
    if example.trainable_tokens == 0:
        if any(label != IGNORE_INDEX for label in labels):
            first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            raise ExampleError(
                "too_long",
                f"no token with loss within max_seq_length={max_seq_length}: the example has {len(input_ids)} "
                f"tokens and its first trainable token is at position {first}",
                needed_length=first + 1,
            )
        raise ExampleError("no_assistant", why_empty)
    return example


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise SpecError("model", "the tokenizer has no eos token, so examples cannot end")
    return eos
