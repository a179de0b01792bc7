"""QLoRA's 4-bit layers on CPU dequantise into a reused buffer: bitsandbytes' values and gradients, bit for bit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from phitune.trainer.loading import load_for_training  # noqa: E402
from phitune.trainer.model import apply_method  # noqa: E402
from phitune.trainer.quantized import (  # noqa: E402
    BufferedLinear4bit,
    dequantized_weight,
    reuse_dequantisation_buffer,
)
from phitune.types import QLoRA  # noqa: E402


def _layer(quant_type: str, double_quant: bool, bias: bool) -> Any:
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    layer = bnb.nn.Linear4bit(
        128, 96, bias=bias, compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=double_quant
    )
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
    )
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(96))
    return layer.to("cpu").train()


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_buffered_layer_matches_bitsandbytes_bit_for_bit(quant_type: str, double_quant: bool) -> None:
    original = _layer(quant_type, double_quant, bias=False)
    buffered = copy.deepcopy(original)
    assert reuse_dequantisation_buffer(buffered) == 1 and type(buffered) is BufferedLinear4bit
    x = torch.randn(2, 5, 128, requires_grad=True)
    x_buffered = x.detach().clone().requires_grad_(True)
    y, y_buffered = original(x), buffered(x_buffered)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_buffered.backward(grad)
    assert y.dtype == y_buffered.dtype == torch.float32  # back in the input's dtype, as bitsandbytes returns it
    assert torch.equal(y, y_buffered)
    assert torch.equal(x.grad, x_buffered.grad)


def test_bias_gradient_sums_every_position() -> None:
    layer = _layer("nf4", True, bias=True)
    reuse_dequantisation_buffer(layer)
    x = torch.randn(2, 5, 128)
    grad = torch.randn(2, 5, 96)
    layer(x).backward(grad)
    torch.testing.assert_close(layer.bias.grad, grad.sum((0, 1)), rtol=0.05, atol=0.02)  # in bf16, the compute dtype


def test_dequantisation_reuses_one_buffer_per_thread() -> None:
    big, small = _layer("nf4", True, bias=False), _layer("nf4", False, bias=False)
    first = dequantized_weight(big.weight, big.weight.quant_state, torch.bfloat16)
    address = first.data_ptr()
    expected = bnb.functional.dequantize_4bit(big.weight, big.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(first, expected)
    again = dequantized_weight(small.weight, small.weight.quant_state, torch.bfloat16)
    assert again.data_ptr() == address  # the same memory, no new weight-sized allocation


def test_qlora_models_train_through_buffered_layers(tiny_model_dir: Path) -> None:
    method = QLoRA(r=4, dropout=0.0)
    model, _ = load_for_training(str(tiny_model_dir), method, device="cpu", precision="fp32")
    model = apply_method(model, method, gradient_checkpointing=True)
    buffered = [m for m in model.modules() if isinstance(m, BufferedLinear4bit)]
    assert buffered and not [m for m in model.modules() if type(m) is bnb.nn.Linear4bit]
    assert all(hasattr(m, "lora_A") for m in model.modules() if getattr(m, "base_layer", None) in buffered)
    model.train()
    ids = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)  # lora_A's is 0 while B is 0
