"""The training RMSNorm: transformers' Phi3RMSNorm's function, with a backward written out."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm  # noqa: E402

from phitune.tiny import TINY_CONFIG  # noqa: E402
from phitune.trainer.norm import TrainingRMSNorm, use_training_rms_norm  # noqa: E402

HIDDEN = 96


def _norms(dtype: Any) -> tuple[Any, Any]:
    torch.manual_seed(0)
    reference = Phi3RMSNorm(HIDDEN, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(1 + 0.3 * torch.randn(HIDDEN))
    reference = reference.to(dtype)
    ours = Phi3RMSNorm(HIDDEN, eps=1e-5).to(dtype)
    ours.load_state_dict(reference.state_dict())
    assert use_training_rms_norm(ours) == 1 and type(ours) is TrainingRMSNorm
    return reference, ours


def _run(norm: Any, x: Any, grad: Any) -> list[Any]:
    x = x.detach().clone().requires_grad_()
    out = norm(x)
    out.backward(grad)
    return [out.detach(), x.grad, norm.weight.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_values_and_gradients_follow_transformers_rms_norm(dtype: Any) -> None:
    """Output, input gradient and weight gradient against a float64 reference: within the error transformers' own
    norm makes in the same dtype (and at fp32 rounding in fp32)."""
    reference, ours = _norms(dtype)
    generator = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(2, 37, HIDDEN, generator=generator)).to(dtype)
    grad = torch.randn(2, 37, HIDDEN, generator=generator).to(dtype)
    exact = _run(_double(reference), x.double(), grad.double())
    theirs, got = _run(reference, x, grad), _run(ours, x, grad)
    for name, value, their_value, exact_value in zip(("out", "x", "weight"), got, theirs, exact, strict=True):
        scale = exact_value.abs().max()
        error = float((value.double() - exact_value).abs().max() / scale)
        their_error = float((their_value.double() - exact_value).abs().max() / scale)
        assert error <= max(2 * their_error, 1e-6), (name, error, their_error)


def _double(norm: Any) -> Any:
    copy = Phi3RMSNorm(HIDDEN, eps=norm.variance_epsilon).double()
    copy.load_state_dict({k: v.double() for k, v in norm.state_dict().items()})
    return copy


def test_a_model_trains_with_the_same_gradients_and_state_dict() -> None:
    """Every norm of a tiny Phi-3 swapped; a full fine-tuning backward gives transformers' gradients (norm weights
    included), and the state dict is unchanged."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**TINY_CONFIG, "vocab_size": 97, "pad_token_id": 0})
    reference = transformers.Phi3ForCausalLM(config).float()
    ours = transformers.Phi3ForCausalLM(config).float()
    ours.load_state_dict(reference.state_dict())
    assert use_training_rms_norm(ours) == 2 * config.num_hidden_layers + 1
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(2))
    for model in (reference, ours):
        model(input_ids=ids, labels=ids).loss.backward()
    for (name, expected), got in zip(reference.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_apply_method_trains_through_the_training_norm(tiny_model_dir: Any, method: str) -> None:
    from phitune.trainer.loading import load_for_training
    from phitune.trainer.model import apply_method
    from phitune.types import Full, LoRA

    spec = LoRA(r=4) if method == "lora" else Full()
    model, _ = load_for_training(str(tiny_model_dir), spec, device="cpu", precision="fp32")
    model = apply_method(model, spec, gradient_checkpointing=False)
    norms = [m for m in model.modules() if isinstance(m, Phi3RMSNorm)]
    assert norms and all(type(m) is TrainingRMSNorm for m in norms)
