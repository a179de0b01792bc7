"""The built-in tiny-phi3 model and the encoding of training data (assistant-only loss, completions, collation)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from phitune.errors import DatasetError, SpecError  # noqa: E402
from phitune.tiny import PHI3_CHAT_TEMPLATE, TINY_CONFIG, ensure_tiny_phi3  # noqa: E402
from phitune.trainer import data  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "src" / "phitune" / "assets" / "tiny_corpus.txt"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")

CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Blue light is scattered more than red light."},
    {"role": "user", "content": "And at sunset?"},
    {"role": "assistant", "content": "The light passes through more air, so the sky turns orange and red."},
]

# Phi-3's template with the assistant content and its <|end|> inside {% generation %} tags.
GENERATION_TEMPLATE = PHI3_CHAT_TEMPLATE.replace(
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
    "{{'<|assistant|>\n'}}{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}{{'\n'}}",
)


def _variant(folder: Path, old: str, new: str) -> Any:
    """A fresh tokenizer whose chat template has ``old`` replaced by ``new``."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert old in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(old, new)
    return tokenizer


def _labelled_spans(tokenizer: Any, example: data.Example) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    spans: list[list[int]] = []
    previous = data.IGNORE_INDEX
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != data.IGNORE_INDEX:
            assert label == token
            if previous == data.IGNORE_INDEX:
                spans.append([])
            spans[-1].append(token)
        previous = label
    return [tokenizer.decode(span) for span in spans]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_phi3(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tokenizer(tiny_phi3: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_phi3)


@pytest.fixture(scope="module")
def concurrent_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[subprocess.CompletedProcess[str]]]:
    """Two fresh processes building into the same empty folder at the same time."""
    cache = tmp_path_factory.mktemp("race")
    (cache / ".tiny-phi3-killed").mkdir()  # what a build killed half-way leaves behind
    code = "import sys; from pathlib import Path; from phitune.tiny import ensure_tiny_phi3\n"
    code += "print(ensure_tiny_phi3(Path(sys.argv[1])))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return cache, results


# ---------------------------------------------------------------------------------------------------- the model
def test_concurrent_builds_share_one_folder(
    concurrent_build: tuple[Path, list[subprocess.CompletedProcess[str]]],
) -> None:
    # A second build would fail to rename its staging folder onto the non-empty target, so two successes mean one
    # build; no staging folder is left behind, not even the killed build's.
    cache, results = concurrent_build
    for result in results:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == str(cache / "tiny-phi3")  # libraries may log above it
    assert sorted(p.name for p in cache.iterdir()) == [".tiny-phi3.lock", "tiny-phi3"]


def test_build_is_deterministic(
    tiny_phi3: Path, concurrent_build: tuple[Path, list[subprocess.CompletedProcess[str]]]
) -> None:
    other = concurrent_build[0] / "tiny-phi3"
    assert other != tiny_phi3
    digests = _digests(tiny_phi3)
    assert set(digests) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert _digests(other) == digests
    assert ensure_tiny_phi3(tiny_phi3.parent) == tiny_phi3  # later calls just return the folder


def test_model_loads_and_runs(tiny_phi3: Path, tokenizer: Any) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)
    assert type(model).__name__ == "Phi3ForCausalLM"
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers) == (
        TINY_CONFIG["hidden_size"],
        TINY_CONFIG["num_hidden_layers"],
    )
    assert config.vocab_size == len(tokenizer)
    assert not config.tie_word_embeddings
    assert hasattr(model.model.layers[0].self_attn, "qkv_proj") and hasattr(model.model.layers[0].mlp, "gate_up_proj")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    end_ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|end|>"])
    assert model.generation_config.eos_token_id == end_ids
    ids = tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tokenizer_special_tokens(tokenizer: Any) -> None:
    ids = [tokenizer.encode(token, add_special_tokens=False) for token in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(SPECIAL_TOKENS)
    assert [tokenizer.convert_ids_to_tokens(i[0]) for i in ids] == list(SPECIAL_TOKENS)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<unk>",
    )
    assert tokenizer.encode("Hello there", add_special_tokens=True) == tokenizer.encode(
        "Hello there", add_special_tokens=False
    )
    assert 1000 <= len(tokenizer) <= 2100


