"""A :class:`~phitune.types.JobSpec` from flat keyword options, with errors that name the option to change.

Shared by the fine-tuning resource and the OpenAI wire shapes (:mod:`phitune.openai_shapes`).
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from typing import Any

import pydantic
from pydantic import BaseModel
from pydantic_core import ErrorDetails

from .errors import SpecError
from .types import PEFT, JobSpec


def build_spec(**fields: Any) -> JobSpec:
    """A :class:`JobSpec` from keyword arguments; any invalid or unknown option raises SpecError naming it (an
    unknown one with the closest known name, where one is close)."""
    try:
        return JobSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    except pydantic.ValidationError as exc:
        problems = [(_dotted(error["loc"]), _problem(error)) for error in exc.errors()]
        (field, first), rest = problems[0], problems[1:]
        raise SpecError(field, "; ".join([first, *(f"{name}: {message}" for name, message in rest)])) from None


def _dotted(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the dotted name of the option (validator frames left out)."""
    return ".".join(str(part) for part in loc if not str(part).startswith("function-")) or "spec"


def _problem(error: ErrorDetails) -> str:
    """What is wrong, without the field's name; for an unknown field, the known name it is closest to."""
    if error["type"] != "extra_forbidden":
        return error["msg"].removeprefix("Value error, ")
    *parents, name = error["loc"]
    close = difflib.get_close_matches(str(name), _field_names(JobSpec, parents), n=1)
    return f"unknown field; did you mean {close[0]!r}?" if close else "unknown field"


def _field_names(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The field names of the model at ``loc`` inside ``model`` (a discriminated union's member by its tag)."""
    candidates = [model]
    for part in loc:
        for candidate in candidates:
            if str(part) in candidate.model_fields:
                candidates = _models_in(candidate.model_fields[str(part)].annotation)
                break
        else:  # a tag of a discriminated union, e.g. ("method", "lora", ...)
            candidates = [c for c in candidates if getattr(c.model_fields.get("type"), "default", None) == part]
    return sorted({name for candidate in candidates for name in candidate.model_fields})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation names (through Optional, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _models_in(argument)]


def peft_config(method: PEFT) -> Any:
    """Validate a peft config dict and build it (errors name the offending key)."""
    import peft

    try:
        config = peft.PeftConfig.from_peft_type(**{"task_type": "CAUSAL_LM", **method.config})
    except (TypeError, ValueError, KeyError) as exc:
        raise SpecError("method.config", f"not a valid peft config: {exc}") from exc
    return config
