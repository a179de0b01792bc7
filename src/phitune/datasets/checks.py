"""What is wrong with a line that does not parse as a well-formed example: its JSON, its format's keys, its
messages, their order and the chat markup in its texts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..types import DatasetFormat, DatasetIssueCategory
from .examples import _FORMAT_KEYS, _MESSAGE_TYPES, AssistantMessage, Message

_MARKUP = re.compile(r"<\|/?[A-Za-z0-9_]+\|>")
"""A token of the Phi chat markup (``<|user|>``, ``<|end|>``, ``<|endoftext|>``, ``<|placeholder1|>``, ...)."""


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