def test_tokenizer_round_trips_and_compresses(tokenizer: Any) -> None:
    text = CORPUS.read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(text) / len(ids) >= 3.0
    odd = "naïve café — 東京 🙂\n\tindented  spaces <|end|> and  trailing "
    assert tokenizer.decode(tokenizer.encode(odd, add_special_tokens=False)) == odd


def test_chat_template_is_phi3(tokenizer: Any) -> None:
    assert tokenizer.chat_template == PHI3_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(CHAT[:3], tokenize=False) == (
        "<|system|>\nYou answer in one short sentence.<|end|>\n"
        "<|user|>\nWhy is the sky blue?<|end|>\n"
        "<|assistant|>\nBlue light is scattered more than red light.<|end|>\n"
        "<|endoftext|>"
    )
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nWhy is the sky blue?<|end|>\n<|assistant|>\n")


# ------------------------------------------------------------------------------------------------- chat encoding
def test_loss_only_on_assistant_content_and_end(tokenizer: Any) -> None:
    example = data.encode_chat(tokenizer, CHAT, max_seq_length=1024)
    assert example.input_ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert _labelled_spans(tokenizer, example) == [CHAT[2]["content"] + "<|end|>", CHAT[4]["content"] + "<|end|>"]
    end = data.end_of_turn_id(tokenizer)
    assert end == tokenizer.convert_tokens_to_ids("<|end|>")
    ends = [label for token, label in zip(example.input_ids, example.labels, strict=True) if token == end]
    assert ends == [data.IGNORE_INDEX, data.IGNORE_INDEX, end, data.IGNORE_INDEX, end]  # system, user, ...
    assert example.trainable_tokens == sum(
        len(tokenizer.encode(s, add_special_tokens=False)) for s in _labelled_spans(tokenizer, example)
    )


def test_weight_zero_turns_carry_no_loss(tokenizer: Any) -> None:
    chat = [dict(m) for m in CHAT]
    chat[2]["weight"] = 0
    example = data.encode_chat(tokenizer, chat, max_seq_length=1024)
    assert _labelled_spans(tokenizer, example) == [CHAT[4]["content"] + "<|end|>"]
    chat[4]["weight"] = 0
    with pytest.raises(data.ExampleError, match="no assistant message carries loss") as caught:
        data.encode_chat(tokenizer, chat, max_seq_length=1024)
    assert isinstance(caught.value, ValueError) and caught.value.category == "no_assistant"


def test_generation_tags_give_the_same_mask(tiny_phi3: Path, tokenizer: Any) -> None:
    tagged = transformers.AutoTokenizer.from_pretrained(tiny_phi3)
    tagged.chat_template = GENERATION_TEMPLATE
    assert "{% generation %}" in GENERATION_TEMPLATE
    assert tagged.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    plain = data.encode_chat(tokenizer, CHAT, max_seq_length=1024)
    example = data.encode_chat(tagged, CHAT, max_seq_length=1024)
    assert example == plain
    # Hugging Face's own mask from the tags agrees; on the real Phi-3 template it is all zeros.
    hf_mask = tagged.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
    assert [label != data.IGNORE_INDEX for label in example.labels] == [bool(m) for m in hf_mask]
    plain_mask = tokenizer.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assert not any(plain_mask["assistant_masks"])


def test_template_without_assistant_content_is_an_error(tiny_phi3: Path) -> None:
    broken = _variant(tiny_phi3, "'<|assistant|>\n' + message['content'] + '<|end|>\n'", "'<|assistant|>\n<|end|>\n'")
    with pytest.raises(SpecError, match="content of assistant message 2") as caught:
        data.encode_chat(broken, CHAT, max_seq_length=1024)
    assert caught.value.field == "model.chat_template"


def test_template_without_end_of_turn_is_an_error(tiny_phi3: Path) -> None:
    unclosed = _variant(
        tiny_phi3, "message['content'] + '<|end|>\n'}}{% endif %}", "message['content'] + '\n'}}{% endif %}"
    )
    with pytest.raises(SpecError, match="does not close assistant message 2 with '<\\|end\\|>'") as caught:
        data.encode_chat(unclosed, CHAT, max_seq_length=1024)
    assert caught.value.field == "model.chat_template"


