"""A model's own chat template, rendered without transformers: the validator counts tokens as the trainer encodes.

The trainer renders chat examples with ``tokenizer.apply_chat_template``; :class:`ChatTemplate` renders the same
template from a tokenizer folder's ``tokenizer_config.json`` with jinja2's sandbox, configured as transformers
configures it, so that the validator's token counts are the trainer's. ``jinja2`` is imported at first use.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>")
"""The tokens that close a chat turn in the Phi family's templates: Phi-3's, Phi-3.5's and Phi-4-mini's, Phi-4's."""


class ChatTemplate:
    """The chat template of a tokenizer folder, with the special tokens its rendering may name."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source = source
        self.special_tokens = special_tokens

    @classmethod
    def of(cls, tokenizer_dir: str | os.PathLike[str]) -> ChatTemplate | None:
        """The template in ``tokenizer_dir/tokenizer_config.json`` (or its ``chat_template.jinja``), or None where
        the folder has none."""
        folder = Path(tokenizer_dir)
        config_file = folder / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        source = config.get("chat_template")
        if not isinstance(source, str) and (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(source, str):
            return None
        special = {key: _content(value) for key, value in config.items() if key.endswith("_token")}
        return cls(source, {key: value for key, value in special.items() if value is not None})

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The text ``apply_chat_template(messages, tokenize=False)`` gives."""
        rendered: str = _compiled(self.source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )
        return rendered

    @property
    def assistant_prompt(self) -> str:
        """What the generation prompt adds: the text before an assistant message's content."""
        return self.render([], add_generation_prompt=True)


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with its content."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


@functools.cache
def _compiled(source: str) -> Any:
    """The template compiled as transformers compiles chat templates (sandboxed, trimmed blocks, loop controls)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)
