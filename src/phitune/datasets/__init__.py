"""Streaming validation of fine-tuning datasets (JSON Lines), with token statistics and a trained-token estimate.

:func:`validate` reads a file once, in 256 KiB chunks of whole lines, and keeps only running aggregates, so memory
stays bounded whatever the file size. Every problem is collected, each with its 1-based line and a category:

- ``empty_file``: no non-blank line (reported on line 0)
- ``invalid_utf8``: the line's bytes are not strict UTF-8
- ``invalid_json``: the line is not one JSON value
- ``not_an_object``: the value is not a JSON object
- ``unknown_format``: no known format's keys (or a completion format's key is missing)
- ``mixed_formats``: the line's format differs from the file's (that of its first well-formed line)
- ``missing_messages``: a chat line without a ``messages`` list
- ``empty_messages``: ``messages`` is empty
- ``invalid_message``: a message is not an object or lacks ``role``/``content``; a bad ``weight``
- ``unknown_role``: a role other than system, user, assistant, tool
- ``turn_order``: not [system] user, assistant, user, ... ; ``tool`` messages only right after an assistant message
  (or another tool message)
- ``no_assistant``: no assistant message, or every assistant message has ``weight`` 0
- ``non_string_content``: ``content`` (or ``prompt``, ``completion``, ``text``, ``ground_truth``) not a string
- ``empty_content``: an empty or whitespace-only message content or completion
- ``chat_markup``: a text holds a token of the chat markup (``<|end|>``, ``<|user|>``, ...), which the tokenizer reads
  as markup, not text: a turn would end or begin there
- ``too_long``: more tokens than the model's context (error); than ``max_seq_length`` (warning); a line longer than
  :data:`MAX_LINE_BYTES` (error, the line is skipped unread)
- ``not_a_file``: the path is not a regular file (a FIFO, a device, a folder): raised as a
  :class:`~phitune.errors.DatasetError`, nothing is read

Formats: ``chat`` (``{"messages": [{"role", "content"}, ...]}``, extra keys allowed, assistant messages may carry
OpenAI's ``weight`` 0 or 1), ``prompt_completion`` and Azure's ``text_ground_truth`` columns. Blank lines are skipped.
Lines end at ``\\n`` only (``\\r`` is JSON whitespace), and :func:`parse` gives the trainer the examples of exactly
the lines the validator accepts: the two cannot disagree.

Each line is parsed with msgspec straight into typed structs (the message classes check roles and types in C); a
line that does not parse as one of the file's format is parsed again, generically, to name each of its problems.
Token counts go through a :class:`TokenCounter`, a chunk's examples at a time. With ``workers``, processes check
ranges of whole lines of one file, and their tallies add up, in file order, to the report one process makes.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import re
import stat
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from io import FileIO
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import msgspec

from .._process import die_with_parent
from ..catalog import find
from ..chat_template import END_OF_TURN_TOKENS, ChatTemplate
from ..errors import DatasetError, MissingDependencyError, SpecError
from ..types import DatasetFormat, DatasetIssue, DatasetIssueCategory, DatasetReport, TokenStats

__all__ = [
    "AnyMessage",
    "ApproximateCounter",
    "AssistantMessage",
    "ChatExample",
    "CompletionExample",
    "Example",
    "Message",
    "SystemMessage",
    "TokenCounter",
    "TokenizerCounter",
    "ToolMessage",
    "UserMessage",
    "counter_for",
    "open_dataset",
    "parse",
    "validate",
]

_CHUNK_BYTES = 1 << 18
"""Read size: small enough that a chunk's bytes and decoded objects stay in the CPU cache (2-3x faster than 4 MiB)."""

_PIECE_BYTES = 1 << 23
"""About the most bytes one task of a parallel pass checks (a file splits into a multiple of ``workers`` tasks)."""

DEFAULT_WORKERS = 4
"""Processes a large file is checked in by default (where the machine has as many CPUs)."""

_PARALLEL_MIN_BYTES = 1 << 25
"""Smaller files are checked in one process whatever ``workers`` says: starting processes costs about 30 ms of CPU,
what one process takes to check 15 MB."""

