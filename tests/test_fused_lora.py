"""The fused LoRA linear layer: peft's values and gradients from one GEMM for the adapter, peft's own forward where
it does not apply, and adapters that plain peft loads unchanged."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from op_counter import OpCounter  # noqa: E402
from phitune.trainer.lora import FusedLoraLinear, fuse_lora_layers  # noqa: E402
from phitune.trainer.model import apply_method  # noqa: E402
from phitune.types import DoRA, LoRA  # noqa: E402


def _pair(**config: Any) -> tuple[Any, Any]:
    """(peft's LoRA layers, the same weights fused) on a two-layer MLP, with non-zero adapters."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 8))
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["0", "2"], "init_lora_weights": False, **config}
    reference = peft.get_peft_model(base, peft.LoraConfig(**options))
    fused = copy.deepcopy(reference)
    assert fuse_lora_layers(fused) == 2
    return reference, fused


def _run(model: Any, x: Any, autocast: bool = False) -> list[Any]:
    """The output and every trainable gradient of ``sum(model(x) ** 2)``."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    (out.float() ** 2).sum().backward()
    return [out.detach(), *(p.grad for p in model.parameters() if p.requires_grad)]


def test_fused_layers_give_peft_values_and_gradients() -> None:
    reference, fused = _pair()
    x = torch.randn(3, 5, 12)
    assert all(isinstance(m, FusedLoraLinear) for m in (fused.base_model.model[0], fused.base_model.model[2]))
    for got, expected in zip(_run(fused, x), _run(reference, x), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_in_place_sum_matches_addmm_bit_for_bit_and_copies_no_gradient() -> None:
    """Under bf16 autocast, on 3-D inputs: the same values and gradients as the out-of-place ``addmm`` the layer takes
    under a dispatch mode (here one that counts nothing), and a backward without a copy of any ``[tokens, out]``
    gradient (autograd's in-place-into-a-view bookkeeping made two per layer)."""
    _, fused = _pair(r=3)
    x = torch.randn(2, 7, 12)
    with OpCounter(lambda op: False):
        expected = _run(fused, x, autocast=True)
    copies = OpCounter(lambda op: op in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default))
    fused.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    with copies:
        (out.float() ** 2).sum().backward()
    got = [out.detach(), *(p.grad for p in fused.parameters() if p.requires_grad)]
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e)
    assert copies.calls == 0


def test_fused_layers_trace_under_torch_compile() -> None:
    """AOTAutograd (what torch.compile runs) cannot trace the in-place sum; compiled, the layer adds out of place."""
    reference, fused = _pair()
    x = torch.randn(3, 5, 12)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    for got, expected in zip(_run(compiled, x), _run(reference, x), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_the_sum_is_rounded_once() -> None:
    """peft rounds the adapter's product, its scaled copy and the sum to bf16; the fused GEMM rounds the sum once.
    Against an fp32 run, the fused output is at least as close as peft's."""
    reference, fused = _pair()
    x = torch.randn(4, 12)
    exact = _run(reference, x)[0]
    peft_error = (_run(reference, x, autocast=True)[0].float() - exact).abs().max()
    fused_error = (_run(fused, x, autocast=True)[0].float() - exact).abs().max()
    assert fused_error <= peft_error


def test_peft_forward_where_the_fusion_does_not_apply() -> None:
    reference, fused = _pair()
    x = torch.randn(2, 12)
    with fused.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(fused(x), reference(x))
    fused.merge_adapter()
    reference.merge_adapter()
    torch.testing.assert_close(fused(x), reference(x))
    dora, fused_dora = _pair(use_dora=True)
    torch.testing.assert_close(fused_dora(x), dora(x))
    bias, fused_bias = _pair(lora_bias=True)
    torch.testing.assert_close(fused_bias(x), bias(x))


def test_the_trainer_fuses_lora_and_dora_and_saves_plain_peft_adapters(tiny_model_dir: Path, tmp_path: Path) -> None:
    from phitune.trainer.loading import load_for_training

    for method in (LoRA(r=4, dropout=0.0), DoRA(r=4, dropout=0.0)):
        model, _ = load_for_training(str(tiny_model_dir), method, device="cpu", precision="fp32")
        model = apply_method(model, method, gradient_checkpointing=False)
        layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        assert layers and all(type(m) is FusedLoraLinear for m in layers)
    for p in model.parameters():  # a DoRA adapter with non-zero weights, saved and loaded back by plain peft
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path / "adapter")
    base, _ = load_for_training(str(tiny_model_dir), LoRA(), device="cpu", precision="fp32")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
