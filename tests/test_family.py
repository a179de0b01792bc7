"""The Phi family on the local trainer: tiny random-init Phi-4-mini, Phi-4 and Phi-3.5-MoE built offline with their
real chat formats, the loss on each format's assistant turns, numerical parity of phitune's training forward with
transformers + peft, and every method training each architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import CHAT_EXAMPLES, write_chat
from recording_control import RecordingControl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from phitune import catalog  # noqa: E402
from phitune.errors import SpecError  # noqa: E402
from phitune.tiny import TINY_MODELS, ensure_tiny  # noqa: E402
from phitune.trainer import data, loop, packing  # noqa: E402
from phitune.trainer.model import apply_method, check_method  # noqa: E402
from phitune.types import PHIMOE_EXPERT_TARGETS, PHIMOE_LORA_TARGETS, DoRA, JobSpec, LoRA, QLoRA  # noqa: E402

NEW_MODELS = ("tiny-phi4-mini", "tiny-phi4", "tiny-phi3.5-moe")
END_OF_TURN = {
    "tiny-phi3": "<|end|>",
    "tiny-phi4-mini": "<|end|>",
    "tiny-phi4": "<|im_end|>",
    "tiny-phi3.5-moe": "<|end|>",
    "tiny-phi3-small": "<|end|>",
}
CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every built-in tiny model, built once for the module."""
    cache = tmp_path_factory.mktemp("family")
    return {name: ensure_tiny(cache, name) for name in TINY_MODELS}


def _config(folder: Path) -> Any:
    return transformers.AutoConfig.from_pretrained(folder)


def test_each_tiny_model_has_its_architecture_and_chat_format(tiny: dict[str, Path]) -> None:
    mini, phi4, moe = (_config(tiny[name]) for name in NEW_MODELS)
    assert mini.architectures == ["Phi3ForCausalLM"] and mini.tie_word_embeddings
    assert mini.rope_parameters["partial_rotary_factor"] == 0.75 and mini.rope_parameters["rope_type"] == "longrope"
    assert mini.num_key_value_heads < mini.num_attention_heads  # grouped-query attention
    assert phi4.architectures == ["Phi3ForCausalLM"] and phi4.num_key_value_heads < phi4.num_attention_heads
    assert moe.architectures == ["PhimoeForCausalLM"] and (moe.num_local_experts, moe.num_experts_per_tok) == (4, 2)
    assert (moe.output_router_logits, moe.router_aux_loss_coef) == (False, 0.0)  # as Phi-3.5-MoE is released
    for name in NEW_MODELS:
        assert catalog.find(name) is not None and catalog.find(name).runs_locally  # type: ignore[union-attr]
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny[name])
        rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
        stop = json.loads((tiny[name] / "generation_config.json").read_text())["eos_token_id"]
        assert tokenizer.convert_tokens_to_ids(END_OF_TURN[name]) in stop
        assert len(tokenizer.encode(END_OF_TURN[name], add_special_tokens=False)) == 1
        expected = {
            "tiny-phi4-mini": "<|system|>Answer in one word.<|end|><|user|>What is the capital of France?<|end|>"
            "<|assistant|>Paris.<|end|>",
            "tiny-phi4": "<|im_start|>system<|im_sep|>Answer in one word.<|im_end|><|im_start|>user<|im_sep|>"
            "What is the capital of France?<|im_end|><|im_start|>assistant<|im_sep|>Paris.<|im_end|>",
            "tiny-phi3.5-moe": "<|system|>\nAnswer in one word.<|end|>\n<|user|>\nWhat is the capital of France?"
            "<|end|>\n<|assistant|>\nParis.<|end|>\n",
        }[name]
        assert rendered.startswith(expected), rendered


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_loss_falls_on_assistant_content_and_the_end_of_turn_token_only(tiny: dict[str, Path], name: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny[name])
    example = data.encode_chat(tokenizer, CONVERSATION, max_seq_length=512)
    trained: list[list[int]] = [[]]
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != data.IGNORE_INDEX:
            trained[-1].append(token)
        elif trained[-1]:
            trained.append([])
    spans = [tokenizer.decode(span, skip_special_tokens=False) for span in trained if span]
    assert spans == [f"Paris.{END_OF_TURN[name]}", f"Rome.{END_OF_TURN[name]}"]


