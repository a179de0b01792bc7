"""The streaming dataset validator: every category with its exact line, formats, token counts, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from conftest import child_env
from phitune import datasets
from phitune.datasets import ApproximateCounter, TokenizerCounter, counter_for, parallel, reading, validate, validation
from phitune.errors import DatasetError, SpecError
from phitune.types import DatasetReport

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "azureml-examples-maas"

USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "Paris."}
GOOD = {"messages": [USER, ASSISTANT]}


def chat(*messages: Any) -> dict[str, Any]:
    return {"messages": list(messages)}


def write(path: Path, lines: list[Any]) -> Path:
    """One line per item: dicts and lists as JSON, str and bytes as they are."""
    with open(path, "wb") as fh:
        for line in lines:
            if isinstance(line, bytes):
                fh.write(line + b"\n")
            elif isinstance(line, str):
                fh.write(line.encode() + b"\n")
            else:
                fh.write(json.dumps(line).encode() + b"\n")
    return path


def found(report: DatasetReport) -> list[tuple[int, str]]:
    return [(issue.line, issue.category) for issue in report.errors]


CATEGORY_CASES: dict[str, tuple[list[Any], list[tuple[int, str]]]] = {
    "invalid_json": ([GOOD, '{"messages": [', GOOD, "not json", GOOD], [(2, "invalid_json"), (4, "invalid_json")]),
    "invalid_utf8": (
        [GOOD, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', chat(USER, {**ASSISTANT, "content": "café"})],
        [(2, "invalid_utf8")],
    ),
    "not_an_object": (
        [GOOD, "[1, 2]", GOOD, '"text"', "3"],
        [(2, "not_an_object"), (4, "not_an_object"), (5, "not_an_object")],
    ),
    "unknown_format": ([{"question": "q", "answer": "a"}, GOOD], [(1, "unknown_format")]),
    "missing_messages": (
        [GOOD, {"conversation": [USER]}, {"messages": None}, {"messages": "hi"}],
        [(2, "missing_messages"), (3, "missing_messages"), (4, "missing_messages")],
    ),
    "empty_messages": ([GOOD, GOOD, {"messages": []}], [(3, "empty_messages")]),
    "invalid_message": (
        [
            GOOD,
            chat(USER, "Paris."),
            chat({"content": "hi"}, ASSISTANT),
            chat(USER, {"role": "assistant"}),
            chat(USER, {**ASSISTANT, "weight": 2}),
        ],
        [(2, "invalid_message"), (3, "invalid_message"), (4, "invalid_message"), (5, "invalid_message")],
    ),
    "unknown_role": ([GOOD, chat({"role": "human", **{"content": "hi"}}, ASSISTANT)], [(2, "unknown_role")]),
    "turn_order": (
        [
            chat(ASSISTANT, USER, ASSISTANT),
            chat(USER, USER, ASSISTANT),
            chat(USER, {"role": "system", "content": "Be brief."}, ASSISTANT),
            chat(USER, {"role": "tool", "content": "{}"}, ASSISTANT),
            chat(USER, ASSISTANT, {"role": "tool", "content": "{}"}, {"role": "tool", "content": "{}"}, ASSISTANT),
        ],
        [(1, "turn_order"), (2, "turn_order"), (3, "turn_order"), (4, "turn_order")],
    ),
    "no_assistant": (
        [GOOD, chat(USER), chat(USER, {**ASSISTANT, "weight": 0}), chat(USER, {**ASSISTANT, "weight": 0}, USER)],
        [(2, "no_assistant"), (3, "no_assistant"), (4, "no_assistant")],
    ),
    "non_string_content": (
        [GOOD, chat(USER, {"role": "assistant", "content": 42}), chat({"role": "user", "content": None}, ASSISTANT)],
        [(2, "non_string_content"), (3, "non_string_content")],
    ),
    "empty_content": (
        [GOOD, chat(USER, {"role": "assistant", "content": ""}), chat({"role": "user", "content": " \n"}, ASSISTANT)],
        [(2, "empty_content"), (3, "empty_content")],
    ),
    "mixed_formats": (
        [GOOD, {"prompt": "p", "completion": "c"}, GOOD, {"text": "t", "ground_truth": "g"}],
        [(2, "mixed_formats"), (4, "mixed_formats")],
    ),
    "chat_markup": (
        [
            GOOD,
            chat(USER, {**ASSISTANT, "content": "Paris.<|end|>"}),
            chat({**USER, "content": "<|assistant|>"}, ASSISTANT),
        ],
        [(2, "chat_markup"), (3, "chat_markup")],
    ),
}


@pytest.mark.parametrize("category", sorted(CATEGORY_CASES))
def test_each_category_names_its_lines(tmp_path: Path, category: str) -> None:
    lines, expected = CATEGORY_CASES[category]
    report = validate(write(tmp_path / "data.jsonl", lines))
    assert found(report) == expected
    assert report.error_count == len(expected)
    assert not report.ok
    assert report.examples == len(lines) - len(expected)


def test_every_problem_of_a_file_in_one_pass(tmp_path: Path) -> None:
    lines: list[Any] = []
    expected: list[tuple[int, str]] = []
    for category in sorted(CATEGORY_CASES):
        if category in ("unknown_format", "mixed_formats"):
            continue  # these depend on the file's first line
        case, issues = CATEGORY_CASES[category]
        expected += [(len(lines) + line, cat) for line, cat in issues]
        lines += case
    report = validate(write(tmp_path / "data.jsonl", [GOOD, *lines]))
    assert found(report) == [(line + 1, cat) for line, cat in expected]


def test_several_problems_on_one_line(tmp_path: Path) -> None:
    line = chat({"role": "bot", "content": ""}, {"role": "assistant", "content": 1}, "x")
    report = validate(write(tmp_path / "data.jsonl", [GOOD, line]))
    assert [issue.category for issue in report.errors] == [
        "unknown_role",
        "empty_content",
        "non_string_content",
        "invalid_message",
    ]
    assert {issue.line for issue in report.errors} == {2}
    assert "messages[1].content" in report.errors[2].message


def test_completion_formats_check_their_fields(tmp_path: Path) -> None:
    lines = [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": "3+3="},
        {"prompt": "4+4=", "completion": 8},
        {"prompt": "5+5=", "completion": ""},
        GOOD,
    ]
    report = validate(write(tmp_path / "pc.jsonl", lines))
    assert report.format == "prompt_completion"
    assert found(report) == [
        (2, "unknown_format"),
        (3, "non_string_content"),
        (4, "empty_content"),
        (5, "mixed_formats"),
    ]
    assert "'completion'" in report.errors[0].message


def test_the_first_well_formed_line_sets_the_format(tmp_path: Path) -> None:
    lines: list[Any] = [chat(USER), "[]", {"prompt": 1, "completion": "c"}, {"prompt": "p", "completion": "c"}, GOOD]
    report = validate(write(tmp_path / "data.jsonl", lines))
    assert report.format == "chat"  # line 1 is well formed, though it has no assistant message
    assert found(report) == [
        (1, "no_assistant"),
        (2, "not_an_object"),
        (3, "mixed_formats"),
        (4, "mixed_formats"),
    ]


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n\r\n")
    for path in (empty, blank):
        report = validate(path)
        assert found(report) == [(0, "empty_file")]
        assert not report.ok and report.examples == 0 and report.format is None


def test_valid_chat_file(tmp_path: Path) -> None:
    lines = [
        chat({"role": "system", "content": "Be brief."}, USER, ASSISTANT),
        {"messages": [USER, {**ASSISTANT, "weight": 0}, USER, {**ASSISTANT, "weight": 1}], "id": 7},
        chat(USER, {"role": "assistant", "content": "Let me look.", "name": "bot"}, {"role": "tool", "content": "{}"}),
        "",
        "   ",
        chat(USER, {"role": "assistant", "content": "Paris, ça va."}),
    ]
    report = validate(write(tmp_path / "chat.jsonl", lines), model="Phi-3-mini-4k-instruct", epochs=3)
    assert report.ok, report.errors
    assert (report.format, report.examples, report.error_count, report.epochs) == ("chat", 4, 0, 3)
    assert report.bytes == (tmp_path / "chat.jsonl").stat().st_size
    assert report.estimated_trained_tokens == 3 * report.tokens.trainable > 0
    assert report.tokens.tokenizer == "approximate" and not report.tokens.exact


def test_crlf_lines_and_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"\r\n".join([json.dumps(GOOD).encode(), b"", b"  ", b"{oops", json.dumps(GOOD).encode()]))
    report = validate(path)
    assert found(report) == [(4, "invalid_json")]
    assert report.examples == 2


def test_valid_prompt_completion_and_text_ground_truth(tmp_path: Path) -> None:
    pc = validate(write(tmp_path / "pc.jsonl", [{"prompt": "", "completion": "Once upon a time"}] * 3))
    assert pc.ok and pc.format == "prompt_completion" and pc.examples == 3
    rows = [{"text": "Summarize: a b c", "ground_truth": "abc", "id": 1}, {"text": "x", "ground_truth": "y"}]
    tg = validate(write(tmp_path / "tg.jsonl", rows))
    assert tg.ok and tg.format == "text_ground_truth" and tg.examples == 2
    assert tg.tokens.trainable == (1 + 1) + (1 + 1)  # each completion's estimate plus eos


def test_too_long_is_an_error_past_the_context_and_a_warning_past_max_seq_length(tmp_path: Path) -> None:
    long = chat(USER, {"role": "assistant", "content": "word " * 2000})  # ~2500 approximate tokens
    medium = chat(USER, {"role": "assistant", "content": "word " * 100})
    path = write(tmp_path / "long.jsonl", [GOOD, long, medium, GOOD])
    report = validate(path, model="tiny-phi3", max_seq_length=64)  # tiny-phi3: 2048-token context
    assert found(report) == [(2, "too_long")]
    assert "2048-token context" in report.errors[0].message
    assert [(w.line, w.category) for w in report.warnings] == [(3, "too_long")]
    assert report.examples == 3
    loose = validate(path, max_seq_length=4096)
    assert loose.ok and not loose.warnings and loose.examples == 4


def test_approximate_counts(tmp_path: Path) -> None:
    lines = [
        chat({"role": "user", "content": "abcdefgh"}, {"role": "assistant", "content": "abcd"}),
        chat({"role": "user", "content": "é"}, {"role": "assistant", "content": "abcde", "weight": 1}),
        {
            "messages": [
                *chat(USER, {**ASSISTANT, "weight": 0})["messages"],
                USER,
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    report = validate(write(tmp_path / "a.jsonl", lines))
    # 1 (eos) + per message ceil(bytes/4) + 4; trainable: assistant content + <|end|>
    first = (1 + (2 + 4) + (1 + 4), 1 + 1)
    second = (1 + (1 + 4) + (2 + 4), 2 + 1)
    third = (1 + (8 + 4) + (2 + 4) + (8 + 4) + (1 + 4), 1 + 1)
    assert report.tokens.total == first[0] + second[0] + third[0]
    assert report.tokens.trainable == first[1] + second[1] + third[1]
    assert (report.tokens.min, report.tokens.max) == (first[0], third[0])


def test_token_statistics_and_p95(tmp_path: Path) -> None:
    lines = [{"prompt": "", "completion": "a" * (4 * k)} for k in range(1, 101)]  # totals k + 1 (eos)
    tokens = validate(write(tmp_path / "p.jsonl", lines)).tokens
    assert (tokens.min, tokens.max, tokens.p95, tokens.total) == (2, 101, 96, sum(range(2, 102)))
    assert tokens.mean == pytest.approx(51.5)
    big = [{"prompt": "", "completion": "a" * (4 * (3000 + 10 * k))} for k in range(100)]  # totals 3001 + 10k
    tokens = validate(write(tmp_path / "big.jsonl", big)).tokens
    exact = 3001 + 10 * 94
    assert exact <= tokens.p95 <= exact * 1.002


@pytest.fixture
def phi3_tokenizer(tmp_path: Path) -> Path:
    """A word-level tokenizer with Phi-3's special tokens, saved as tmp_path/tok/tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "be", "brief", "hello", "there", "hi", "friend", "bye", "see", "you", "2", "+", "=", "4"]
    tokenizer = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, rstrip=True) for t in specials])
    folder = tmp_path / "tok"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_exact_counts_with_a_tokenizer(tmp_path: Path, phi3_tokenizer: Path) -> None:
    conversation = chat(
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi friend"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you", "weight": 0},
    )
    counter = counter_for(phi3_tokenizer)
    assert isinstance(counter, TokenizerCounter) and counter.exact and counter.name == "tok"
    report = validate(write(tmp_path / "c.jsonl", [conversation, conversation]), counter=counter)
    # 5 x (<|role|> + content + <|end|>) + <|endoftext|>: 4 + 4 + 4 + 3 + 4 + 1
    assert (report.tokens.min, report.tokens.max) == (20, 20)
    assert report.tokens.total == 40
    assert report.tokens.trainable == 2 * 3  # "hi friend" + <|end|>; the weight-0 reply trains nothing
    assert report.tokens.tokenizer == "tok" and report.tokens.exact

    pc = validate(write(tmp_path / "pc.jsonl", [{"prompt": "2 + 2 =", "completion": "4"}]), counter=counter)
    assert (pc.tokens.total, pc.tokens.trainable) == (4 + 1 + 1, 1 + 1)  # prompt, completion, eos


