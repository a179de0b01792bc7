"""The CPU attention op of packed examples: SDPA's values and gradients, in row blocks and head groups; SDPA where
it does not apply; kept by selective checkpointing like SDPA's kernels, so a kept layer does not redo it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from op_counter import OpCounter  # noqa: E402
from phitune.trainer import attention, packing  # noqa: E402
from phitune.trainer.loading import load_for_training  # noqa: E402
from phitune.trainer.loop import token_loss_sum  # noqa: E402
from phitune.trainer.model import apply_method  # noqa: E402
from phitune.types import LoRA  # noqa: E402

HEADS, DIM = 4, 16


def _inputs(length: int, dtype: Any, seed: int = 0) -> list[Any]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(HEADS, length, DIM, generator=generator).to(dtype).requires_grad_() for _ in range(4)]


def _reference(query: Any, key: Any, value: Any, grad: Any) -> list[Any]:
    """SDPA's causal attention in float64: the output and the gradients of query, key and value."""
    inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    out = F.scaled_dot_product_attention(*inputs, is_causal=True, scale=DIM**-0.5)
    out.backward(grad.detach().double())
    return [out.detach(), *(t.grad for t in inputs)]


def _ours(query: Any, key: Any, value: Any, grad: Any, keep: bool = True) -> list[Any]:
    out = attention.causal_attention(query, key, value, DIM**-0.5, keep=keep)
    out.backward(grad.detach())
    return [out.detach(), query.grad, key.grad, value.grad]


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("length", [1, 7, 40, 100])
def test_equals_sdpa_in_fp32_across_row_blocks_and_head_groups(
    length: int, keep: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "ROW_BLOCK", 16)  # 100 rows: 6 blocks
    monkeypatch.setattr(attention, "GROUP_BYTES", 2 * length * length * 4)  # two heads at a time
    query, key, value, grad = _inputs(length, torch.float32)
    ours = _ours(query, key, value, grad, keep)
    for got, expected in zip(ours, _reference(query, key, value, grad), strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
def test_kept_probabilities_spare_the_backward_its_scores(keep: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``keep`` the op keeps each block's softmax probabilities (the masked keys past a block's last row take
    no space), and the backward computes no scores and no softmax; without, it keeps nothing and recomputes them.
    Both match SDPA."""
    monkeypatch.setattr(attention, "ROW_BLOCK", 16)
    query, key, value, grad = _inputs(100, torch.float32)  # padded to 128 rows: 8 blocks of 16
    out, probabilities = attention.attention_and_probabilities(query, key, value, DIM**-0.5, keep)
    kept = HEADS * sum(16 * stop for stop in range(16, 129, 16))  # 9/16 of 128 x 128
    assert probabilities.numel() == (kept if keep else 0)
    with OpCounter(lambda op: op.overloadpacket in (torch.ops.aten.baddbmm, torch.ops.aten._softmax)) as counter:
        out.backward(grad)
    assert counter.calls == (0 if keep else 2 * 8)  # recomputed: the scores and the softmax of each block
    for got, expected in zip(
        (out.detach(), query.grad, key.grad, value.grad), _reference(query, key, value, grad), strict=True
    ):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_bf16_errors_are_of_sdpa_size() -> None:
    """In bf16 the scores are rounded before the softmax, as in transformers' eager attention (SDPA's kernel keeps
    them in fp32): the errors against a float64 reference stay within three times SDPA's own bf16 errors."""
    query, key, value, grad = _inputs(300, torch.bfloat16)
    expected = _reference(query, key, value, grad)
    ours = _ours(query, key, value, grad)
    inputs = [t.detach().clone().requires_grad_() for t in (query, key, value)]
    sdpa_out = F.scaled_dot_product_attention(*inputs, is_causal=True, scale=DIM**-0.5)
    sdpa_out.backward(grad.detach())
    sdpa = [sdpa_out.detach(), *(t.grad for t in inputs)]
    for name, got, theirs, exact in zip(("out", "query", "key", "value"), ours, sdpa, expected, strict=True):
        scale = exact.abs().max()
        error = float((got.double() - exact).abs().max() / scale)
        sdpa_error = float((theirs.double() - exact).abs().max() / scale)
        assert error <= 3 * sdpa_error, (name, error, sdpa_error)


