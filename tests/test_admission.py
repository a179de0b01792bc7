"""A local job is accepted only if it can train: its base loads (config and tokenizer) and every example of its files
keeps a token with loss within max_seq_length, or the job chooses to train without those that do not. A refused job
leaves nothing stored, and errors name files and models as the user knows them, never by the store's paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import phitune
from conftest import write_chat, write_chat_with_long_prompts
from phitune.errors import DatasetError, SpecError
from phitune.types import JobSpec

SHORT = {"max_seq_length": 64, "batch_size": 4, "learning_rate": 3e-3}


def test_examples_that_cannot_train_refuse_the_job_naming_the_file_lines_and_fixes(home: Path, tmp_path: Path) -> None:
    client = phitune.Client(home=home)
    uploaded = client.files.upload(write_chat_with_long_prompts(tmp_path / "long.jsonl"))
    with pytest.raises(DatasetError) as caught:
        client.finetune.create(model="tiny-phi3", training_file=uploaded.id, hyperparameters=SHORT)
    error = caught.value
    name = f"{uploaded.id} (long.jsonl)"
    assert error.path == name and [(i.line, i.category) for i in error.issues] == [(3, "too_long"), (7, "too_long")]
    text = str(error)
    assert f"{name}:3: [too_long] no token with loss within max_seq_length=64" in text and f"{name}:7:" in text
    raise_length, drop = error.fixes
    assert "raise hyperparameters.max_seq_length (now 64) to at least" in raise_length and raise_length in text
    assert "hyperparameters.drop_untrainable_examples=True" in drop and drop in text
    assert str(home) not in text and "files/" not in text
    assert client.finetune.list() == [] and not (home / "jobs").exists()

    short = client.files.upload(write_chat(tmp_path / "short.jsonl"))
    with pytest.raises(DatasetError) as caught:  # a validation file is held to the same
        client.finetune.create(
            model="tiny-phi3", training_file=short.id, validation_file=uploaded.id, hyperparameters=SHORT
        )
    assert caught.value.path == name and caught.value.fixes == error.fixes
    assert client.finetune.list() == []

    # the suggested length admits the job
    needed = int(raise_length.split("to at least ")[1].split(",")[0])
    spec = JobSpec(model="tiny-phi3", training_file=uploaded.id, hyperparameters={**SHORT, "max_seq_length": needed})
    client.backend.check_spec(spec)
    short_by_one = spec.hyperparameters.model_copy(update={"max_seq_length": needed - 1})
    with pytest.raises(DatasetError):
        client.backend.check_spec(spec.model_copy(update={"hyperparameters": short_by_one}))


def test_dropping_untrainable_examples_trains_without_them_and_says_so(home: Path, tmp_path: Path) -> None:
    client = phitune.Client(home=home)
    uploaded = client.files.upload(write_chat_with_long_prompts(tmp_path / "long.jsonl"))
    job = client.finetune.create(
        model="tiny-phi3", training_file=uploaded.id, hyperparameters={**SHORT, "drop_untrainable_examples": True}
    )
    assert job.total_steps == 2  # one epoch of the 8 examples that train, 4 at a time
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    assert job.step == 2
    events = client.finetune.events(job.id)
    (dropped,) = [e for e in events if e.data and "dropped_examples" in e.data]
    assert dropped.message.startswith(f"left out 2 of 10 examples of {uploaded.id} (long.jsonl)")
    assert "lines 3, 7" in dropped.message and dropped.level == "warn"
    assert dropped.data == {"file": f"{uploaded.id} (long.jsonl)", "dropped_examples": 2, "dropped_lines": [3, 7]}
    assert any(e.message.startswith("training lora on 8 examples: 2 steps") for e in events)


def test_a_file_where_no_example_can_train_is_refused_even_when_dropping(home: Path, tmp_path: Path) -> None:
    client = phitune.Client(home=home)
    lines = [line for line in write_chat_with_long_prompts(tmp_path / "all.jsonl").read_text().splitlines()]
    (tmp_path / "all.jsonl").write_text("\n".join(lines[2:3] + lines[6:7]) + "\n")
    uploaded = client.files.upload(tmp_path / "all.jsonl")
    hyperparameters = {**SHORT, "drop_untrainable_examples": True}
    with pytest.raises(DatasetError) as caught:
        client.finetune.create(model="tiny-phi3", training_file=uploaded.id, hyperparameters=hyperparameters)
    assert "no example keeps a token with loss within max_seq_length=64" in str(caught.value)
    (fix,) = caught.value.fixes
    assert "raise hyperparameters.max_seq_length" in fix
    assert client.finetune.list() == []


def test_a_base_that_cannot_be_loaded_is_refused_at_create(home: Path, tmp_path: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    uploaded = client.files.upload(chat_file)
    other = tmp_path / "other-architecture"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5"}))  # known to transformers, but no causal LM
    untokenized = tmp_path / "no-tokenizer"
    untokenized.mkdir()
    (untokenized / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    cases = {
        "someone/not-downloaded": "'someone/not-downloaded' is not a catalog model, a model folder on this machine",
        str(tmp_path / "missing"): f"no model folder {tmp_path / 'missing'} on this machine",
        str(other): "is a t5 model (config.json model_type), for which transformers",
        str(untokenized): "has no tokenizer transformers can load",
    }
    for model, expected in cases.items():
        with pytest.raises(SpecError) as caught:
            client.finetune.create(model=model, training_file=uploaded.id, hyperparameters={"max_steps": 1})
        assert caught.value.field == "model" and expected in str(caught.value), (model, caught.value)
    assert client.finetune.list() == [] and not (home / "jobs").exists()
