"""The fused CPU kernels (built here with the machine's compiler, as a job builds them): transformers' bf16 values in
the forwards, gradients at least as close to float64 as torch's bf16 ops; the trainer's modules take them; without
them (disabled, or a failed build) the trainer runs torch's ops."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb  # noqa: E402

from phitune.tiny import TINY_CONFIG  # noqa: E402
from phitune.trainer import fused  # noqa: E402
from phitune.trainer.decoder import TrainingPhi3Attention, TrainingPhi3MLP, use_fused_decoder  # noqa: E402


@pytest.fixture(scope="module")
def kernels() -> Any:
    built = fused.operators()
    assert built is not None, "the fused kernels did not build (see the logged compiler error)"
    return built


def _random(*shape: int, seed: int, scale: float = 1.0) -> Any:
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(torch.bfloat16)


def _relative_error(got: Any, expected: Any) -> float:
    return float((got.double() - expected).norm() / expected.norm())


def _swiglu(gate_up: Any) -> Any:
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def test_swiglu_returns_transformers_values_and_a_closer_gradient(kernels: Any) -> None:
    gate_up, grad = _random(3, 37, 2 * 160, seed=0, scale=3.0), _random(3, 37, 160, seed=1)
    torch.testing.assert_close(kernels.swiglu_forward(gate_up), _swiglu(gate_up), rtol=0, atol=0)

    exact = gate_up.double().requires_grad_()
    _swiglu(exact).backward(grad.double())
    by_torch = gate_up.clone().requires_grad_()
    _swiglu(by_torch).backward(grad)
    ours = kernels.swiglu_backward(grad, gate_up)
    assert ours.dtype == torch.bfloat16 and ours.shape == gate_up.shape
    assert _relative_error(ours, exact.grad) <= _relative_error(by_torch.grad, exact.grad) < 1e-2


def test_swiglu_keeps_large_and_non_finite_gates(kernels: Any) -> None:
    gate = torch.tensor([[-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, float("inf"), float("nan")]])
    gate_up = torch.cat([gate, torch.ones_like(gate)], dim=-1).to(torch.bfloat16)
    torch.testing.assert_close(kernels.swiglu_forward(gate_up), _swiglu(gate_up), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "rotary"), [(4, 4, 16), (6, 2, 16), (6, 2, 12)], ids=["mha", "gqa", "gqa-partial-rotary"]
)
def test_rotary_qkv_returns_transformers_queries_keys_and_values(
    kernels: Any, heads: int, kv_heads: int, rotary: int
) -> None:
    """Phi-4-mini rotates the first three quarters of each head (``partial_rotary_factor`` 0.75) and passes the rest
    through: the kernel takes the rotary width from the angles."""
    batch, tokens, dim = 2, 29, 16
    qkv = _random(batch, tokens, (heads + 2 * kv_heads) * dim, seed=2, scale=2.0)
    angles_batch = batch if heads == kv_heads else 1  # one batch of angles broadcast, as transformers allows
    angles = torch.rand(angles_batch, tokens, rotary // 2, generator=torch.Generator().manual_seed(3)) * 6.3
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(torch.bfloat16) for f in (torch.cos, torch.sin))

    def split(tensor: Any) -> list[Any]:
        parts = tensor.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        return [part.view(batch, tokens, -1, dim).transpose(1, 2) for part in parts]

    def reference(tensor: Any) -> list[Any]:
        query, key, value = split(tensor)
        return [*apply_rotary_pos_emb(query, key, cos.to(tensor.dtype), sin.to(tensor.dtype)), value]

    ours = kernels.rotary_qkv_forward(qkv, cos, sin, heads, kv_heads)
    for got, expected in zip(ours, reference(qkv), strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    grads = [_random(*t.shape, seed=4 + i) for i, t in enumerate(ours)]
    exact = qkv.double().requires_grad_()
    torch.autograd.backward(reference(exact), [g.double() for g in grads])
    got = kernels.rotary_qkv_backward(*grads, cos, sin)
    assert got.shape == qkv.shape
    assert _relative_error(got, exact.grad) < 5e-3


def test_rms_norm_returns_transformers_values_and_a_closer_gradient(kernels: Any) -> None:
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    x, grad = _random(5, 11, 96, seed=5, scale=4.0), _random(5, 11, 96, seed=6)
    weight = (1 + 0.3 * torch.randn(96, generator=torch.Generator().manual_seed(7))).to(torch.bfloat16)
    norm = Phi3RMSNorm(96, eps=1e-5).to(torch.bfloat16)
    norm.weight.data.copy_(weight)
    out, scale = kernels.rms_norm_forward(x, weight, 1e-5)
    torch.testing.assert_close(out, norm(x), rtol=0, atol=0)
    assert scale.shape == (5, 11, 1) and scale.dtype == torch.float32

    exact = Phi3RMSNorm(96, eps=1e-5).double()
    exact.weight.data.copy_(weight.double())
    x64 = x.double().requires_grad_()
    exact(x64).backward(grad.double())
    by_torch = x.clone().requires_grad_()
    norm(by_torch).backward(grad)
    ours = kernels.rms_norm_backward(grad, x, scale, weight)
    assert _relative_error(ours, x64.grad) <= _relative_error(by_torch.grad, x64.grad) < 1e-2


@pytest.mark.parametrize("first_row", [0, 9])
def test_causal_softmax_matches_torch_on_masked_scores(kernels: Any, first_row: int) -> None:
    """A block of rows from ``first_row``: torch's softmax of the scaled scores under the causal mask, to the bf16
    rounding of an exponential within an ulp of torch's; the masked keys exactly 0."""
    heads, rows, keys = 3, 20, first_row + 20
    scores = _random(heads, rows, keys, seed=8, scale=6.0)
    mask = torch.ones(rows, keys, dtype=torch.bool).triu_(first_row + 1)
    expected = torch.softmax((scores * 0.125).masked_fill(mask, float("-inf")), -1)
    ours = scores.clone()
    kernels.causal_softmax_(ours, 0.125, first_row)
    assert (ours == expected).float().mean() > 0.99
    assert bool(((ours.float() - expected.float()).abs() <= expected.float() * 2**-7).all())
    assert not ours[:, mask].any()


