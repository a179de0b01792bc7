"""Chat generation for local models: one loaded base per base model, adapters switched on it by name.

Generations share a pool in turns of one token, granted in the order they were asked for, so a long generation
never holds up a short one. Every generation is bounded: the prompt and ``max_tokens`` must fit the model's context
(a :class:`~phitune.errors.SpecError` naming the limit otherwise), a deadline stops it, and a consumer that stops
reading (closes the generator) stops it at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import DynamicCache

from ..chat_template import END_OF_TURN_TOKENS
from ..errors import SpecError
from ..trainer.model import load_tokenizer

DEFAULT_MAX_TOKENS = 256
"""What a request that names no ``max_tokens`` may generate (less where the context leaves less)."""


@dataclass(frozen=True)
class ServedModel:
    """What to load for a model id: a base folder/hub id, plus an adapter folder for LoRA-style fine-tunes."""

    model_id: str
    base_path: str
    adapter_path: str | None = None


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


def token_budget(prompt_tokens: int, max_tokens: int | None, context: int | None) -> int:
    """How many tokens a generation may make: ``max_tokens`` (None: up to :data:`DEFAULT_MAX_TOKENS`) within what
    the model's ``context`` leaves after the prompt; a :class:`~phitune.errors.SpecError` where the prompt fills the
    context or ``max_tokens`` asks for more than it leaves."""
    if context is None:
        return max_tokens or DEFAULT_MAX_TOKENS
    room = context - prompt_tokens
    if room <= 0:
        raise SpecError(
            "messages",
            f"the messages take {prompt_tokens} tokens, and the model's context is {context} tokens: nothing is left "
            "to generate; shorten them",
        )
    if max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if max_tokens > room:
        raise SpecError(
            "max_tokens",
            f"{max_tokens} is more than the model's {context}-token context leaves after the {prompt_tokens} tokens "
            f"of the messages: at most {room}",
        )
    return max_tokens


class Turns:
    """A lock granted in the order it was asked for (Python's own lock lets a thread that releases it take it again
    at once): generations that take it for one token at a time progress side by side."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._queue: deque[object] = deque()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            self._changed.wait_for(lambda: self._queue[0] is ticket)
        try:
            yield
        finally:
            with self._changed:
                self._queue.popleft()
                self._changed.notify_all()


class ModelPool:
    """Loaded models of one process. Several adapters on one base share a single copy of the base weights."""

    def __init__(self) -> None:
        self._turn = Turns()
        self._bases: dict[str, tuple[Any, Any]] = {}  # base path -> (model or PeftModel, tokenizer)
        self._adapters: dict[str, set[str]] = {}  # base path -> adapter names loaded on it

    def _load(self, served: ServedModel) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM

        from ..trainer.model import register_architectures

        register_architectures()
        if served.base_path not in self._bases:
            model = AutoModelForCausalLM.from_pretrained(served.base_path, dtype=torch.float32)
            model.eval()
            self._bases[served.base_path] = (model, load_tokenizer(served.base_path))
            self._adapters[served.base_path] = set()
        model, tokenizer = self._bases[served.base_path]
        if served.adapter_path is not None:
            name = _adapter_name(served.model_id)
            if name not in self._adapters[served.base_path]:
                from peft import PeftModel

                if isinstance(model, PeftModel):
                    model.load_adapter(served.adapter_path, adapter_name=name)
                else:
                    model = PeftModel.from_pretrained(model, served.adapter_path, adapter_name=name)
                    model.eval()
                    self._bases[served.base_path] = (model, tokenizer)
                self._adapters[served.base_path].add(name)
        return model, tokenizer

    def stream(
        self,
        served: ServedModel,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int | None,
        deadline: float | None = None,
    ) -> Iterator[str | Generation]:
        """Yield text pieces as they are generated, then one final :class:`Generation`. ``max_tokens`` is checked
        against the context (:func:`token_budget`); at ``deadline`` (a ``time.monotonic()`` value) the generation
        ends with ``finish_reason`` ``"length"``."""
        with self._turn():
            model, tokenizer = self._load(served)
            prompt = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            prompt_ids: list[int] = list(prompt["input_ids"])
            stop_ids = _stop_ids(model, tokenizer)
            budget = token_budget(len(prompt_ids), max_tokens, getattr(model.config, "max_position_embeddings", None))
            cache = DynamicCache(config=model.config)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        out_ids: list[int] = []
        finish: Literal["stop", "length"] = "length"
        emitted = ""
        inputs = torch.tensor([prompt_ids])
        for _ in range(budget):
            if deadline is not None and time.monotonic() >= deadline:
                break
            with self._turn():
                model = self._bases[served.base_path][0]  # wrapped in a PeftModel since, perhaps, by another adapter
                with _active_adapter(model, served), torch.no_grad():
                    logits = model(input_ids=inputs, cache=cache, use_cache=True).logits[0, -1].float()
            next_id = _pick(logits, temperature, top_p, generator)
            if next_id in stop_ids:
                finish = "stop"
                break
            out_ids.append(next_id)
            text = tokenizer.decode(out_ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(emitted) :]
                emitted = text
            inputs = torch.tensor([[next_id]])
        final = tokenizer.decode(out_ids, skip_special_tokens=True)
        if len(final) > len(emitted):
            yield final[len(emitted) :]
        yield Generation(final, len(prompt_ids), len(out_ids), finish)

    def generate(self, served: ServedModel, messages: list[dict[str, str]], **options: Any) -> Generation:
        """Generate a whole reply."""
        for piece in self.stream(served, messages, **options):
            if isinstance(piece, Generation):
                return piece
        raise RuntimeError("generation ended without a result")  # pragma: no cover


def _adapter_name(model_id: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in model_id)


class _active_adapter:
    """Select the adapter of ``served`` on a PeftModel, or disable adapters to run the bare base."""

    def __init__(self, model: Any, served: ServedModel) -> None:
        self.model = model
        self.served = served
        self._disabled: Any = None

    def __enter__(self) -> None:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return
        if self.served.adapter_path is None:
            self._disabled = self.model.disable_adapter()
            self._disabled.__enter__()
        else:
            self.model.set_adapter(_adapter_name(self.served.model_id))

    def __exit__(self, *exc: object) -> None:
        if self._disabled is not None:
            self._disabled.__exit__(*exc)


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(eos)
    for token in (*END_OF_TURN_TOKENS, tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
