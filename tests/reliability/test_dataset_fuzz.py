"""Malformed datasets, generated: the validator answers every file with a report (never a crash, never a hang), and
the trainer takes exactly the files the validator accepts, with as many examples."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Row
from phitune.datasets import parse, validate
from phitune.errors import DatasetError

pytestmark = pytest.mark.reliability

PIECES = ["a", "Z", " ", "\n", "\t", "\r", "\u00a0", "\u2028", "\u200b", "é", "三", "🐝", "\x00", "\x1b", '"', "\\"]
MARKUP = ["<|", "|>", "<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>", "{", "["]
TEXT = st.lists(st.sampled_from([*PIECES, *MARKUP]), max_size=10).map("".join)
SOME_TEXT = TEXT.filter(lambda text: text.strip() != "")
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "human", "", 3])
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE, "content": st.one_of(TEXT, st.none(), st.integers(), st.lists(TEXT, max_size=2))},
    optional={"weight": st.sampled_from([0, 1, 2, 0.5, None, "1"]), "name": TEXT},
)
TURNS = st.lists(st.tuples(SOME_TEXT, SOME_TEXT), min_size=1, max_size=2).map(
    lambda turns: [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
)
RECORD = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(TURNS, st.lists(MESSAGE, max_size=5))}),
    st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT}),
    st.fixed_dictionaries({"text": TEXT, "ground_truth": TEXT}),
    st.dictionaries(st.sampled_from(["messages", "prompt", "input", "id"]), st.one_of(TEXT, st.integers()), max_size=3),
)
BREAKS = ["keep", "keep", "cut", "insert", "nest", "huge", "constant", "bytes", "bom", "cr"]


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    """A record's JSON line, kept or broken: cut short, a byte inserted, nested deep, a huge number or a non-JSON
    constant in an extra key, invalid UTF-8, a byte-order mark, a bare carriage return as whitespace."""
    line = json.dumps(draw(RECORD)).encode()
    how = draw(st.sampled_from(BREAKS))
    if how == "cut":
        return line[: draw(st.integers(0, len(line) - 1))]
    if how == "insert":
        at = draw(st.integers(0, len(line)))
        return line[:at] + draw(st.binary(min_size=1, max_size=2)) + line[at:]
    if how == "nest":
        depth = draw(st.sampled_from([10, 500, 1000, 5000]))
        return b'{"meta": ' + b"[" * depth + b"]" * depth + b", " + line[1:]
    if how == "huge":
        return b'{"id": ' + draw(st.sampled_from([b"9" * 5000, b"1e400", b"-0", b"1" * 30])) + b", " + line[1:]
    if how == "constant":
        return b'{"id": NaN, ' + line[1:]
    if how == "bytes":
        return line.replace(b"a", b"\xff\xfe", 1)
    if how == "bom":
        return b"\xef\xbb\xbf" + line
    if how == "cr":
        return line.replace(b", ", b",\r", 1)
    return line


@st.composite
def files(draw: st.DrawFn) -> bytes:
    """Up to six lines, ended by LF or CRLF, with or without a last newline."""
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    content = newline.join(draw(st.lists(lines(), max_size=6)))
    return content + (newline if draw(st.booleans()) else b"")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from phitune.trainer.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_the_validator_and_the_trainer_agree_on_generated_files(tokenizer: Any, ledger: Callable[[str], Row]) -> None:
    from phitune.trainer.data import load_examples

    row = ledger("datasets: generated malformed files (validator vs trainer)")
    folder = Path(tempfile.mkdtemp(prefix="phitune-fuzz-"))

    @settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(content=files())
    def check(content: bytes) -> None:
        path = folder / "data.jsonl"
        path.write_bytes(content)
        row.tried += 1
        report = validate(path)
        parsed = parse(path)
        try:
            trained = len(load_examples(path, tokenizer, max_seq_length=4096))
        except DatasetError:
            trained = None
        agreed = (trained is not None) == report.ok and parsed.report.ok == report.ok
        if report.ok:
            agreed = agreed and trained == report.examples == len(parsed.examples)
        if not agreed:
            row.lost += 1
        assert agreed, (content, report.errors[:3], trained)
        row.survived += 1

    check()