def test_lengths_within_one_multiple_run_the_same_matmul_shapes() -> None:
    """oneDNN builds a primitive for every new matmul shape; examples padded to a multiple of LENGTH_MULTIPLE tokens
    share theirs, and the padding changes no value."""
    recorded = []
    for length in (attention.LENGTH_MULTIPLE + 1, 2 * attention.LENGTH_MULTIPLE - 3):
        query, key, value, grad = _inputs(length, torch.float32)
        batched_matmuls = OpCounter(lambda op: op.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm))
        with torch.no_grad(), batched_matmuls:
            out, probabilities = attention._forward(query, key, value, DIM**-0.5, True)
            context = SimpleNamespace(saved_tensors=(query, key, value, probabilities), scale=DIM**-0.5)
            grads = attention._backward(context, grad, None)[:3]
        recorded.append(batched_matmuls.shapes)
        assert out.shape == query.shape and all(g.shape == query.shape for g in grads)
        for got, expected in zip((out, *grads), _reference(query, key, value, grad), strict=True):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert recorded[0] == recorded[1] and recorded[0]


def test_sdpa_keeps_what_the_op_does_not_take() -> None:
    short = torch.zeros(1, HEADS, 8, DIM)
    assert attention.preferred(short, dropout=0.0, window=False)
    assert not attention.preferred(short, dropout=0.1, window=False)
    assert not attention.preferred(short, dropout=0.0, window=True)
    assert not attention.preferred(short.half(), dropout=0.0, window=False)
    assert not attention.preferred(torch.zeros(2, HEADS, 8, DIM), dropout=0.0, window=False)
    assert not attention.preferred(torch.zeros(1, HEADS, attention.MAX_LENGTH + 1, DIM), dropout=0.0, window=False)


def test_kept_layers_do_not_redo_attention_in_the_backward(tiny_model_dir: Path) -> None:
    from phitune.trainer import data

    def backward_attention_calls(kept: int) -> tuple[int, list[Any]]:
        torch.manual_seed(0)
        method = LoRA(r=4, dropout=0.0)
        model, _ = load_for_training(str(tiny_model_dir), method, device="cpu", precision="fp32")
        model = apply_method(model, method, gradient_checkpointing=True, keep_matmul_layers=kept)
        packing.use_varlen_attention(model)
        model.train()
        ids = torch.randint(3, 1000, (3, 20), generator=torch.Generator().manual_seed(1)).tolist()
        batch = packing.pack([data.Example(row, row) for row in ids])
        loss = token_loss_sum(model, batch)
        with OpCounter(lambda op: op is torch.ops.phitune.causal_attention.default) as counter:
            loss.backward()
        return counter.calls, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    layers = 2  # tiny-phi3
    recomputed, grads_recomputed = backward_attention_calls(0)
    kept, grads_kept = backward_attention_calls(layers)
    assert recomputed == 3 * layers  # each example of each layer, once
    assert kept == 0
    assert all(torch.equal(a, b) for a, b in zip(grads_recomputed, grads_kept, strict=True))


def test_the_trainer_keeps_probabilities_where_the_estimate_counts_them(tiny_model_dir: Path) -> None:
    """Packed examples at least :func:`probabilities_kept_from` long keep their probabilities, shorter ones
    recompute them in the backward: the rule the memory estimate follows."""
    from phitune.estimate import model_shape, probabilities_kept_from
    from phitune.trainer import data

    threshold = probabilities_kept_from(model_shape(str(tiny_model_dir)))  # 52 tokens: tiny-phi3 is narrow
    method = LoRA(r=4, dropout=0.0)
    model, _ = load_for_training(str(tiny_model_dir), method, device="cpu", precision="fp32")
    model = apply_method(model, method, gradient_checkpointing=False)
    packing.use_varlen_attention(model)
    assert not packing._keeps_probabilities(model.config, threshold - 1)
    assert packing._keeps_probabilities(model.config, threshold)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 1000, (n,), generator=generator).tolist() for n in (threshold - 10, threshold + 10)]
    loss = token_loss_sum(model.train(), packing.pack([data.Example(row, row) for row in rows]))
    with OpCounter(lambda op: op.overloadpacket is torch.ops.aten._softmax) as counter:
        loss.backward()
    assert counter.calls == 2  # the short example's softmax, recomputed in each of tiny-phi3's 2 layers


def test_under_autocast_mixed_inputs_run_in_bf16_as_sdpa_does() -> None:
    """Full fine-tuning under bf16 autocast hands over fp32 queries and keys (rotary in fp32) beside bf16 values."""
    query, key, value, _ = _inputs(10, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.causal_attention(query, key, value.bfloat16(), DIM**-0.5)
        expected = F.scaled_dot_product_attention(query, key, value.bfloat16(), is_causal=True, scale=DIM**-0.5)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