@pytest.mark.parametrize("model", ["tiny-phi3", "tiny-phi4-mini", "tiny-phi4", "tiny-phi3.5-moe"])
def test_exact_counts_match_the_trainer(tmp_path: Path, tiny_model_dir: Path, model: str) -> None:
    """The counter agrees token for token with how the trainer encodes, with each model's own tokenizer and chat
    template (Phi-3's, Phi-4-mini's without newlines, Phi-4's ``<|im_start|>`` turns, Phi-3.5-MoE's)."""
    transformers = pytest.importorskip("transformers")
    from phitune.tiny import ensure_tiny
    from phitune.trainer.data import encode_chat, encode_completion

    folder = ensure_tiny(tiny_model_dir.parent, model)

    conversations: list[list[dict[str, Any]]] = [
        [USER, ASSISTANT],
        [{"role": "system", "content": "Answer in French, then stop."}, USER, {**ASSISTANT, "content": "Paris !\n"}],
        [
            USER,
            {**ASSISTANT, "weight": 0},
            {"role": "user", "content": "  And Spain? "},
            {**ASSISTANT, "content": "Madrid"},
        ],
        [{"role": "user", "content": "Écris « bonjour » 三 times"}, {**ASSISTANT, "content": "bonjour ✓✓✓"}],
    ]
    pairs = [("2 + 2 =", " 4"), ("Translate: cat\n", "chat")]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    counter = counter_for(folder)
    assert counter.exact and counter.name == model
    chats = validate(write(tmp_path / "chat.jsonl", [chat(*c) for c in conversations]), counter=counter)
    encoded = [encode_chat(tokenizer, c, max_seq_length=4096) for c in conversations]
    assert chats.tokens.total == sum(len(e.input_ids) for e in encoded)
    assert chats.tokens.trainable == sum(e.trainable_tokens for e in encoded)
    rows = [{"prompt": p, "completion": c} for p, c in pairs]
    completions = validate(write(tmp_path / "pc.jsonl", rows), counter=counter)
    encoded = [encode_completion(tokenizer, p, c, max_seq_length=4096) for p, c in pairs]
    assert completions.tokens.total == sum(len(e.input_ids) for e in encoded)
    assert completions.tokens.trainable == sum(e.trainable_tokens for e in encoded)


