"""Phi-3-small through the product: jobs from a model folder on the local backend (QLoRA), a job killed mid-run that
resumes on the same loss curve, DDP, FSDP and DeepSpeed ZeRO-3 on two processes following one process, chat in its
format stopping at ``<|end|>``, adapter and merged exports with the published config and weight names, and ONNX
refused by name."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import train_tiny_adapter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tiktoken")

import phitune  # noqa: E402
from phitune.engines import torch_engine  # noqa: E402
from phitune.engines.torch_engine import ModelPool, ServedModel  # noqa: E402
from phitune.errors import SpecError  # noqa: E402
from phitune.export import CHECK_MESSAGES, ExportSource, export  # noqa: E402
from phitune.tiny import ensure_tiny  # noqa: E402
from phitune.trainer.model import load_tokenizer  # noqa: E402

NAME = "tiny-phi3-small"
LORA: dict[str, Any] = {"type": "lora", "dropout": 0.0}
HP: dict[str, Any] = {
    "epochs": 50,
    "batch_size": 3,
    "gradient_accumulation_steps": 2,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
    "max_seq_length": 128,
    "precision": "fp32",
    "seed": 0,
}


def _losses(client: phitune.Client, job_id: str) -> list[float]:
    """train_loss by step, the last value recorded for each step (a resumed run repeats the steps it lost)."""
    by_step: dict[int, float] = {}
    for event in client.finetune.events(job_id):
        if event.type == "metrics" and event.data and "train_loss" in event.data:
            by_step[int(event.data["step"])] = float(event.data["train_loss"])
    assert sorted(by_step) == list(range(1, len(by_step) + 1))
    return [by_step[step] for step in sorted(by_step)]


def _finished(client: phitune.Client, job_id: str) -> phitune.FineTuneJob:
    job = client.finetune.wait(job_id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    return job


def test_a_phi3_small_folder_trains_with_qlora_through_the_client(home: Path, chat_file: Path) -> None:
    """The issue's acceptance: ``client.finetune.create(model=<a Phi-3-small folder>, method="qlora")`` on a CPU."""
    folder = ensure_tiny(home.parent / "bases", NAME)
    client = phitune.Client(home=home)
    job = client.finetune.create(
        model=str(folder), training_file=chat_file, method="qlora", hyperparameters={**HP, "max_steps": 4}
    )
    job = _finished(client, job.id)
    losses = _losses(client, job.id)
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert job.fine_tuned_model is not None
    adapter = json.loads((Path(client.models.get(job.fine_tuned_model).path or "") / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"query_key_value", "dense", "up_proj", "down_proj"}


@pytest.mark.slow
def test_a_killed_job_resumes_on_the_same_loss_curve(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    reference = _losses(client, _finished(client, _create(client, chat_file, 8).id).id)
    job = _create(client, chat_file, 8, checkpoint_every=3)
    deadline = time.monotonic() + 1800
    while not client.finetune.checkpoints(job.id):
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    with sqlite3.connect(home / "phitune.db") as db:
        os.kill(int(db.execute("SELECT pid FROM worker").fetchone()[0]), signal.SIGKILL)
    job = _finished(client, job.id)  # restarts the worker, which resumes the job
    messages = [event.message for event in client.finetune.events(job.id)]
    assert any(message.startswith("resumed from checkpoint at step") for message in messages), messages
    assert _losses(client, job.id) == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [{"strategy": "ddp"}, {"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3}],
    ids=["ddp", "fsdp", "zero3"],
)
def test_two_processes_follow_one_process(home: Path, chat_file: Path, layout: dict[str, Any]) -> None:
    """torchrun + gloo, two ranks with unequal shares of each global batch (8 examples, micro-batches of 3); FSDP
    shards each decoder layer and the tied embedding; under ZeRO-3 the loss runs the gathered head with the muP divisor
    and the unused tokens' floor."""
    if layout["strategy"] == "deepspeed":
        pytest.importorskip("deepspeed")
    client = phitune.Client(home=home)
    single = _losses(client, _finished(client, _create(client, chat_file, 6).id).id)
    job = _create(client, chat_file, 6, distributed={**layout, "nproc": 2})
    assert _losses(client, _finished(client, job.id).id) == pytest.approx(single, rel=1e-4, abs=1e-4)


def _create(client: phitune.Client, chat_file: Path, steps: int, **options: Any) -> phitune.FineTuneJob:
    checkpoint = {"checkpoint_every": options.pop("checkpoint_every")} if "checkpoint_every" in options else {}
    return client.finetune.create(
        model=NAME,
        training_file=chat_file,
        method=LORA,
        hyperparameters={**HP, "max_steps": steps, **checkpoint},
        **options,
    )


# ------------------------------------------------------------------------------------------- chat and exports
@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory: pytest.TempPathFactory) -> ExportSource:
    """A LoRA fine-tune of tiny-phi3-small, trained in this process."""
    return train_tiny_adapter(tmp_path_factory.mktemp("small-export"), NAME, tmp_path_factory.mktemp("small-base"))


def test_adapter_and_merged_exports_keep_the_published_names(fine_tune: ExportSource, tmp_path: Path) -> None:
    """The merged folder matches peft's logits through transformers alone, with the base's config keys and tensor
    names (the published checkpoint's) and its tokenizer files (the tiktoken rank file, the chat template)."""
    from safetensors import safe_open

    adapter = export(fine_tune, format="adapter", dest=tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    merged = export(fine_tune, format="merged", dest=tmp_path / "merged")
    report = json.loads((merged / "export_report.json").read_text())
    assert report["checks"]["passed"] is True, report["checks"]
    base = Path(fine_tune.base)
    config, base_config = (json.loads((f / "config.json").read_text()) for f in (merged, base))
    assert config.keys() - {"dtype"} == base_config.keys() - {"dtype"}
    assert config["architectures"] == ["Phi3SmallForCausalLM"] and config["model_type"] == "phi3small"
    names = []
    for folder in (merged, base):
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            names.append(set(weights.keys()))
    assert names[0] == names[1] and "lm_head.weight" not in names[0]  # tied, as published
    assert (merged / "cl100k_base.tiktoken").read_bytes() == (base / "cl100k_base.tiktoken").read_bytes()
    assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] == "Phi3SmallTokenizer"
    assert load_tokenizer(str(merged)).chat_template == load_tokenizer(fine_tune.base).chat_template


def test_onnx_export_is_refused_by_name(fine_tune: ExportSource, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        export(fine_tune, format="onnx", dest=tmp_path / "onnx")
    assert (
        caught.value.field == "format" and "Phi-3-small" in str(caught.value) and "format='merged'" in str(caught.value)
    )
    assert not (tmp_path / "onnx").exists()


def test_chat_renders_phi3_small_format_and_stops_at_its_end_of_turn(fine_tune: ExportSource) -> None:
    tokenizer = load_tokenizer(fine_tune.base)
    text = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|endoftext|><|") and text.endswith("<|assistant|>\n")
    prompt = tokenizer.encode(text, add_special_tokens=False)
    pool = ModelPool()
    for served in (
        ServedModel(NAME, fine_tune.base),
        ServedModel(fine_tune.model_id, fine_tune.base, fine_tune.adapter),
    ):
        reply = pool.generate(served, CHECK_MESSAGES, max_tokens=24, temperature=0.0, top_p=1.0, seed=None)
        assert reply.prompt_tokens == len(prompt)
        assert "<|end|>" not in reply.text
    model = pool._load(ServedModel(NAME, fine_tune.base))[0]
    assert tokenizer.convert_tokens_to_ids("<|end|>") in torch_engine._stop_ids(model, tokenizer)
