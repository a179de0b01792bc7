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

from .examples import (
    AnyMessage,
    AssistantMessage,
    ChatExample,
    CompletionExample,
    Example,
    Message,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from .reading import MAX_LINE_BYTES, open_dataset
from .tokens import ApproximateCounter, TokenCounter, TokenizerCounter, counter_for
from .validation import DEFAULT_WORKERS, ParsedDataset, parse, validate

__all__ = [  # noqa: RUF022 -- in reading order, which docs/reference/datasets.md follows
    "DEFAULT_WORKERS",
    "MAX_LINE_BYTES",
    "AnyMessage",
    "Example",
    "Message",
    "SystemMessage",
    "UserMessage",
    "AssistantMessage",
    "ToolMessage",
    "ChatExample",
    "CompletionExample",
    "TokenCounter",
    "ApproximateCounter",
    "TokenizerCounter",
    "ParsedDataset",
    "counter_for",
    "validate",
    "parse",
    "open_dataset",
]