MAX_LINE_BYTES = 1 << 24
"""The longest line read (16 MiB, far beyond any model's context): a longer one is a ``too_long`` error, skipped
without being held in memory, so memory stays bounded whatever a file holds."""

_MARKUP = re.compile(r"<\|/?[A-Za-z0-9_]+\|>")
"""A token of the Phi chat markup (``<|user|>``, ``<|end|>``, ``<|endoftext|>``, ``<|placeholder1|>``, ...)."""

_ROLE_CACHE_SIZE = 4096
"""Distinct role sequences whose verdict is remembered (a dataset has few; the bound keeps memory fixed)."""


# ------------------------------------------------------------------------------------------------------ examples
class Message(msgspec.Struct, tag_field="role"):
    """A chat message; its class is its role. ``weight`` 0 on an assistant message means no loss (OpenAI's format)."""

    role: ClassVar[str]
    content: str
    weight: Literal[0, 1] | None = None


class SystemMessage(Message, tag="system"):
    """A chat message with role ``system``: a system prompt."""

    role: ClassVar[str] = "system"


class UserMessage(Message, tag="user"):
    """A chat message with role ``user``: a user turn."""

    role: ClassVar[str] = "user"


class AssistantMessage(Message, tag="assistant"):
    """A chat message with role ``assistant``: an assistant turn (trained on unless its ``weight`` is 0)."""

    role: ClassVar[str] = "assistant"


class ToolMessage(Message, tag="tool"):
    """A chat message with role ``tool``: a tool's answer, right after an assistant turn."""

    role: ClassVar[str] = "tool"


AnyMessage = SystemMessage | UserMessage | AssistantMessage | ToolMessage
_MESSAGE_TYPES: dict[str, type[Message]] = {
    t.role: t for t in (SystemMessage, UserMessage, AssistantMessage, ToolMessage)
}


class ChatExample(msgspec.Struct):
    """A chat line: ``{"messages": [...]}`` (other keys are ignored)."""

    messages: list[AnyMessage]


class CompletionExample(msgspec.Struct):
    """A ``prompt``/``completion`` line, or Azure's ``text``/``ground_truth`` columns in the same shape."""

    prompt: str
    completion: str


class _TextGroundTruth(msgspec.Struct, rename={"prompt": "text", "completion": "ground_truth"}):
    prompt: str
    completion: str


Example = ChatExample | CompletionExample
"""A well-formed line, as token counters receive it."""

_FORMAT_KEYS: dict[DatasetFormat, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text_ground_truth": ("text", "ground_truth"),
}
_chat_decoder = msgspec.json.Decoder(ChatExample)
_completion_decoder = msgspec.json.Decoder(CompletionExample)
_text_decoder = msgspec.json.Decoder(_TextGroundTruth)
_any_decoder = msgspec.json.Decoder()


