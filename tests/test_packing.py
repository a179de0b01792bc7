"""Padding-free packing: examples laid end to end in one row train exactly as they do alone — the same loss per
example and the same gradients as padded batches under transformers' own SDPA attention, with grouped-query attention
and sliding windows too — and no example sees another."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from phitune.tiny import TINY_CONFIG  # noqa: E402
from phitune.trainer import data, packing  # noqa: E402
from phitune.trainer.loop import token_loss_sum  # noqa: E402

VOCAB = 97
LENGTHS = (13, 5, 21, 9)


def _examples(lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> list[data.Example]:
    """Random tokens; loss on a random half of the positions after the first."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        trained = torch.rand(length, generator=generator) < 0.5
        trained[0], trained[-1] = False, True
        examples.append(
            data.Example(ids, [t if keep else data.IGNORE_INDEX for t, keep in zip(ids, trained.tolist(), strict=True)])
        )
    return examples


def _models(lora: bool = False, **config: Any) -> tuple[Any, Any]:
    """(reference on transformers' SDPA, the same weights on phitune's varlen attention), fp32, eval mode."""
    torch.manual_seed(0)
    options = {**TINY_CONFIG, "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **config}
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**options)).float()
    model.set_attn_implementation("sdpa")
    if lora:
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False)
        )
    varlen = copy.deepcopy(model)
    packing.use_varlen_attention(varlen)
    return model.eval(), varlen.eval()


def _only(batch: dict[str, Any], index: int) -> dict[str, Any]:
    """``batch`` (packed) with loss on example ``index`` alone."""
    start, end = batch["cu_seq_lens"][index], batch["cu_seq_lens"][index + 1]
    labels = torch.full_like(batch["labels"], data.IGNORE_INDEX)
    labels[0, start:end] = batch["labels"][0, start:end]
    return {**batch, "labels": labels}


def test_pack_lays_the_examples_end_to_end_with_restarting_positions() -> None:
    examples = _examples((3, 2, 4))
    batch = packing.pack(examples)
    assert batch["input_ids"].tolist() == [[t for e in examples for t in e.input_ids]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 9]
    assert batch["attention_mask"].tolist() == [[1] * 9]
    starts = {0, 3, 5}
    expected = [
        data.IGNORE_INDEX if i in starts else label for i, label in enumerate(x for e in examples for x in e.labels)
    ]
    assert batch["labels"].tolist() == [expected]  # no loss across a boundary, whatever an example's first label was
    with pytest.raises(ValueError):
        packing.pack([])


@pytest.mark.parametrize(
    "config",
    [{}, {"num_key_value_heads": 2}, {"sliding_window": 6}],
    ids=["multi-head", "grouped-query", "sliding-window"],
)
def test_each_packed_example_has_the_loss_it_has_alone(config: dict[str, Any]) -> None:
    reference, varlen = _models(**config)
    examples = _examples()
    batch = packing.pack(examples)
    with torch.no_grad():
        for index, example in enumerate(examples):
            alone = float(token_loss_sum(reference, data.collate([example], pad_id=0)))
            packed = float(token_loss_sum(varlen, _only(batch, index)))
            assert packed == pytest.approx(alone, rel=1e-5), index


def test_no_example_sees_another() -> None:
    """Changing every token of the first example leaves the others' losses as they were."""
    _, varlen = _models()
    examples = _examples()
    changed = [data.Example([(t + 1) % VOCAB for t in examples[0].input_ids], examples[0].labels), *examples[1:]]
    with torch.no_grad():
        before = [float(token_loss_sum(varlen, _only(packing.pack(examples), i))) for i in range(len(examples))]
        after = [float(token_loss_sum(varlen, _only(packing.pack(changed), i))) for i in range(len(examples))]
    assert after[0] != pytest.approx(before[0])
    assert after[1:] == pytest.approx(before[1:], rel=1e-6)


def test_packed_gradients_equal_the_padded_batch_gradients() -> None:
    reference, varlen = _models(lora=True)
    reference.train(), varlen.train()
    examples = _examples()
    token_loss_sum(reference, data.collate(examples, pad_id=0)).backward()
    token_loss_sum(varlen, packing.pack(examples)).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in varlen.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-4, msg=name)  # gradients of order 10


def test_a_row_padded_to_its_bucket_trains_as_without_the_padding() -> None:
    """The trainer pads each row up to a bucket length (few distinct matmul shapes): the padding is a segment of its
    own, without loss, so the loss and gradients are those of the unpadded row."""
    _, varlen = _models(lora=True)
    varlen.train()
    examples = _examples((13, 5, 21, 10))
    padded = packing.pack(examples, pad_id=0)
    assert padded["input_ids"].shape == (1, packing.bucket(49)) == (1, 64)
    assert padded["cu_seq_lens"].tolist() == [0, 13, 18, 39, 49, 64]
    assert padded["input_ids"][0, 49:].tolist() == [0] * 15
    assert padded["position_ids"][0, 49:].tolist() == list(range(15))
    assert (padded["labels"][0, 49:] == data.IGNORE_INDEX).all()
    results = []
    for batch in (packing.pack(examples), padded):
        loss = token_loss_sum(varlen, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in varlen.named_parameters() if p.grad is not None}))
        varlen.zero_grad(set_to_none=True)
    (plain_loss, plain_grads), (padded_loss, padded_grads) = results
    torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-6, atol=0)
    assert plain_grads.keys() == padded_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_trainer_pads_its_packed_rows() -> None:
    from phitune.trainer.loop import _batching

    _, varlen = _models()
    batch = _batching(varlen, pad_id=0)(_examples((13, 5, 21, 10)))
    assert batch["input_ids"].shape == (1, 64) and batch["cu_seq_lens"].tolist()[-2:] == [49, 64]


def test_buckets_are_few_and_add_little() -> None:
    for low in (256, 1024, 4096):
        buckets = {packing.bucket(n) for n in range(low, 2 * low)}
        assert len(buckets) == 16 + 1  # 1/16 to 1/32 of the length apart, and 2 * low itself
        assert all(n <= packing.bucket(n) <= n * 17 / 16 for n in range(low, 2 * low))
    assert [packing.bucket(n) for n in (1, 16, 17, 100, 2865)] == [16, 16, 32, 112, 2944]


def test_padded_batches_still_run_through_transformers_sdpa() -> None:
    """A model set up for packing still scores padded batches correctly (their masks reach SDPA)."""
    reference, varlen = _models(sliding_window=6)
    padded = data.collate(_examples(), pad_id=0)
    with torch.no_grad():
        assert float(token_loss_sum(varlen, padded)) == pytest.approx(
            float(token_loss_sum(reference, padded)), rel=1e-5
        )


def test_a_packed_batch_needs_the_varlen_attention() -> None:
    reference, _ = _models()
    with pytest.raises(ValueError, match="use_varlen_attention"), torch.no_grad():
        token_loss_sum(reference, packing.pack(_examples()))


def test_training_builds_no_generation_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss forward asks for no key/value cache (the model's config has ``use_cache`` on, as a loaded model's has):
    a cache would copy every layer's keys and values during training."""
    from transformers import cache_utils

    built: list[object] = []
    original = cache_utils.DynamicCache.__init__

    def spy(self: object, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", spy)
    reference, varlen = _models(lora=True)
    assert varlen.config.use_cache
    token_loss_sum(varlen.train(), packing.pack(_examples())).backward()
    token_loss_sum(reference.train(), data.collate(_examples(), pad_id=0)).backward()
    assert built == []
