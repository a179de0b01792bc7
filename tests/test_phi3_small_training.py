"""tiny-phi3-small on the local trainer: the training loss equals the published model's, each method trains it, LoRA
follows its fused projections, and a resumed run continues the same loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import write_chat
from recording_control import RecordingControl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("tiktoken")

from phitune.tiny import ensure_tiny  # noqa: E402
from phitune.trainer import data, loop, packing  # noqa: E402
from phitune.trainer.model import apply_method, load_tokenizer  # noqa: E402
from phitune.types import PHI3_SMALL_LORA_TARGETS, DoRA, JobSpec, LoRA, QLoRA  # noqa: E402

NAME = "tiny-phi3-small"
CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France? Think of the river that runs through it."},
        {"role": "assistant", "content": "Paris, on the Seine, as every schoolchild learns early on."},
    ],
    [
        {"role": "user", "content": "Name a colour of the sky at noon on a clear summer day."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And at sunset, when the sun sinks below the hills?"},
        {"role": "assistant", "content": "Orange and red, fading into purple as the light goes."},
    ],
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny(tmp_path_factory.mktemp("small"), NAME)


def _examples(folder: Path) -> list[data.Example]:
    tokenizer = load_tokenizer(str(folder))
    return [data.encode_chat(tokenizer, messages, max_seq_length=512) for messages in CONVERSATIONS]


def test_the_training_loss_is_the_published_models_loss(folder: Path) -> None:
    """The trainer's loss — one packed row, hidden states into the chunked head with the muP divisor and the unused
    tokens' floor — equals the model's own loss on each example alone (fp32), and so do the LoRA gradients. The
    examples are long enough (50-60 tokens, blocks of 16) for the sparse layers' pattern to decide."""
    examples = _examples(folder)
    assert all(len(e.input_ids) > 3 * 16 for e in examples)
    models = []
    for _ in range(2):
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        torch.manual_seed(0)
        models.append(apply_method(base, LoRA(r=4, dropout=0.0), gradient_checkpointing=False))
    ours, reference = models
    reference.load_state_dict(ours.state_dict())
    batch = packing.pack(examples, pad_id=0)
    packing.use_varlen_attention(ours)
    loss = loop.token_loss_sum(ours, batch)
    expected = 0
    for example in examples:
        labels = torch.tensor([example.labels])
        out = reference(input_ids=torch.tensor([example.input_ids]), labels=labels)
        expected = expected + out.loss * int((labels[:, 1:] != data.IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    loss.backward()
    expected.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _run(folder: Path, tmp_path: Path, method: Any, **hyperparameters: Any) -> tuple[Any, RecordingControl]:
    spec = JobSpec(
        model=NAME,
        training_file="train.jsonl",
        method=method,
        hyperparameters={"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128}
        | hyperparameters,
    )
    run = loop.TrainRun(
        spec=spec,
        base_path=str(folder),
        train_path=write_chat(tmp_path / "train.jsonl"),
        valid_path=None,
        output_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "checkpoints",
    )
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    recorder = RecordingControl()
    return loop.train(run, recorder), recorder


METHODS: dict[str, Any] = {
    "lora": LoRA(r=8, dropout=0.0),
    "qlora": QLoRA(r=8, dropout=0.0),
    "dora": DoRA(r=8, dropout=0.0),
    "full": "full",
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_tiny_phi3_small(folder: Path, tmp_path: Path, method: str) -> None:
    """Four steps lower the loss; the output loads with transformers (and peft) once phitune registered the
    architecture, adapters on the fused projections by their published names."""
    result, recorder = _run(folder, tmp_path, METHODS[method])
    assert result.status == "succeeded" and len(recorder.losses) == 4
    assert recorder.losses[-1] < recorder.losses[0], recorder.losses
    if method == "full":
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, tmp_path / "out")
        adapted = {name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
        assert adapted == set(PHI3_SMALL_LORA_TARGETS)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("method", [LoRA(r=8, dropout=0.0), DoRA(r=4, dropout=0.0)], ids=["lora", "dora"])
def test_the_estimator_counts_the_adapters_the_trainer_builds(folder: Path, method: Any) -> None:
    """``phitune.estimate`` reads a Phi-3-small folder's published keys (``ff_intermediate_size``, tied embeddings)
    and its fused projections' shapes: the trainable and total parameters it predicts are the model's."""
    from phitune.estimate.memory import trainable_parameters
    from phitune.estimate.shapes import model_shape

    shape = model_shape(str(folder))
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    total = sum(p.numel() for p in base.parameters())
    adapted = apply_method(base, method, gradient_checkpointing=False)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    spec = JobSpec(model=str(folder), training_file="train.jsonl", method=method)
    assert trainable_parameters(shape, spec) == trainable
    assert shape.tie_word_embeddings and shape.intermediate_size == base.config.intermediate_size
    norms_and_biases = total - shape.parameters  # LayerNorm biases and the projections' biases the shape omits
    assert 0 < norms_and_biases < 0.05 * total
