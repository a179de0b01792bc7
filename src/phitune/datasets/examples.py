"""A dataset line as typed examples (msgspec structs, one class per chat role) and the decoder of each format."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import msgspec

from ..types import DatasetFormat


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