def _decode_any(line: bytearray) -> Any:
    """The line's JSON value, to name its problems. A number beyond msgspec's range (an integer of thousands of
    digits, ``1e400``) is valid JSON all the same, read here as a float: the typed decoders skip such a value in a key
    they ignore, and this reading must not refuse what they accept."""
    try:
        return _any_decoder.decode(line)
    except msgspec.ValidationError:
        return json.loads(line, parse_int=float, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise msgspec.DecodeError(f"{name} is not JSON")


def _decode_text_ground_truth(line: bytearray) -> CompletionExample:
    row = _text_decoder.decode(line)
    return CompletionExample(row.prompt, row.completion)


_DECODERS: dict[DatasetFormat, Callable[[bytearray], Example]] = {
    "chat": _chat_decoder.decode,
    "prompt_completion": _completion_decoder.decode,
    "text_ground_truth": _decode_text_ground_truth,
}


# ------------------------------------------------------------------------------------------------- token counts
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


# --------------------------------------------------------------------------------------------------- statistics
class _Histogram:
    """Counts of non-negative ints in log-linear buckets: exact below 1024, within 0.2% above, bounded size."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def add(self, values: list[int]) -> None:
        self.counts.update([v if v < 1024 else _bucket(v) for v in values])

    def quantile(self, q: float) -> int:
        """The smallest bucket's upper bound that covers at least ``q`` of the values (nearest rank)."""
        rank = math.ceil(q * self.counts.total())
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return _bucket_top(bucket)
        return 0


def _bucket(value: int) -> int:
    shift = value.bit_length() - 10
    return (shift << 9) + (value >> shift)


def _bucket_top(bucket: int) -> int:
    if bucket < 1024:
        return bucket
    shift = (bucket >> 9) - 1
    return ((bucket - (shift << 9) + 1) << shift) - 1


_Issue = tuple[int, DatasetIssueCategory, str]
"""A problem as ``(line, category, message)``."""


@dataclass
class _Tally:
    """What a pass over consecutive lines found, with line numbers counted from the first of them.

    Each keeps the first ``max_errors`` errors and warnings; the tallies of consecutive ranges of lines add up,
    in file order, to that of the whole range.
    """

    max_errors: int
    lines_read: int = 0
    lines: int = 0
    examples: int = 0
    total: int = 0
    trainable: int = 0
    min: int = 0
    max: int = 0
    histogram: _Histogram = field(default_factory=_Histogram)
    errors: list[_Issue] = field(default_factory=list)
    error_count: int = 0
    warnings: list[_Issue] = field(default_factory=list)

    def add(self, later: _Tally) -> None:
        """Fold in the tally of the lines that follow these."""
        offset = self.lines_read
        room = self.max_errors - len(self.errors)
        self.errors += [(line + offset, category, text) for line, category, text in later.errors[:room]]
        room = self.max_errors - len(self.warnings)
        self.warnings += [(line + offset, category, text) for line, category, text in later.warnings[:room]]
        self.error_count += later.error_count
        if later.examples:
            self.min = later.min if not self.examples else min(self.min, later.min)
            self.max = max(self.max, later.max)
        self.lines_read += later.lines_read
        self.lines += later.lines
        self.examples += later.examples
        self.total += later.total
        self.trainable += later.trainable
        self.histogram.counts.update(later.histogram.counts)


# --------------------------------------------------------------------------------------------------- validation
def validate(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    max_seq_length: int | None = None,
    epochs: int = 1,
    counter: TokenCounter | None = None,
    max_errors: int = 1000,
    workers: int | None = None,
) -> DatasetReport:
    """Check every line of a JSONL dataset in one streaming pass with bounded memory.

    ``model`` (a catalog name) sets the context length beyond which an example is a ``too_long`` error; beyond
    ``max_seq_length`` it is a warning (the example will be truncated). ``counter`` defaults to
    :class:`ApproximateCounter`. ``error_count`` counts every error; ``errors`` and ``warnings`` keep the first
    ``max_errors`` each. Token statistics cover the valid examples, before any truncation.

    A file of more than 32 MiB is checked in ``workers`` processes (default: one per CPU, at most
    ``DEFAULT_WORKERS``; forked where the platform allows, else ``counter`` must pickle), each reading its own ranges
    of whole lines; the report is the same as with one. ``workers=1`` keeps it in this process.
    Raises ``OSError`` when the file cannot be read, :class:`~phitune.errors.DatasetError` (``not_a_file``) when it
    is not a regular file, and :class:`~phitune.errors.SpecError` for invalid arguments.
    """
    if epochs < 1:
        raise SpecError("epochs", f"must be at least 1, got {epochs}")
    if max_seq_length is not None and max_seq_length < 1:
        raise SpecError("max_seq_length", f"must be at least 1, got {max_seq_length}")
    if max_errors < 0:
        raise SpecError("max_errors", f"must not be negative, got {max_errors}")
    if workers is None:
        workers = min(os.cpu_count() or 1, DEFAULT_WORKERS)
    if workers < 1:
        raise SpecError("workers", f"must be at least 1, got {workers}")
    entry = find(model) if model else None
    settings = _Settings(
        counter or ApproximateCounter(),
        (entry.name, entry.context_length) if entry else None,
        max_seq_length,
        max_errors,
    )
    scan = _Scan(settings)
    with open_dataset(path) as file:
        size = os.fstat(file.fileno()).st_size
        if workers > 1 and size > _PARALLEL_MIN_BYTES:
            _scan_in_parallel(scan, file, os.fspath(path), size, workers)
        else:
            size = _scan_all(scan, file)
    return scan.report(os.fspath(path), size, epochs)


@dataclass(frozen=True)
class ParsedDataset:
    """The well-formed examples of a dataset file, each with its 1-based line, and the report of the pass that
    found them (its ``errors`` name every line left out)."""

    examples: list[tuple[int, Example]]
    report: DatasetReport


def parse(path: str | os.PathLike[str], *, max_errors: int = 1000) -> ParsedDataset:
    """Read a dataset as :func:`validate` does, in this process and with no length limit, keeping its examples: what
    the trainer encodes, so that it takes exactly the lines the validator accepts."""
    scan = _Scan(_Settings(ApproximateCounter(), None, None, max_errors), keep=[])
    with open_dataset(path) as file:
        size = _scan_all(scan, file)
    assert scan.keep is not None
    return ParsedDataset(scan.keep, scan.report(os.fspath(path), size, 1))


def open_dataset(path: str | os.PathLike[str]) -> FileIO:
    """Open a dataset file for reading. Anything but a regular file (a FIFO, which would wait for a writer forever; a
    device such as ``/dev/zero``, which never ends; a folder) is a :class:`~phitune.errors.DatasetError`
    (``not_a_file``), raised before anything is read."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens without waiting
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            message = f"{_file_kind(mode)}, not a regular file: datasets are read from regular files"
            raise DatasetError(os.fspath(path), [DatasetIssue(line=0, category="not_a_file", message=message)])
        os.set_blocking(descriptor, True)
        return FileIO(descriptor, "rb", closefd=True)
    except BaseException:
        os.close(descriptor)
        raise


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    kinds |= {stat.S_ISDIR: "a folder", stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def _scan_all(scan: _Scan, file: FileIO) -> int:
    """Feed the rest of ``file`` to ``scan``; returns where the file ended."""
    for data, end in _chunks(file):
        scan.feed(data, end)
    return file.tell()


def _chunks(file: FileIO, size: int | None = None) -> Iterator[tuple[bytearray | None, int]]:
    """The file's next ``size`` bytes (to its end if None), a read's worth of whole lines at a time.

    Each is ``(buffer, end)``: the lines are ``buffer[:end]``, until the next one comes (the buffer is reused). A
    line longer than a read comes whole; so does the last, with or without its newline. A line longer than
    :data:`MAX_LINE_BYTES` comes as ``(None, n)``: its ``n`` bytes (newline included) were skipped unread.
    """
    buffer = bytearray(_CHUNK_BYTES)
    kept = 0  # the bytes of a line begun but not ended, at the start of the buffer
    skipped = 0  # the bytes of an overlong line passed over so far; while skipping, nothing is kept
    left = size
    while left is None or left > 0:
        room = len(buffer) - kept if left is None else min(len(buffer) - kept, left)
        read = file.readinto(memoryview(buffer)[kept : kept + room])
        if not read:
            break
        end = kept + read
        if left is not None:
            left -= read
        if skipped:
            newline = buffer.find(b"\n", 0, end)
            if newline < 0:
                skipped += end
                continue
            yield None, skipped + newline + 1
            skipped = 0
            buffer[: end - newline - 1] = buffer[newline + 1 : end]
            kept = end - newline - 1
            continue
        cut = end if left == 0 else buffer.rfind(b"\n", kept, end) + 1
        if cut:
            yield buffer, cut
            buffer[: end - cut] = buffer[cut:end]
            kept = end - cut
        elif end < len(buffer):
            kept = end
        elif len(buffer) < MAX_LINE_BYTES:
            kept = end
            buffer.extend(bytes(len(buffer)))
        else:
            skipped, kept = end, 0
    if skipped:
        yield None, skipped
    elif kept:
        yield buffer, kept


class _Settings(NamedTuple):
    """What a pass checks and counts with: everything but the file."""

    counter: TokenCounter
    context: tuple[str, int] | None
    max_seq_length: int | None
    max_errors: int


class _Scan:
    """The running state of one validation pass over consecutive lines."""

    def __init__(self, settings: _Settings, keep: list[tuple[int, Example]] | None = None) -> None:
        self.settings = settings
        self.keep = keep
        """Where the well-formed examples go, with their lines (:func:`parse`: no length limit drops any)."""
        self.counter, self.context, self.max_seq_length, self.max_errors = settings
        self.format: DatasetFormat | None = None
        self.format_line = 0
        self.decode: Callable[[bytearray], Example] | None = None
        self.role_orders: dict[tuple[type[Message], ...], bool] = {}
        self.tally = _Tally(self.max_errors)

    def adopt(self, fmt: DatasetFormat, line: int) -> None:
        """Take ``fmt``, the format of the file's first well-formed line ``line``, as the file's."""
        self.format, self.format_line, self.decode = fmt, line, _DECODERS[fmt]

    # -------------------------------------------------------------------------------------------------- per chunk
    def feed(self, data: bytearray | None, size: int) -> None:
        """Validate the next lines of the file, ``data[:size]`` (the last line's newline optional), and tally them;
        ``data`` None stands for one line of ``size`` bytes too long to read."""
        tally = self.tally
        if data is None:
            tally.lines_read += 1
            tally.lines += 1
            text = f"the line is {size} bytes, more than the {MAX_LINE_BYTES >> 20} MiB a line may hold"
            self._add_errors([(tally.lines_read, "too_long", text)])
            return
        issues: list[_Issue] = []
        examples: list[Example] = []
        numbers: list[int] = []
        number = tally.lines_read + 1
        start = 0
        while start < size:
            end = data.find(b"\n", start, size)
            if end < 0:
                end = size
            line = data[start:end]
            example: Example | None = None
            if self.decode is not None and (line.isascii() or _is_utf8(line)):
                try:
                    example = self.decode(line)
                    tally.lines += 1
                except (msgspec.DecodeError, RecursionError):
                    pass
            if example is None:
                example = self._line(number, line, issues)
            if example is not None:
                examples.append(example)
                numbers.append(number)
            start = end + 1
            number += 1
        tally.lines_read = number - 1

        valid: list[Example] = []
        counted: list[int] = []
        if self.format == "chat":
            orders = self.role_orders
            for number, example in zip(numbers, examples, strict=True):
                assert isinstance(example, ChatExample)
                messages = example.messages
                key = tuple(map(type, messages))
                good = orders.get(key)
                if good is None:
                    good = self._remember(key)
                if good:
                    for m in messages:
                        text = m.content
                        if not text or m.weight == 0 or text.isspace() or "<|" in text:
                            good = False
                            break
                if not good:
                    problems = _chat_issues(messages)
                    if problems:
                        issues.extend((number, category, text) for category, text in problems)
                        continue
                valid.append(example)
                counted.append(number)
        else:
            for number, example in zip(numbers, examples, strict=True):
                assert isinstance(example, CompletionExample)
                if not example.completion or example.completion.isspace():
                    issues.append((number, "empty_content", f"{self._keys()[1]!r} is empty"))
                    continue
                markup: list[_Issue] = [
                    (number, "chat_markup", _markup_problem(repr(key), text))
                    for key, text in zip(self._keys(), (example.prompt, example.completion), strict=True)
                    if _MARKUP.search(text)
                ]
                if markup:
                    issues.extend(markup)
                    continue
                valid.append(example)
                counted.append(number)
        if valid:
            if self.keep is not None:
                self.keep.extend(zip(counted, valid, strict=True))
            self._count(valid, counted, issues)
        if issues:
            issues.sort(key=lambda issue: issue[0])
            self._add_errors(issues)

    def _add_errors(self, issues: list[_Issue]) -> None:
        tally = self.tally
        tally.error_count += len(issues)
        tally.errors += issues[: self.max_errors - len(tally.errors)]

    def _count(self, valid: list[Example], numbers: list[int], issues: list[_Issue]) -> None:
        counts = self.counter.count(valid)
        totals = [total for total, _ in counts]
        trainable = [t for _, t in counts]
        longest = max(totals)
        if (self.context is not None and longest > self.context[1]) or (
            self.max_seq_length is not None and longest > self.max_seq_length
        ):
            keep = [i for i, total in enumerate(totals) if self._length_ok(numbers[i], total, issues)]
            totals = [totals[i] for i in keep]
            trainable = [trainable[i] for i in keep]
            if not totals:
                return
        tally = self.tally
        low, high = min(totals), max(totals)
        tally.min = low if not tally.examples else min(tally.min, low)
        tally.max = max(tally.max, high)
        tally.examples += len(totals)
        tally.total += sum(totals)
        tally.trainable += sum(trainable)
        tally.histogram.add(totals)

    def _length_ok(self, line: int, total: int, issues: list[_Issue]) -> bool:
        if self.context is not None and total > self.context[1]:
            name, limit = self.context
            issues.append((line, "too_long", f"{total} tokens: longer than {name}'s {limit}-token context"))
            return False
        warnings = self.tally.warnings
        if self.max_seq_length is not None and total > self.max_seq_length and len(warnings) < self.max_errors:
            warnings.append(
                (line, "too_long", f"{total} tokens: will be truncated to max_seq_length={self.max_seq_length}")
            )
        return True

    def _remember(self, key: tuple[type[Message], ...]) -> bool:
        good = AssistantMessage in key and _order_problem(tuple(t.role for t in key)) is None
        if len(self.role_orders) < _ROLE_CACHE_SIZE:
            self.role_orders[key] = good
        return good

    # --------------------------------------------------------------------------------------------------- per line
    def _line(self, number: int, line: bytearray, issues: list[_Issue]) -> Example | None:
        """The example on a line that did not parse as one of the file's format (or came before the format was
        known), or None after recording its problems; the first well-formed line sets the file's format."""
        if not line.strip():
            return None
        self.tally.lines += 1
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            issues.append((number, "invalid_utf8", f"not UTF-8: {exc.reason} at byte {exc.start}"))
            return None
        problems = self._diagnose(number, line)
        if problems or self.decode is None:
            issues.extend((number, category, text) for category, text in problems)
            return None
        try:  # a well-formed line: the file's first, or a case the diagnosis does not name
            return self.decode(line)
        except (msgspec.DecodeError, RecursionError) as exc:
            issues.append((number, "invalid_message" if self.format == "chat" else "unknown_format", str(exc)))
            return None

    def _diagnose(self, number: int, line: bytearray) -> list[tuple[DatasetIssueCategory, str]]:
        """Why a line is not a well-formed example of the file's format; the first well-formed line sets the format."""
        try:
            value = _decode_any(line)
        except (msgspec.DecodeError, json.JSONDecodeError) as exc:
            return [("invalid_json", f"not valid JSON: {exc}")]
        except RecursionError:
            return [("invalid_json", "not valid JSON here: nested too deep to read")]
        if type(value) is not dict:
            return [("not_an_object", f"each line must be a JSON object, got {_json_type(value)}")]
        fmt = _detect(value, self.format)
        if fmt is None:
            keys = ", ".join(repr(k) for k in list(value)[:8]) or "none"
            if self.format == "chat":
                return [("missing_messages", f"no 'messages' list (keys: {keys})")]
            if self.format is not None:
                missing = ", ".join(repr(k) for k in self._keys() if k not in value)
                return [("unknown_format", f"missing {missing} of the file's {self.format} format (keys: {keys})")]
            expected = "'messages', 'prompt' and 'completion', or 'text' and 'ground_truth'"
            return [("unknown_format", f"expected {expected} (keys: {keys})")]
        if self.format is not None and fmt != self.format:
            return [("mixed_formats", f"a {fmt} line in a {self.format} file (format of line {self.format_line})")]
        messages: list[Message | None] | None = None
        if fmt == "chat":
            problems, messages = _chat_structure(value["messages"])
        else:
            problems = [
                ("non_string_content", f"{key!r} must be a string, got {_json_type(value[key])}")
                for key in _FORMAT_KEYS[fmt]
                if not isinstance(value[key], str)
            ]
        if not problems and self.format is None:
            self.adopt(fmt, number)
        return problems if messages is None else problems + _chat_issues(messages)

    def _keys(self) -> tuple[str, ...]:
        return _FORMAT_KEYS[self.format or "chat"]

    # ---------------------------------------------------------------------------------------------------- report
    def report(self, path: str, size: int, epochs: int) -> DatasetReport:
        """The :class:`DatasetReport` of everything fed so far."""
        tally = self.tally
        if tally.lines == 0:
            tally.error_count += 1
            tally.errors.append((0, "empty_file", "the file has no examples"))
        n = tally.examples
        tokens = TokenStats(
            total=tally.total,
            trainable=tally.trainable,
            min=tally.min,
            max=tally.max,
            mean=tally.total / n if n else 0.0,
            p95=min(tally.histogram.quantile(0.95), tally.max),
            tokenizer=self.counter.name,
            exact=self.counter.exact,
        )
        return DatasetReport(
            path=path,
            ok=tally.error_count == 0 and n > 0,
            format=self.format,
            examples=n,
            errors=[DatasetIssue(line=line, category=c, message=m) for line, c, m in tally.errors],
            error_count=tally.error_count,
            warnings=[DatasetIssue(line=line, category=c, message=m) for line, c, m in tally.warnings],
            tokens=tokens,
            bytes=size,
            epochs=epochs,
            estimated_trained_tokens=tally.trainable * epochs,
        )


# ------------------------------------------------------------------------------------------------------ parallel
def _scan_in_parallel(scan: _Scan, file: FileIO, path: str, size: int, workers: int) -> None:
    """Tally the whole file into ``scan`` with ``workers`` processes, each reading a chunk at a time.

    One process checks the lines up to the first well-formed one, which sets the file's format; the rest of the file
    splits into ranges of whole lines (a multiple of ``workers`` of them) that the processes check in that format,
    at most two a process submitted at a time. Their tallies add up here, in file order. This process counts no
    token, so that no fork copies a tokenizer's threads mid-use.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(scan.settings,))
    try:
        head, fmt, format_line, start = pool.submit(_scan_head, path).result()
        scan.tally.add(head)
        if fmt is None or start >= size:
            return
        scan.adopt(fmt, format_line)
        pieces = math.ceil((size - start) / (workers * _PIECE_BYTES)) * workers
        bounds = _line_starts(file, start, size, math.ceil((size - start) / pieces))
        running: deque[Future[_Tally]] = deque()  # in file order
        for a, b in itertools.pairwise(bounds):
            running.append(pool.submit(_scan_range, (path, a, b, fmt, format_line)))
            if len(running) > 2 * workers:
                scan.tally.add(running.popleft().result())
        while running:
            scan.tally.add(running.popleft().result())
    finally:
        pool.shutdown(cancel_futures=True)


def _line_starts(file: FileIO, start: int, size: int, step: int) -> list[int]:
    """``start``, then the offset of the first line to start at least ``step`` bytes after the last, ..., ``size``."""
    bounds = [start]
    while (target := bounds[-1] + step) < size:
        file.seek(target - 1)
        while (data := file.read(1 << 16)) and (newline := data.find(b"\n")) < 0:
            target += len(data)
        if not data or (target := target + newline) >= size:
            break
        bounds.append(target)
    bounds.append(size)
    return bounds


_worker_settings: _Settings | None = None
"""What a worker process checks and counts with (set once, as it starts)."""


def _start_worker(settings: _Settings) -> None:
    global _worker_settings
    die_with_parent()  # a killed validation takes its processes along
    _worker_settings = settings


def _worker_scan() -> _Scan:
    assert _worker_settings is not None, "not in a worker process"
    return _Scan(_worker_settings)


def _scan_head(path: str) -> tuple[_Tally, DatasetFormat | None, int, int]:
    """In a worker: the tally of a file's lines up to the first well-formed one (to its end if none is), that line's
    format and number, and the byte offset where those lines end."""
    scan = _worker_scan()
    stop = 0
    with open(path, "rb", buffering=0) as file:
        for data, end in _chunks(file):
            scan.feed(data, end)
            stop += end
            if scan.format is not None:
                break
    return scan.tally, scan.format, scan.format_line, stop


def _scan_range(task: tuple[str, int, int, DatasetFormat, int]) -> _Tally:
    """In a worker: the tally of the whole lines from byte ``start`` to ``stop`` of a file in a known format."""
    path, start, stop, fmt, format_line = task
    scan = _worker_scan()
    scan.adopt(fmt, format_line)
    with open(path, "rb", buffering=0) as file:
        file.seek(start)
        for data, end in _chunks(file, stop - start):
            scan.feed(data, end)
    return scan.tally


def _is_utf8(data: bytearray) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _detect(value: dict[str, Any], preferred: DatasetFormat | None) -> DatasetFormat | None:
    """The line's format: the file's own when its keys are there, else the first whose keys are all there."""
    if preferred is not None and all(k in value for k in _FORMAT_KEYS[preferred]):
        return preferred
    for fmt, keys in _FORMAT_KEYS.items():
        if all(k in value for k in keys):
            return fmt
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _chat_structure(messages: Any) -> tuple[list[tuple[DatasetIssueCategory, str]], list[Message | None] | None]:
    """The structural problems of a ``messages`` value, and its messages (None where malformed) if it is a list."""
    if type(messages) is not list:
        return [("missing_messages", f"'messages' must be a list, got {_json_type(messages)}")], None
    problems: list[tuple[DatasetIssueCategory, str]] = []
    typed: list[Message | None] = []
    for k, m in enumerate(messages):
        typed.append(None)
        if type(m) is not dict:
            problems.append(("invalid_message", f"messages[{k}] must be an object, got {_json_type(m)}"))
            continue
        before = len(problems)
        role, content, weight = m.get("role"), m.get("content"), m.get("weight")
        if not isinstance(role, str):
            problems.append(("invalid_message", f"messages[{k}] needs a 'role' string"))
        elif role not in _MESSAGE_TYPES:
            problems.append(("unknown_role", f"messages[{k}].role {role!r} is not system, user, assistant or tool"))
        if "content" not in m:
            problems.append(("invalid_message", f"messages[{k}] needs a 'content'"))
        elif not isinstance(content, str):
            problems.append(
                ("non_string_content", f"messages[{k}].content must be a string, got {_json_type(content)}")
            )
        if weight is not None and (type(weight) is not int or weight not in (0, 1)):
            problems.append(("invalid_message", f"messages[{k}].weight must be 0 or 1, got {weight!r}"))
        if len(problems) == before and isinstance(role, str) and isinstance(content, str):
            typed[-1] = _MESSAGE_TYPES[role](content, weight)
        elif isinstance(content, str) and (not content or content.isspace()):
            problems.append(("empty_content", f"messages[{k}].content is empty"))
    return problems, typed


def _chat_issues(messages: Sequence[Message | None]) -> list[tuple[DatasetIssueCategory, str]]:
    """The problems of decoded messages (None stands for a malformed one, reported already: no order checks)."""
    if not messages:
        return [("empty_messages", "'messages' is empty")]
    problems: list[tuple[DatasetIssueCategory, str]] = []
    known = [m for m in messages if m is not None]
    for k, m in enumerate(messages):
        if m is not None and (not m.content or m.content.isspace()):
            problems.append(("empty_content", f"messages[{k}].content is empty"))
        elif m is not None and _MARKUP.search(m.content):
            problems.append(("chat_markup", _markup_problem(f"messages[{k}].content", m.content)))
    if len(known) == len(messages):
        order = _order_problem(tuple(m.role for m in known))
        if order is not None:
            problems.append(("turn_order", order))
        weights = [m.weight for m in known if isinstance(m, AssistantMessage)]
        if not weights:
            problems.append(("no_assistant", "no assistant message: nothing to train on"))
        elif all(w == 0 for w in weights):
            problems.append(("no_assistant", "every assistant message has weight 0: nothing to train on"))
    return problems


def _markup_problem(where: str, text: str) -> str:
    token = _MARKUP.search(text)
    assert token is not None
    return (
        f"{where} holds {token.group()!r}, a token of the chat markup: the tokenizer reads it as markup, not text "
        "(write it differently, e.g. with a space after '<')"
    )


_FOLLOWS: dict[str, tuple[str | None, ...]] = {
    "system": (None,),
    "user": (None, "system", "assistant"),
    "assistant": ("user", "tool"),
    "tool": ("assistant", "tool"),
}


def _order_problem(roles: tuple[str, ...]) -> str | None:
    """Why a sequence of roles breaks [system] user, assistant, user, ... (tool only after assistant or tool)."""
    previous: str | None = None
    for k, role in enumerate(roles):
        if previous not in _FOLLOWS[role]:
            after = f"after {previous}" if previous else "first"
            expected = " or ".join(r for r, allowed in _FOLLOWS.items() if previous in allowed and r != "system")
            return f"messages[{k}] is {role} {after}; expected {expected}"
        previous = role
    return None