def test_counter_for_falls_back_to_the_estimate(tmp_path: Path) -> None:
    assert isinstance(counter_for(None), ApproximateCounter)
    assert isinstance(counter_for(tmp_path), ApproximateCounter)


def test_max_errors_keeps_the_first_and_counts_all(tmp_path: Path) -> None:
    report = validate(write(tmp_path / "bad.jsonl", [GOOD] + ["{"] * 30), max_errors=5)
    assert report.error_count == 30
    assert [issue.line for issue in report.errors] == [2, 3, 4, 5, 6]


def test_invalid_arguments() -> None:
    with pytest.raises(SpecError, match="epochs"):
        validate("unused.jsonl", epochs=0)
    with pytest.raises(SpecError, match="max_seq_length"):
        validate("unused.jsonl", max_seq_length=0)
    with pytest.raises(SpecError, match="workers"):
        validate("unused.jsonl", workers=0)


def test_lines_across_chunks_keep_their_numbers(tmp_path: Path) -> None:
    """Several 256 KiB reads, a line longer than one read, multi-byte characters cut by read boundaries."""
    lines: list[Any] = [chat(USER, {"role": "assistant", "content": f"réponse numéro {i} ✓"}) for i in range(3000)]
    lines[1499] = "{"
    lines[2000] = chat(USER, {"role": "assistant", "content": "é" * 300_000})
    lines[2001] = b'{"messages": [{"role": "user", "content": "\xff"}]}'
    lines[2998] = chat(USER)
    report = validate(write(tmp_path / "big.jsonl", lines))
    assert found(report) == [(1500, "invalid_json"), (2002, "invalid_utf8"), (2999, "no_assistant")]
    assert report.examples == 2997


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Reads of 256 bytes and parallel ranges of about 2 KiB, whatever the file's size; collects each split."""
    monkeypatch.setattr(reading, "_CHUNK_BYTES", 256)
    monkeypatch.setattr(parallel, "_PIECE_BYTES", 2048)
    monkeypatch.setattr(validation, "_PARALLEL_MIN_BYTES", 0)
    splits: list[list[int]] = []
    line_starts = parallel._line_starts

    def spy(*args: Any) -> list[int]:
        splits.append(line_starts(*args))
        return splits[-1]

    monkeypatch.setattr(parallel, "_line_starts", spy)
    return splits