# ------------------------------------------------------------------------------------------------------ parity
def _examples(folder: Path, count: int) -> list[data.Example]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    pairs = CHAT_EXAMPLES[:count]
    return [
        data.encode_chat(
            tokenizer,
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            max_seq_length=128,
        )
        for q, a in pairs
    ]


METHOD = LoRA(r=4, alpha=8, dropout=0.0)


def _adapted(folder: Path, dtype: Any) -> tuple[Any, Any]:
    """phitune's training model (LoRA through ``apply_method``, packed attention) and transformers + peft's own,
    with the same random non-zero adapter weights."""
    ours = apply_method(
        transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), METHOD, gradient_checkpointing=False
    )
    packing.use_varlen_attention(ours)
    reference = _reference(folder, dtype)
    ours.load_state_dict(reference.state_dict())
    ours.train()
    return ours, reference


def _reference(folder: Path, dtype: Any) -> Any:
    """transformers + peft's LoRA model, its adapter weights random (the same for every dtype)."""
    model_type = _config(folder).model_type
    adapter = peft.LoraConfig(
        r=METHOD.r,
        lora_alpha=METHOD.alpha,
        lora_dropout=0.0,
        target_modules=list(METHOD.targets(model_type)),
        target_parameters=list(METHOD.expert_targets(model_type)) or None,
        task_type="CAUSAL_LM",
    )
    reference = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), adapter)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, parameter in sorted((n, p) for n, p in reference.named_parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return reference.train()


def _ours(model: Any, batch: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """Logits at the examples' positions and the summed token loss of phitune's training forward."""
    body, head = loop._body_and_head(model)
    segments = tuple(batch["cu_seq_lens"].tolist())
    torch.manual_seed(seed)
    hidden = body(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], segments=segments, use_cache=False
    ).last_hidden_state
    torch.manual_seed(seed)
    loss = loop.token_loss_sum(model, batch)
    return head(hidden)[0, : int(batch["example_tokens"])], loss


def _theirs(model: Any, examples: list[data.Example], seed: int) -> tuple[Any, Any]:
    """The same from transformers' forward, one example at a time: concatenated logits, summed label loss."""
    logits, total = [], 0
    for example in examples:
        ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
        torch.manual_seed(seed)
        out = model(input_ids=ids, labels=labels)
        logits.append(out.logits[0])
        total = total + out.loss * int((labels[:, 1:] != data.IGNORE_INDEX).sum())
    return torch.cat(logits), total


def _grads(model: Any) -> dict[str, Any]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def _run_both(folder: Path, dtype: Any) -> tuple[Any, Any]:
    """(ours, theirs): logits, loss and adapter gradients of phitune's training forward and of transformers + peft.
    Dense models train on one packed row of three examples with its bucket padding; the mixture of experts, whose
    training-mode router draws random numbers (jitter, Gumbel sampling), on one example with the same seed."""
    moe = _config(folder).model_type == "phimoe"
    examples = _examples(folder, 1 if moe else 3)
    batch = packing.pack(examples, pad_id=None if moe else 0)
    ours, reference = _adapted(folder, dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours_out = _ours(ours, batch, seed=3)
        theirs_out = _theirs(reference, examples, seed=3)
    ours_out[1].backward()
    theirs_out[1].backward()
    return (*ours_out, _grads(ours)), (*theirs_out, _grads(reference))


def _relative(got: Any, expected: Any) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("name", NEW_MODELS)
def test_fp32_training_forward_and_adapter_gradients_match_transformers_and_peft(
    tiny: dict[str, Path], name: str
) -> None:
    """Logits and loss within 1e-5 of transformers + peft's (relative to the logits' scale). Adapter gradients within
    1e-5 of peft's, or, on the dense models' packed rows of three examples, within 3e-5 and no farther from a float64
    computation than peft's own fp32 gradient is: the packed row, the GEMM attention and the trainer's RMSNorm sum in
    other orders, and on tiny-phi4-mini both fp32 gradients sit 1-2e-5 from float64. (The mixture of experts routes
    by random draws, which differ in float64.)"""
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = _run_both(tiny[name], torch.float32)
    assert float((logits - ref_logits).abs().max()) <= 1e-5 * float(ref_logits.abs().max())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    if name == "tiny-phi3.5-moe":
        for key, grad in grads.items():
            assert _relative(grad, ref_grads[key]) <= 1e-5, key
        return
    exact = _reference(tiny[name], torch.float64)
    _theirs(exact, _examples(tiny[name], 3), seed=3)[1].backward()
    exact_grads = _grads(exact)
    for key, grad in grads.items():
        assert _relative(grad, ref_grads[key]) <= 3e-5, key
        assert _relative(grad, exact_grads[key]) <= 1.5 * _relative(ref_grads[key], exact_grads[key]) + 1e-6, key


@pytest.mark.parametrize("name", NEW_MODELS)
def test_bf16_training_forward_errs_no_more_than_transformers_own_bf16(tiny: dict[str, Path], name: str) -> None:
    """Under bf16 autocast (tiny shapes: this CPU's bf16 GEMMs are slow) phitune's forward — the fused kernels where
    they build, the GEMM attention — is as close to the fp32 result as transformers + peft's own bf16 forward: the
    logits, the loss and every adapter gradient within three times its error (SDPA keeps fp32 scores; the kernels
    round where eager attention does)."""
    exact_logits, exact_loss, exact_grads = _run_both(tiny[name], torch.float32)[1]
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = _run_both(tiny[name], torch.bfloat16)
    for ours, theirs, exact in [(logits, ref_logits, exact_logits), (loss, ref_loss, exact_loss)]:
        assert _relative(ours, exact) <= 3 * _relative(theirs, exact) + 2e-3
    for key, exact in exact_grads.items():
        assert _relative(grads[key], exact) <= 3 * _relative(ref_grads[key], exact) + 2e-2, key


def test_the_router_load_balancing_loss_is_added_as_transformers_adds_it(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A Phi-3.5-MoE config that asks for the router's auxiliary loss (``output_router_logits``,
    ``router_aux_loss_coef``) gets transformers' loss + coef * load-balancing loss, per labelled token, and its
    gradient; a packed row's padding is no token of the balance."""
    folder = tmp_path / "moe-balanced"
    config = json.loads((tiny["tiny-phi3.5-moe"] / "config.json").read_text())
    shutil.copytree(tiny["tiny-phi3.5-moe"], folder)
    (folder / "config.json").write_text(
        json.dumps({**config, "output_router_logits": True, "router_aux_loss_coef": 0.5})
    )
    examples = _examples(folder, 1)
    ours, reference = _adapted(folder, torch.float32)
    padded = packing.pack(examples, pad_id=0)
    assert int(padded["example_tokens"]) < padded["input_ids"].shape[1]  # a padding segment that must not count
    torch.manual_seed(5)
    unpadded_loss = loop.token_loss_sum(ours, packing.pack(examples))
    torch.manual_seed(5)
    ids, labels = torch.tensor([examples[0].input_ids]), torch.tensor([examples[0].labels])
    out = reference(input_ids=ids, labels=labels)
    tokens = int((labels[:, 1:] != data.IGNORE_INDEX).sum())
    assert float(out.aux_loss) > 0
    torch.testing.assert_close(unpadded_loss, out.loss * tokens, rtol=1e-5, atol=1e-5)
    unpadded_loss.backward()
    (out.loss * tokens).backward()
    for key, grad in _grads(ours).items():
        torch.testing.assert_close(grad, _grads(reference)[key], rtol=1e-5, atol=1e-5, msg=key)
    ours.zero_grad()
    with torch.no_grad():  # the padding segment changes the router's random draws, not the balance's tokens
        torch.manual_seed(5)
        body, _ = loop._body_and_head(ours)
        routed = body(
            input_ids=padded["input_ids"],
            position_ids=padded["position_ids"],
            segments=tuple(padded["cu_seq_lens"].tolist()),
            use_cache=False,
            output_router_logits=True,
        )
        with_padding = loop._load_balancing_loss(body.config, routed.router_logits, padded)
        mask = torch.ones_like(padded["attention_mask"])
        counted = loop._load_balancing_loss(body.config, routed.router_logits, {"attention_mask": mask})
    assert float(with_padding) != pytest.approx(float(counted))


# ------------------------------------------------------------------------------------------------ methods
IA3 = {"peft_type": "IA3", "target_modules": ["o_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
METHODS: dict[str, Any] = {
    "lora": LoRA(r=8, dropout=0.0),
    "qlora": QLoRA(r=8, dropout=0.0),
    "dora": DoRA(r=8, dropout=0.0),
    "full": "full",
    "peft": {"type": "peft", "config": IA3},
}


def _method_for(name: str, method: str) -> Any:
    if name == "tiny-phi3.5-moe" and method == "dora":
        return DoRA(r=8, dropout=0.0, target_parameters=())  # peft's DoRA has no form for expert tensors
    if name == "tiny-phi3.5-moe" and method == "peft":
        return {"type": "peft", "config": {**IA3, "target_modules": ["o_proj"], "feedforward_modules": []}}
    return METHODS[method]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", NEW_MODELS)
def test_every_method_trains_each_architecture(tiny: dict[str, Path], tmp_path: Path, name: str, method: str) -> None:
    """Four steps of each method on each tiny architecture lower the loss, and the output loads with transformers
    (and peft) alone; a mixture of experts says what of its experts and routers trains."""
    spec = JobSpec(
        model=name,
        training_file="train.jsonl",
        method=_method_for(name, method),
        hyperparameters={"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128},
    )
    run = loop.TrainRun(
        spec=spec,
        base_path=str(tiny[name]),
        train_path=write_chat(tmp_path / "train.jsonl"),
        valid_path=None,
        output_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "checkpoints",
    )
    (tmp_path / "checkpoints").mkdir()
    recorder = RecordingControl()
    result = loop.train(run, recorder)
    assert result.status == "succeeded" and len(recorder.losses) == 4
    assert recorder.losses[-1] < recorder.losses[0], recorder.losses
    if method == "full":
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny[name], dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, tmp_path / "out")
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == _config(tiny[name]).vocab_size
    experts = [data for text, data in recorder.messages if text.startswith("mixture of experts")]
    if name != "tiny-phi3.5-moe":
        assert not experts
        return
    (groups,) = (entry["experts"] for entry in experts if entry is not None)
    trains = {group: entry["trainable"] > 0 for group, entry in groups.items()}
    assert trains["expert_weights"] == trains["routers"] == (method == "full")
    assert trains.get("expert_adapters", False) == (method in ("lora", "qlora"))


def test_expert_adapters_need_no_dropout_and_dora_frozen_experts_named() -> None:
    """Refused before training, naming the field: peft's adapters on expert tensors take no dropout (LoRA's default
    is 0.05), DoRA cannot adapt them, and a dense model has none."""
    assert LoRA().targets("phimoe") == PHIMOE_LORA_TARGETS and LoRA().expert_targets("phimoe") == PHIMOE_EXPERT_TARGETS
    assert LoRA().expert_targets("phi3") == () and LoRA(target_parameters=()).expert_targets("phimoe") == ()
    with pytest.raises(SpecError, match=r"method\.dropout"):
        check_method(LoRA(), "phimoe")
    with pytest.raises(SpecError, match=r"method\.target_parameters.*DoRA"):
        check_method(DoRA(dropout=0.0), "phimoe")
    with pytest.raises(SpecError, match=r"method\.target_parameters"):
        check_method(LoRA(target_parameters=("experts.down_proj",)), "phi3")
    check_method(LoRA(dropout=0.0), "phimoe")
    check_method(DoRA(target_parameters=()), "phimoe")