def test_softmax_backward_gives_the_scaled_scores_gradient(kernels: Any) -> None:
    scores = torch.randn(3, 20, 33, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 3
    probabilities = torch.softmax(scores, -1).to(torch.bfloat16)
    grad = _random(3, 20, 33, seed=11)
    expected = torch._softmax_backward_data(grad.double(), probabilities.double(), -1, torch.float64) * 0.125
    ours = grad.clone()
    kernels.softmax_backward_(ours, probabilities, 0.125)
    assert _relative_error(ours, expected) < 5e-3


def test_cross_entropy_rows_gives_exact_losses_and_the_softmax_gradient_in_place(kernels: Any) -> None:
    logits = _random(6, 1000, seed=9, scale=4.0)
    logits[0, 7] = -120.0  # the target's probability underflows fp32: the loss comes from logsumexp all the same
    targets = torch.tensor([7, 0, 999, 3, 500, 42])
    expected = F.cross_entropy(logits.double(), targets, reduction="none")
    gradient = torch.softmax(logits.double(), -1) - F.one_hot(targets, 1000).double()
    values = logits.clone()
    torch.testing.assert_close(
        kernels.cross_entropy_rows_(values, targets, False).double(), expected, rtol=1e-5, atol=0
    )
    assert torch.equal(values, logits)  # no gradient asked: the logits stay
    losses = kernels.cross_entropy_rows_(values, targets, True)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(values.double(), gradient, rtol=2**-8, atol=1e-6)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        kernels.cross_entropy_rows_(values, torch.tensor([0, 0, 0, 0, 0, 1000]), False)


def test_kernels_refuse_what_they_do_not_compute(kernels: Any) -> None:
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.swiglu_forward(torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.swiglu_forward(torch.ones(4, 2, dtype=torch.bfloat16).T)
    assert fused.operators_for(torch.ones(2, dtype=torch.bfloat16)) is kernels
    assert fused.operators_for(torch.ones(2, dtype=torch.bfloat16), torch.ones(2)) is None


PHI4_MINI_LIKE = {"partial_rotary_factor": 0.75, "tie_word_embeddings": True}
"""Phi-4-mini's departures from Phi-3 that reach the kernels' modules: partial rotary, tied embeddings."""


def _tiny_models(**options: Any) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        **{**TINY_CONFIG, "num_key_value_heads": 2, "vocab_size": 97, "pad_token_id": 0, **options}
    )
    reference = transformers.Phi3ForCausalLM(config).to(torch.bfloat16)
    ours = transformers.Phi3ForCausalLM(config).to(torch.bfloat16)
    ours.load_state_dict(reference.state_dict())
    return config, reference, ours


@pytest.mark.parametrize("options", [{}, PHI4_MINI_LIKE], ids=["phi3", "phi4-mini"])
def test_a_bf16_model_trains_through_the_kernels_with_transformers_loss_and_gradients(
    kernels: Any, options: dict[str, Any]
) -> None:
    """Full fine-tuning of a tiny bf16 Phi-3 (grouped-query attention), and of one with Phi-4-mini's partial rotary
    and tied embeddings: the same loss and, within bf16 rounding, the same gradients of every weight; the state dict
    is unchanged."""
    config, reference, ours = _tiny_models(**options)
    assert use_fused_decoder(ours) == 2 * config.num_hidden_layers
    assert {type(layer.self_attn) for layer in ours.model.layers} == {TrainingPhi3Attention}
    assert {type(layer.mlp) for layer in ours.model.layers} == {TrainingPhi3MLP}
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ids = torch.randint(1, 97, (2, 23), generator=torch.Generator().manual_seed(2))
    losses = [model(input_ids=ids, labels=ids).loss for model in (reference, ours)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)  # the forwards are transformers' to the bit
    for (name, expected), got in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert _relative_error(got.grad, expected.grad.double()) < 0.03, name


def test_without_the_kernels_the_modules_run_transformers_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHITUNE_FUSED_KERNELS", "0")
    monkeypatch.setattr(fused, "status", fused.status.__wrapped__)  # uncached: reads the variable
    assert fused.operators() is None
    assert fused.status().detail == "turned off by PHITUNE_FUSED_KERNELS=0"
    _, reference, ours = _tiny_models()
    use_fused_decoder(ours)
    ids = torch.randint(1, 97, (1, 17), generator=torch.Generator().manual_seed(3))
    losses = [model(input_ids=ids, labels=ids).loss for model in (reference, ours)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for expected, got in zip(reference.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=0)


def test_a_failed_build_is_logged_and_leaves_torch_ops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "fused.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(fused, "SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(fused, "status", fused.status.__wrapped__)
    with caplog.at_level("WARNING", logger=fused.__name__):
        assert fused.operators() is None
    assert "fused CPU kernels unavailable" in caplog.text
    status = fused.status()
    assert not status.available and "the build failed" in status.detail
    assert str(tmp_path) not in status.message  # it becomes a job event: no path of this machine
    assert not list((tmp_path / "extensions").glob("*/build-*"))  # the failed build's folder is gone


def test_a_build_past_its_time_limit_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setenv(fused.BUILD_TIMEOUT_ENV, "0.01")  # not even the compiler's process starts in that time
    monkeypatch.setattr(fused, "status", fused.status.__wrapped__)
    status = fused.status()
    assert not status.available and "the build took more than" in status.detail
    assert fused.BUILD_TIMEOUT_ENV in status.message
    assert not fused.this_build().library.exists()


def test_builds_are_named_by_their_source_and_flags(tmp_path: Path) -> None:
    build = fused.this_build()
    assert fused.this_build().name == build.name
    edited = tmp_path / "fused.cpp"
    edited.write_text(build.source.read_text() + "// another version\n")
    assert dataclasses.replace(build, source=edited).name != build.name
    assert dataclasses.replace(build, cflags=(*build.cflags, "-DOTHER")).name != build.name
    assert dataclasses.replace(build, ldflags=()).name != build.name
    assert build.name.startswith(f"phitune_fused_{build.capability.lower()}_")


_BUILD_AND_USE = """
import sys
from pathlib import Path
import torch
from phitune.trainer import fused
fused.SOURCE = Path(sys.argv[1])
kernels = fused.operators_for(torch.ones(2, 4, dtype=torch.bfloat16))
print(fused.status().message)
assert kernels is not None and kernels.swiglu_forward(torch.ones(2, 4, dtype=torch.bfloat16)).shape == (2, 2)
"""


def test_each_source_builds_once_and_a_stale_lock_never_blocks_a_build(tmp_path: Path) -> None:
    """Two installs of different versions on one machine keep a build each; a ``lock`` left in the extensions folder
    by a builder that was killed (torch's own baton, in any build folder) holds nothing up."""
    root = tmp_path / "extensions"
    build = fused.this_build()
    for name in (build.name, f"phitune_fused_{build.capability.lower()}"):
        (root / name).mkdir(parents=True)
        (root / name / "lock").touch()
    other = tmp_path / "other" / "fused.cpp"
    other.parent.mkdir()
    other.write_text(build.source.read_text() + "// another version\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root), "PHITUNE_FUSED_KERNELS": "1"}

    def use(source: Path) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _BUILD_AND_USE, str(source)], env=env, capture_output=True, text=True, timeout=1800
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    assert use(build.source).startswith("fused CPU kernels built in")
    assert use(other).startswith("fused CPU kernels built in")
    assert use(build.source).startswith("fused CPU kernels loaded in")  # the other version's build left it alone
    assert use(other).startswith("fused CPU kernels loaded in")


def test_the_build_finds_the_ninja_wheel_off_path() -> None:
    """A virtual environment's Python run without activating it: its ``bin`` (the ninja wheel's) is not on $PATH."""
    ninja = pytest.importorskip("ninja")
    path = fused._path_with_ninja("/nonexistent")
    assert path.split(os.pathsep)[0] == ninja.BIN_DIR
    assert shutil.which("ninja", path=path) == str(Path(ninja.BIN_DIR) / "ninja")