def test_template_that_is_not_prefix_stable_is_an_error(tiny_phi3: Path) -> None:
    # Renders a different system line when a generation prompt is asked for, so prompts are not prefixes.
    unstable = _variant(
        tiny_phi3,
        "{% for message in messages %}",
        "{% if add_generation_prompt %}{{'<|system|>\nGo.<|end|>\n'}}{% endif %}{% for message in messages %}",
    )
    with pytest.raises(SpecError, match="not prefix-stable") as caught:
        data.encode_chat(unstable, CHAT, max_seq_length=1024)
    assert caught.value.field == "model.chat_template"


def test_truncation_keeps_the_start(tokenizer: Any) -> None:
    full = data.encode_chat(tokenizer, CHAT, max_seq_length=1024)
    second_turn = len(
        tokenizer.apply_chat_template(CHAT[:4], add_generation_prompt=True, return_dict=True)["input_ids"]
    )
    cut = data.encode_chat(tokenizer, CHAT, max_seq_length=second_turn + 3)
    assert cut.input_ids == full.input_ids[: second_turn + 3]
    assert cut.labels == full.labels[: second_turn + 3]
    assert _labelled_spans(tokenizer, cut)[0] == CHAT[2]["content"] + "<|end|>"
    assert len(_labelled_spans(tokenizer, cut)) == 2
    first_turn = len(tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_dict=True)["input_ids"])
    with pytest.raises(data.ExampleError, match=f"first trainable token is at position {first_turn}") as caught:
        data.encode_chat(tokenizer, CHAT, max_seq_length=first_turn)
    assert caught.value.category == "too_long"


def test_assistant_first_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(data.ExampleError, match="starts with an assistant message"):
        data.encode_chat(tokenizer, [{"role": "assistant", "content": "Hi."}], max_seq_length=64)


# ------------------------------------------------------------------------------------ completions, files, batches
def test_completion_mask(tokenizer: Any) -> None:
    example = data.encode_completion(tokenizer, "The capital of France is", " Paris.", max_seq_length=64)
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    assert example.input_ids[: len(prompt)] == prompt
    assert example.labels[: len(prompt)] == [data.IGNORE_INDEX] * len(prompt)
    assert _labelled_spans(tokenizer, example) == [" Paris.<|endoftext|>"]
    assert example.input_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(data.ExampleError, match="max_seq_length=4"):
        data.encode_completion(tokenizer, "The capital of France is", " Paris.", max_seq_length=4)


def test_load_examples_reads_every_format(tmp_path: Path, tokenizer: Any) -> None:
    records = {
        "chat": ({"messages": CHAT}, data.encode_chat(tokenizer, CHAT, max_seq_length=256)),
        "prompt_completion": (
            {"prompt": "Two plus two is", "completion": " four."},
            data.encode_completion(tokenizer, "Two plus two is", " four.", max_seq_length=256),
        ),
        "text_ground_truth": (
            {"text": "Say hi:", "ground_truth": " hi"},
            data.encode_completion(tokenizer, "Say hi:", " hi", max_seq_length=256),
        ),
    }
    for name, (record, expected) in records.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
        assert data.load_examples(path, tokenizer, max_seq_length=256) == [expected, expected], name


def test_load_examples_reports_every_bad_line(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"messages": CHAT}), "{not json", json.dumps({"input": "x"}), json.dumps({"messages": CHAT})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        data.load_examples(path, tokenizer, max_seq_length=16)
    assert [(i.line, i.category) for i in caught.value.issues] == [
        (1, "too_long"),
        (2, "invalid_json"),
        (3, "missing_messages"),  # the validator's verdict: the file's format is its first line's
        (4, "too_long"),
    ]


def test_collate_pads_right(tokenizer: Any) -> None:
    short = data.Example([5, 6, 7], [data.IGNORE_INDEX, 6, 7])
    long = data.encode_chat(tokenizer, CHAT, max_seq_length=1024)
    pad = tokenizer.pad_token_id
    batch = data.collate([short, long], pad)
    width = len(long.input_ids)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (2, width) for t in batch.values())
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [pad] * (width - 3)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * (width - 3)
    assert batch["labels"][0].tolist() == [data.IGNORE_INDEX, 6, 7] + [data.IGNORE_INDEX] * (width - 3)
    assert batch["input_ids"][1].tolist() == long.input_ids
    assert batch["labels"][1].tolist() == long.labels
    assert batch["attention_mask"][1].tolist() == [1] * width
    with pytest.raises(ValueError, match="at least one"):
        data.collate([], pad)
    with pytest.raises(ValueError, match="3 input ids but 2 labels"):
        data.Example([1, 2, 3], [1, 2])
