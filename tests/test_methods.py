"""One real training job per fine-tuning method on tiny-phi3, through the public client. Every output loads with
peft / transformers alone; validation loss and the best checkpoint are recorded."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import phitune
from conftest import CHAT_EXAMPLES, write_chat

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from phitune.trainer import data  # noqa: E402
from phitune.trainer.loop import token_loss_sum  # noqa: E402

FAST: dict[str, Any] = {"epochs": 50, "batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128, "max_steps": 4}


def _train(client: phitune.Client, chat_file: Path, method: Any, **options: Any) -> tuple[phitune.FineTuneJob, Path]:
    hyperparameters = {**FAST, **options.pop("hyperparameters", {})}
    job = client.finetune.create(
        model="tiny-phi3", training_file=chat_file, method=method, hyperparameters=hyperparameters, **options
    )
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model is not None
    path = client.models.get(job.fine_tuned_model).path
    assert path is not None
    return job, Path(path)


def _losses(client: phitune.Client, job_id: str) -> list[float]:
    events = client.finetune.events(job_id)
    losses = [float(e.data["train_loss"]) for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
    assert len(losses) == FAST["max_steps"] and all(math.isfinite(loss) for loss in losses)
    return losses


def _base(home: Path) -> Path:
    return home / "models" / "base" / "tiny-phi3"


def _load_base(home: Path, **options: Any) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(_base(home), dtype=torch.float32, **options)


def _batch(home: Path, chat_file: Path) -> dict[str, Any]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(_base(home))
    examples = data.load_examples(chat_file, tokenizer, max_seq_length=128)[:4]
    return data.collate(examples, tokenizer.pad_token_id)


def test_qlora_quantises_the_base_reports_the_measured_saving_and_trains_an_adapter(
    home: Path, chat_file: Path
) -> None:
    client = phitune.Client(home=home)
    job, adapter = _train(client, chat_file, phitune.QLoRA(r=16, alpha=32, bits=4, quant_type="nf4"))
    losses = _losses(client, job.id)
    assert losses[-1] < losses[0]

    footprint = next(
        e.data["quantized_base"] for e in client.finetune.events(job.id) if e.data and "quantized_base" in e.data
    )
    assert footprint["layers"] == 8  # 2 decoder layers x (qkv_proj, o_proj, gate_up_proj, down_proj)
    assert footprint["bf16_bytes"] == 2 * footprint["weights"] and footprint["fp32_bytes"] == 4 * footprint["weights"]
    assert 3.0 * footprint["bytes"] < footprint["bf16_bytes"]  # NF4 + double quantisation: ~3.7x below bf16

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 16, 32)
    merged_base = peft.PeftModel.from_pretrained(_load_base(home), adapter)  # on the plain base
    assert any("lora_A" in name for name, _ in merged_base.named_parameters())
    quantized = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    on_4bit = peft.PeftModel.from_pretrained(_load_base(home, quantization_config=quantized), adapter)
    assert on_4bit(**{k: v for k, v in _batch(home, chat_file).items() if k != "labels"}).logits.isfinite().all()


def test_dora_trains_magnitudes_and_records_validation_loss_and_the_best_checkpoint(
    home: Path, chat_file: Path, tmp_path: Path
) -> None:
    client = phitune.Client(home=home)
    valid = write_chat(tmp_path / "valid.jsonl", CHAT_EXAMPLES[:4])
    job, adapter = _train(
        client, chat_file, phitune.DoRA(r=8), validation_file=valid, hyperparameters={"eval_every": 2}
    )
    losses = _losses(client, job.id)
    assert losses[-1] < losses[0]

    events = client.finetune.events(job.id)
    metrics = [e.data for e in events if e.type == "metrics" and e.data]
    valid_losses = {m["step"]: m["valid_loss"] for m in metrics if "valid_loss" in m}
    assert sorted(valid_losses) == [2, 4] and valid_losses[4] < valid_losses[2]
    assert any("full_valid_loss" in m for m in metrics)
    best = [e.data for e in events if e.data and "best_step" in e.data]
    assert [b["best_step"] for b in best] == [2, 4]
    checkpoints = {c.step_number: c for c in client.finetune.checkpoints(job.id)}
    assert checkpoints[4].metrics["valid_loss"] == pytest.approx(best[-1]["valid_loss"])
    assert checkpoints[4].location and "location" not in best[-1]  # the checkpoint says where; events name no paths

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 8
    model = peft.PeftModel.from_pretrained(_load_base(home), adapter)
    assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())


def test_full_fine_tuning_writes_a_transformers_model_that_chat_serves(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    job, folder = _train(client, chat_file, "full")
    losses = _losses(client, job.id)
    assert losses[-1] < losses[0]

    assert job.fine_tuned_model is not None
    assert client.models.get(job.fine_tuned_model).kind == "full"
    assert not (folder / "adapter_config.json").exists()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base = _load_base(home)
    tuned_weights, base_weights = tuned.state_dict(), base.state_dict()
    assert tuned_weights.keys() == base_weights.keys()
    changed = [name for name in base_weights if not torch.equal(tuned_weights[name], base_weights[name])]
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed

    deployment = client.deployments.create(model=job.fine_tuned_model, name="full-phi")
    completion = deployment.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=6)
    assert completion.model == job.fine_tuned_model and completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 6


def test_ia3_through_the_peft_config_passthrough(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    config = {"peft_type": "IA3", "target_modules": ["qkv_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    job, adapter = _train(client, chat_file, phitune.PEFT(config=config))
    _losses(client, job.id)

    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "IA3"
    model = peft.PeftModel.from_pretrained(_load_base(home), adapter)
    scales = [p for name, p in model.named_parameters() if "ia3_l" in name]
    assert scales and any(not torch.allclose(p, torch.ones_like(p)) for p in scales)  # moved off their init of 1
    _assert_token_loss_matches_the_model_loss(model, _batch(home, chat_file))


def test_prompt_tuning_trains_through_the_plain_forward(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}
    job, adapter = _train(client, chat_file, phitune.PEFT(config=config))
    _losses(client, job.id)

    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    model = peft.PeftModel.from_pretrained(_load_base(home), adapter)
    assert model.prompt_encoder["default"].embedding.weight.shape[0] == 8
    _assert_token_loss_matches_the_model_loss(model, _batch(home, chat_file))


def _assert_token_loss_matches_the_model_loss(model: Any, batch: dict[str, Any]) -> None:
    """The trainer's loss (head only where labels are set, or the plain forward for prompt learning) over trainable
    tokens equals the model's own mean cross-entropy — virtual tokens prepended included."""
    model.eval()
    with torch.no_grad():
        ours = token_loss_sum(model, batch) / int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
        theirs = model(**batch).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
