"""The chunked cross-entropy from hidden states: the same values and gradients as ``F.cross_entropy`` on full
logits, in fp32 and under bf16 autocast, across chunk boundaries, without a graph when no gradient is wanted."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from phitune.trainer import buffers, fused, loss  # noqa: E402


@pytest.fixture(autouse=True)
def _chunk_rows_from_chunk_elements(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests size chunks through ``CHUNK_ELEMENTS`` on a 300-entry vocabulary: no minimum row count."""
    monkeypatch.setattr(loss, "MIN_CHUNK_ROWS", 1)


def _inputs(rows: int, features: int = 24, vocab: int = 300, *, head_grad: bool = True) -> tuple[Any, Any, Any]:
    generator = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, features, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, features, generator=generator) * 0.3).requires_grad_(head_grad)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return hidden, weight, targets


def _value_and_grads(fn: Any, hidden: Any, weight: Any, targets: Any, *, bf16: bool) -> tuple[Any, ...]:
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        value = fn(hidden, weight, targets)
    (value * 0.5).backward()  # a non-unit upstream gradient: the backward must scale what the forward stored
    return value.detach(), hidden.grad, weight.grad


def _reference(hidden: Any, weight: Any, targets: Any) -> Any:
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_fp32_values_and_gradients_match_cross_entropy_across_chunks(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 5 * 300)  # 5 rows per chunk: several chunks and a short last one
    hidden, weight, targets = _inputs(rows)
    ours = _value_and_grads(loss.linear_cross_entropy, hidden, weight, targets, bf16=False)
    theirs = _value_and_grads(_reference, hidden, weight, targets, bf16=False)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_cross_entropy_under_the_same_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 16 * 300)
    hidden, weight, targets = _inputs(50)
    value, grad_hidden, grad_weight = _value_and_grads(loss.linear_cross_entropy, hidden, weight, targets, bf16=True)
    ref_value, ref_hidden, ref_weight = _value_and_grads(_reference, hidden, weight, targets, bf16=True)
    assert value.dtype == torch.float32 and grad_hidden.dtype == grad_weight.dtype == torch.float32
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=2e-2, atol=2e-3)  # bf16 products, summed differently
    torch.testing.assert_close(grad_weight, ref_weight, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("bf16", [False, True])
def test_targets_far_below_the_largest_logit_keep_an_exact_finite_loss(
    bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target ~100-1000 below its row's largest logit has a probability that fp32 rounds to zero: its loss comes
    from the logits, as ``F.cross_entropy``'s does."""
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 4 * 300)
    hidden, weight, targets = _inputs(9)
    with torch.no_grad():
        hidden[2:7] *= 40  # logits in the hundreds
        targets[2:7] = (hidden[2:7] @ weight.T).argmin(1)
    ours = _value_and_grads(loss.linear_cross_entropy, hidden, weight, targets, bf16=bf16)
    theirs = _value_and_grads(_reference, hidden, weight, targets, bf16=bf16)
    assert ours[0] > 1000 and torch.isfinite(ours[0])
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-4)
    for a, b in zip(ours[1:], theirs[1:], strict=True):  # bf16: products rounded and summed differently
        torch.testing.assert_close(a, b, rtol=2e-2 if bf16 else 1e-5, atol=2e-3 if bf16 else 1e-5)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_do() -> None:
    hidden, weight, targets = _inputs(9, head_grad=False)
    _, grad_hidden, grad_weight = _value_and_grads(loss.linear_cross_entropy, hidden, weight, targets, bf16=False)
    _, ref_hidden, _ = _value_and_grads(_reference, hidden, weight, targets, bf16=False)
    assert grad_weight is None
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=1e-5, atol=1e-6)


def test_without_gradients_no_graph_is_built() -> None:
    hidden, weight, targets = _inputs(11)
    with torch.no_grad():
        value = loss.linear_cross_entropy(hidden, weight, targets)
    assert value.grad_fn is None
    torch.testing.assert_close(value, _reference(hidden, weight, targets).detach(), rtol=1e-5, atol=1e-5)


def test_no_rows_give_a_differentiable_zero() -> None:
    """A micro-batch share without labelled positions still joins the backward (every rank must)."""
    hidden, weight, targets = _inputs(0)
    value = loss.linear_cross_entropy(hidden, weight, targets)
    value.backward()
    assert float(value) == 0.0 and hidden.grad is not None and float(weight.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("path", ["fused_kernel", "torch_ops"])
def test_chunk_buffers_are_reused_between_calls_and_never_leak_between_them(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A thread keeps its chunk buffers: a smaller call reuses them, a larger one or another dtype gets new ones;
    whatever an earlier call left in them never reaches a later result. The fused kernel needs no fp32 logits."""
    if path == "torch_ops":
        monkeypatch.setattr(fused, "operators_for", lambda *tensors: None)
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 8 * 300)
    monkeypatch.setattr(buffers, "_kept", type(buffers._kept)())
    calls = [(_inputs(5), True), (_inputs(3), True), (_inputs(20), True), (_inputs(4, vocab=200), False)]
    kept = []
    for (hidden, weight, targets), bf16 in calls:
        ours = _value_and_grads(loss.linear_cross_entropy, hidden, weight, targets, bf16=bf16)
        theirs = _value_and_grads(_reference, hidden, weight, targets, bf16=bf16)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
        kept.append({key[:2]: (t.data_ptr(), t.numel()) for key, t in buffers._kept.by_key.items()})
    products, logits = ("loss products", torch.bfloat16), ("loss logits", torch.float32)
    bf16_buffers = {products, logits} if path == "torch_ops" else {products}
    assert kept[0].keys() == bf16_buffers and {kept[0][key][1] for key in bf16_buffers} == {5 * 300}
    assert kept[1] == kept[0]  # 3 rows fit in the 5 rows of the first call's buffers
    assert {kept[2][key][1] for key in bf16_buffers} == {8 * 300}  # grown to a full chunk of 8 rows
    fp32_products = ("loss products", torch.float32)  # an fp32 head: its products are the fp32 logits
    assert kept[3].keys() == {*bf16_buffers, fp32_products} and kept[3][fp32_products][1] == 4 * 200


@pytest.mark.parametrize("bf16", [False, True])
def test_a_head_bias_is_added_and_gets_its_gradient(bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Phi-3.5-MoE's LM head has a bias: the loss is that of ``F.linear(hidden, weight, bias)`` and the bias, when it
    trains (full fine-tuning), gets the column sums of the logits' gradient."""
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 6 * 300)
    hidden, weight, targets = _inputs(20)
    bias = (torch.randn(300, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_()

    def value_and_grads(fn: Any) -> tuple[Any, ...]:
        hidden.grad = weight.grad = bias.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = fn()
        (value * 0.5).backward()
        return value.detach(), hidden.grad, weight.grad, bias.grad

    ours = value_and_grads(lambda: loss.linear_cross_entropy(hidden, weight, targets, bias))
    theirs = value_and_grads(lambda: F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum"))
    assert ours[3].dtype == torch.float32
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2 if bf16 else 1e-5, atol=2e-2 if bf16 else 1e-5)


def test_a_large_vocabulary_keeps_at_least_the_minimum_rows_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real chunk sizes
    assert loss.chunk_rows(32064) == loss.CHUNK_ELEMENTS // 32064 == 261
    assert loss.chunk_rows(200064) == loss.MIN_CHUNK_ROWS == 128  # Phi-4-mini: 41 rows by elements alone