def problem_file(path: Path) -> tuple[Path, list[tuple[int, str]], list[int]]:
    """About 100 KiB of chat lines with a problem every few lines; the (line, category) of each error, and the lines
    longer than 100 (approximate) tokens."""
    problems: list[tuple[Any, str | None]] = [
        ("{oops", "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
        (chat(ASSISTANT, USER, ASSISTANT), "turn_order"),
        (chat(USER, {"role": "assistant", "content": " "}), "empty_content"),
        ({"prompt": "p", "completion": "c"}, "mixed_formats"),
        (chat(USER), "no_assistant"),
        (chat(USER, {"role": "assistant", "content": "word " * 2000}), "too_long"),  # longer than a read too
        (chat(USER, {"role": "assistant", "content": "word " * 100}), "warning"),
        ("", None),
        (chat(USER, {**ASSISTANT, "weight": 0}, USER, {"role": "assistant", "content": "Ça va ✓\n"}), None),
    ]
    lines: list[Any] = ["[1]", {"question": "q"}]  # the format is set by line 3
    expected = [(1, "not_an_object"), (2, "unknown_format")]
    warned: list[int] = []
    for i in range(300):
        if i % 7 == 3:
            line, category = problems[(i // 7) % len(problems)]
            lines.append(line)
            if category == "warning":
                warned.append(len(lines))
            elif category:
                expected.append((len(lines), category))
        else:
            lines.append(chat(USER, {"role": "assistant", "content": f"réponse {i}" + " très bien" * (i % 13)}))
    write(path, lines)
    with open(path, "ab") as fh:  # a CRLF line, and a last line without its newline
        fh.write(json.dumps(GOOD).encode() + b"\r\n" + json.dumps(GOOD).encode())
    return path, expected, warned


@pytest.mark.parametrize("max_errors", [1000, 5])
def test_parallel_report_is_the_serial_one(tmp_path: Path, small_ranges: list[list[int]], max_errors: int) -> None:
    path, expected, warned = problem_file(tmp_path / "data.jsonl")
    options: dict[str, Any] = {"model": "tiny-phi3", "max_seq_length": 100, "max_errors": max_errors}
    serial = validate(path, workers=1, **options)
    assert not small_ranges
    assert found(serial) == expected[:max_errors]
    assert serial.error_count == len(expected)
    assert [warning.line for warning in serial.warnings] == warned[:max_errors]
    for workers in (2, 3, None):  # None: one per CPU
        assert validate(path, workers=workers, **options) == serial
    data = path.read_bytes()
    for bounds in small_ranges:
        assert len(bounds) > 2 * 3 and bounds[-1] == len(data)
        assert all(data[start - 1 : start] == b"\n" for start in bounds[:-1])


def test_parallel_without_a_well_formed_line(tmp_path: Path, small_ranges: list[list[int]]) -> None:
    path = write(tmp_path / "bad.jsonl", ["{", "[]", {"question": "q"}] * 200)
    serial = validate(path, workers=1)
    assert serial.format is None and serial.error_count == 600
    assert validate(path, workers=2) == serial
    assert not small_ranges  # one process read the whole file, looking for its format


def test_parallel_with_an_exact_counter(tmp_path: Path, small_ranges: list[list[int]], phi3_tokenizer: Path) -> None:
    lines = [
        chat({"role": "user", "content": "hello there " * (i % 5 + 1)}, {**ASSISTANT, "content": "hi"})
        for i in range(400)
    ]
    path = write(tmp_path / "c.jsonl", [chat(USER), *lines, "{"])
    counter = counter_for(phi3_tokenizer)
    serial = validate(path, counter=counter)
    assert serial.tokens.exact and serial.examples == 400
    assert validate(path, counter=counter, workers=2) == serial
    assert small_ranges


def test_memory_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "large.jsonl"
    line = json.dumps(chat({"role": "system", "content": "Be brief. " * 20}, USER, {**ASSISTANT, "content": "x" * 800}))
    with open(path, "w") as fh:
        fh.writelines(line + "\n" for _ in range(8000))
    size = path.stat().st_size
    assert size > 8_000_000
    tracemalloc.start()
    try:
        report = validate(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.examples == 8000
    assert peak < 3_000_000, f"peak {peak} bytes for a {size}-byte file"


OK_LINE = json.dumps(GOOD)
DISPUTED_LINES = {
    "carriage return as JSON whitespace": OK_LINE.replace(", ", ",\r"),
    "end of turn inside assistant content": json.dumps(chat(USER, {**ASSISTANT, "content": "Paris.<|end|> Lyon."})),
    "a 5,000-digit integer in an extra key": '{"id": ' + "7" * 5000 + ", " + OK_LINE[1:],
    "a number beyond double range in an extra key": '{"score": 1e400, ' + OK_LINE[1:],
    "1,000 nested brackets": '{"meta": ' + "[" * 1000 + "]" * 1000 + ", " + OK_LINE[1:],
    "a prompt with the end-of-text token": json.dumps({"prompt": "Say <|endoftext|>", "completion": " ok"}),
}


@pytest.mark.parametrize("first", [True, False], ids=["on line 1", "after a good line"])
@pytest.mark.parametrize("case", list(DISPUTED_LINES))
def test_the_validator_and_the_trainer_agree_on_every_line(
    tmp_path: Path, tiny_model_dir: Path, case: str, first: bool
) -> None:
    """Lines that are easy to read two ways (a bare carriage return, markup in a text, numbers beyond double range,
    deep nesting): the validator and the trainer read a line through one parse, so both accept it or both refuse
    it, wherever it stands in the file."""
    pytest.importorskip("transformers")
    from phitune.trainer.data import load_examples
    from phitune.trainer.model import load_tokenizer

    line = DISPUTED_LINES[case]
    lines = [line, line] if line.startswith('{"prompt"') else ([line, OK_LINE] if first else [OK_LINE, line])
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = validate(path)
    try:
        load_examples(path, load_tokenizer(str(tiny_model_dir)), max_seq_length=256)
        trained = True
    except DatasetError:
        trained = False
    assert report.ok == trained, (report.errors, trained)


def test_deep_nesting_is_an_invalid_line_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path / "deep.jsonl", [GOOD, "[" * 1000 + "]" * 1000, '{"messages": ' + "[" * 5000])
    assert found(validate(path)) == [(2, "invalid_json"), (3, "invalid_json")]


def test_a_line_over_the_limit_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """A line of 48 MiB (three times the most a line may hold) is refused without being held whole: the validator's
    memory stays within two lines' limit, whatever the line's length."""
    path = tmp_path / "one-long-line.jsonl"
    with open(path, "wb") as fh:
        fh.write(json.dumps(GOOD).encode() + b"\n")
        fh.write(b'{"messages": "' + b"x" * (3 * datasets.MAX_LINE_BYTES) + b'"}\n')
        fh.write(json.dumps(GOOD).encode() + b"\n")
    tracemalloc.start()
    try:
        report = validate(path, workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found(report) == [(2, "too_long")] and report.examples == 2
    assert peak < 2 * datasets.MAX_LINE_BYTES, peak


_VALIDATE = "import sys; from phitune.datasets import validate; validate(sys.argv[1])"


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_special_files_are_refused_before_anything_is_read(tmp_path: Path, kind: str) -> None:
    """Anything but a regular file is a DatasetError (not_a_file) before a byte is read: a FIFO without a writer
    would block a read forever, ``/dev/zero`` never ends. The check runs in a child process, so that a hang would hang
    only the child, which the test then stops."""
    path = {"fifo": tmp_path / "fifo", "device": Path("/dev/zero"), "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    done = subprocess.run(
        [sys.executable, "-c", _VALIDATE, str(path)], capture_output=True, text=True, timeout=600, env=child_env()
    )
    assert done.returncode == 1 and "DatasetError" in done.stderr and "[not_a_file]" in done.stderr, done.stderr


def test_a_killed_validation_takes_its_processes_along(tmp_path: Path) -> None:
    """A file over 32 MiB is checked by forked processes; when the process that asked is killed (an upload client
    gone), they die with it rather than wait forever."""
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "large.jsonl"
    line = json.dumps(chat({"role": "system", "content": "Be brief. " * 40}, USER, {**ASSISTANT, "content": "x" * 600}))
    with open(path, "w") as fh:
        fh.writelines(line + "\n" for _ in range((40 << 20) // len(line)))
    code = "import sys; from phitune.datasets import validate; validate(sys.argv[1], workers=2)"
    asking = subprocess.Popen([sys.executable, "-c", code, str(path)], env=child_env())
    parent = psutil.Process(asking.pid)
    deadline = time.monotonic() + 600
    while not (helpers := parent.children()) and asking.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert helpers, "the validation ended before its processes could be seen"
    asking.kill()
    asking.wait()
    _, alive = psutil.wait_procs(helpers, timeout=120)
    alive = [process for process in alive if not _dead(psutil, process)]  # an unreaped zombie has exited
    for process in alive:
        process.kill()
    assert alive == [], "validation processes outlived the process that started them"


def _dead(psutil: Any, process: Any) -> bool:
    """Exited: gone, or a zombie that its new parent (a container's init may never reap) has not collected."""
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_import_is_light() -> None:
    code = "import sys, phitune.datasets; print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("chat-completion_train.jsonl", "chat"),
        ("chat-completion_validation.jsonl", "chat"),
        ("text-generation_train.jsonl", "text_ground_truth"),
        ("text-generation_validation.jsonl", "text_ground_truth"),
    ],
)
def test_azureml_example_data_is_valid(name: str, fmt: str) -> None:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data absent: {path}")
    report = validate(path, model="Phi-3-mini-4k-instruct")
    assert report.ok, report.errors[:5]
    assert report.format == fmt and report.examples > 0
    assert report.tokens.max <= 4096
