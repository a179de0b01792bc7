"""Chat generation's bounds on a real model (tiny-phi3): generations take turns, the context bounds each request,
and a deadline ends one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")

from phitune.engines import torch_engine
from phitune.engines.torch_engine import Generation, ModelPool, ServedModel, token_budget
from phitune.errors import SpecError

QUESTION = [{"role": "user", "content": "What do bees make?"}]
GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": 0}


@pytest.fixture
def pool() -> ModelPool:
    return ModelPool()


@pytest.fixture
def served(tiny_model_dir: Path) -> ServedModel:
    return ServedModel("tiny-phi3", str(tiny_model_dir))


@pytest.fixture
def never_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """No token ends a generation: each runs to its limit."""
    monkeypatch.setattr(torch_engine, "_stop_ids", lambda model, tokenizer: set())


def test_a_short_generation_is_not_held_up_by_a_long_one(
    pool: ModelPool, served: ServedModel, never_stops: None
) -> None:
    """While a 400-token generation runs, a 3-token one asked later finishes first: the pool is shared a token at
    a time, in the order asked."""
    long: Iterator[str | Generation] = pool.stream(served, QUESTION, max_tokens=400, **GREEDY)
    made = [next(long)]
    done = threading.Event()

    def short() -> None:
        result = pool.generate(served, QUESTION, max_tokens=3, **GREEDY)
        assert result.completion_tokens == 3
        done.set()

    thread = threading.Thread(target=short)
    thread.start()
    while not done.is_set():  # the long generation keeps going, a token per turn
        piece = next(long, None)
        assert piece is not None and not isinstance(piece, Generation), "the long generation ended first"
        made.append(piece)
    thread.join()
    long.close()  # a consumer that stops reading stops the generation


def test_a_generation_ends_at_its_deadline(pool: ModelPool, served: ServedModel, never_stops: None) -> None:
    result = pool.generate(served, QUESTION, max_tokens=50, deadline=time.monotonic(), **GREEDY)
    assert result.completion_tokens == 0 and result.finish_reason == "length"


def test_the_context_bounds_every_request(pool: ModelPool, served: ServedModel) -> None:
    with pytest.raises(SpecError) as asked_too_much:
        pool.generate(served, QUESTION, max_tokens=10**9, **GREEDY)
    assert asked_too_much.value.field == "max_tokens" and "2048-token context" in asked_too_much.value.message
    with pytest.raises(SpecError) as too_long:
        pool.generate(served, [{"role": "user", "content": "bees " * 9000}], max_tokens=10, **GREEDY)
    assert too_long.value.field == "messages" and "the model's context is 2048 tokens" in too_long.value.message


def test_the_default_budget_fits_what_the_context_leaves() -> None:
    assert token_budget(10, None, 2048) == torch_engine.DEFAULT_MAX_TOKENS
    assert token_budget(2040, None, 2048) == 8
    assert token_budget(2040, 8, 2048) == 8
    assert token_budget(10, None, None) == torch_engine.DEFAULT_MAX_TOKENS
    with pytest.raises(SpecError):
        token_budget(2048, None, 2048)
