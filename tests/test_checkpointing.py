"""Selective activation checkpointing: layers that keep their matmul outputs recompute no matmul in the backward,
train to bit-identical values, and are planned from the memory beside the job's predicted peak."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import phitune  # noqa: E402
from op_counter import OpCounter  # noqa: E402
from phitune.estimate import (  # noqa: E402
    GiB,
    KeptOutputs,
    attention_probability_bytes,
    down_projection_output_bytes,
    estimate,
    kept_outputs,
    matmul_output_bytes,
    model_shape,
)
from phitune.trainer.loading import load_for_training  # noqa: E402
from phitune.trainer.model import QLORA_MATMUL, apply_method  # noqa: E402
from phitune.types import Hyperparameters, JobSpec, LoRA, QLoRA  # noqa: E402


def _is_matmul(op: Any) -> bool:
    return op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) or str(op) == QLORA_MATMUL


def _train_once(model_dir: Path, method: LoRA | QLoRA, kept: int, down: int = 0) -> tuple[int, float, list[Any]]:
    """(matmuls in the backward, loss, adapter gradients) of one step with ``kept`` layers keeping their matmul
    outputs and ``down`` more their down projection's."""
    torch.manual_seed(0)
    model, _ = load_for_training(str(model_dir), method, device="cpu", precision="fp32")
    model = apply_method(
        model, method, gradient_checkpointing=True, keep_matmul_layers=kept, keep_down_projections=down
    )
    model.train()
    with torch.no_grad():  # adapters that already change the output (peft starts lora_B at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(3, 1000, (2, 48), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    with OpCounter(_is_matmul) as counter:
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return counter.calls, float(loss.detach()), grads


@pytest.mark.parametrize("method", [LoRA(r=4, dropout=0.0), QLoRA(r=4, dropout=0.0)], ids=["lora", "qlora"])
def test_kept_layers_recompute_no_base_matmul_and_train_identically(tiny_model_dir: Path, method: Any) -> None:
    if isinstance(method, QLoRA):
        pytest.importorskip("bitsandbytes")
    layers = model_shape(str(tiny_model_dir)).num_hidden_layers
    full, loss_full, grads_full = _train_once(tiny_model_dir, method, 0)
    selective, loss_selective, grads_selective = _train_once(tiny_model_dir, method, layers)
    down_only, loss_down, grads_down = _train_once(tiny_model_dir, method, 1, down=layers - 1)
    # each layer's recomputation skips its 4 base matmuls (qkv, o, gate_up, down); the adapters' are still redone
    assert full - selective == 4 * layers
    # one whole layer skips its 4; the others skip their down projection alone
    assert full - down_only == 4 + (layers - 1)
    assert loss_full == loss_selective == loss_down
    assert all(torch.equal(a, b) for a, b in zip(grads_full, grads_selective, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_full, grads_down, strict=True))


def test_kept_outputs_follow_the_memory_beside_the_peak() -> None:
    hp = Hyperparameters(batch_size=1, max_seq_length=256, gradient_checkpointing=True, precision="bf16")
    spec = JobSpec(model="Phi-3-mini-4k-instruct", training_file="file-x", method="lora", hyperparameters=hp)
    shape = model_shape(spec.model)
    layers = shape.num_hidden_layers
    whole, down = 256 * matmul_output_bytes(shape, "bf16"), 256 * down_projection_output_bytes(shape, "bf16")
    assert kept_outputs(shape, spec, 256, "bf16", 0) == KeptOutputs()
    # half the headroom is used, down projections first (the most recomputation saved per byte), then whole layers
    assert kept_outputs(shape, spec, 256, "bf16", 10 * down) == KeptOutputs(down_projections=5)
    upgraded = kept_outputs(shape, spec, 256, "bf16", 2 * (layers * down + 3 * (whole - down)))
    assert upgraded == KeptOutputs(layers=3, down_projections=layers - 3)
    assert kept_outputs(shape, spec, 256, "bf16", 100 * GiB) == KeptOutputs(layers=layers)
    unchecked = spec.model_copy(update={"hyperparameters": hp.model_copy(update={"gradient_checkpointing": False})})
    assert kept_outputs(shape, unchecked, 256, "bf16", 100 * GiB) == KeptOutputs()

    tight = estimate(spec, tokens_per_example=256, available_bytes=9 * GiB)
    roomy = estimate(spec, tokens_per_example=256, available_bytes=24 * GiB)
    assert tight.kept_matmul_layers < roomy.kept_matmul_layers == layers
    assert tight.kept_matmul_layers + tight.kept_down_projections == layers
    # a kept layer keeps its attention probabilities too (on a CPU)
    probabilities = attention_probability_bytes(shape, 256, "bf16", roomy.device)
    whole = 256 * matmul_output_bytes(shape, "bf16", probabilities)
    kept_tight = KeptOutputs(layers=tight.kept_matmul_layers, down_projections=tight.kept_down_projections)
    kept_bytes = kept_tight.bytes(shape, 256, "bf16", probabilities)
    assert roomy.peak_bytes - tight.peak_bytes == layers * whole - kept_bytes
    assert roomy.tokens_per_second > tight.tokens_per_second and roomy.fits


def test_a_job_reports_its_kept_layers(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    hp = {"max_steps": 2, "gradient_checkpointing": True, "batch_size": 2}
    job = client.finetune.create(model="tiny-phi3", training_file=chat_file, method=QLoRA(r=4), hyperparameters=hp)
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    (plan,) = [e.data for e in client.finetune.events(job.id) if e.data and "kept_matmul_layers" in e.data]
    assert plan["kept_matmul_layers"] == plan["layers"]  # tiny-phi3 fits many times over
