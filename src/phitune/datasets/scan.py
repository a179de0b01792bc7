"""One validation pass over consecutive lines: each line checked and counted, and the report of what was found."""

from __future__ import annotations

import json
from collections.abc import Callable
from io import FileIO
from typing import NamedTuple

import msgspec

from ..types import DatasetFormat, DatasetIssue, DatasetIssueCategory, DatasetReport, TokenStats
from .checks import (
    _MARKUP,
    _chat_issues,
    _chat_structure,
    _detect,
    _is_utf8,
    _json_type,
    _markup_problem,
    _order_problem,
)
from .examples import (
    _DECODERS,
    _FORMAT_KEYS,
    AssistantMessage,
    ChatExample,
    CompletionExample,
    Example,
    Message,
    _decode_any,
)
from .reading import MAX_LINE_BYTES, _chunks
from .tally import _Issue, _Tally
from .tokens import TokenCounter

_ROLE_CACHE_SIZE = 4096
"""Distinct role sequences whose verdict is remembered (a dataset has few; the bound keeps memory fixed)."""


def _scan_all(scan: _Scan, file: FileIO) -> int:
    """Feed the rest of ``file`` to ``scan``; returns where the file ended."""
    for data, end in _chunks(file):
        scan.feed(data, end)
    return file.tell()


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
