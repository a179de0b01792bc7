"""Phi-3-small in plain PyTorch: parity with a re-reading of the published model code, the checkpoint layout, the
tiktoken tokenizer and chat format of tiny-phi3-small.

The reference below is written from microsoft/Phi-3-small-8k-instruct's remote code (the 2024 revision whose
config says ``transformers_version`` 4.38.1, read in public mirrors of the Hugging Face repository's files):
``modeling_phi3_small.py`` (``Phi3SmallSelfAttention._split_heads``, ``expand_kv_to_q_size``,
``gegelu``, ``Phi3SmallModel.forward``, ``Phi3SmallForCausalLM.forward``) and ``triton_flash_blocksparse_attn.py``
(``_get_sparse_attn_mask``: the block layout, token-causal inside blocks as ``_fwd_kernel`` masks it), checked against
vLLM's ``vllm/attention/ops/blocksparse_attention/utils.py`` (``get_sparse_attn_mask``) and mlx-lm's ``phi3small.py``
(rotary: ``nn.RoPE(head_dim, traditional=False, base=rope_embedding_base, scale=rope_position_scale)``). It is eager
attention with the dense mask the published code builds with ``return_dense=True``: one loop per head, no shared
code with ``phitune.trainer.phi3_small``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tiktoken")

from phitune.trainer.phi3_small import (  # noqa: E402
    CHAT_TEMPLATE,
    Phi3SmallConfig,
    Phi3SmallForCausalLM,
    Phi3SmallTokenizer,
    register,
)

F = torch.nn.functional


# ------------------------------------------------------------------------------------------- the reference
def published_block_mask(n_heads: int, n_ctx: int, block: int, local_blocks: int, vert_stride: int, homo: bool) -> Any:
    """``_get_sparse_attn_mask(..., return_dense=True)``'s token mask, ``[heads, n_ctx, n_ctx]`` of 0/1."""
    n_block = -(-n_ctx // block)
    q_pos = torch.arange(n_block)[None, :, None]
    k_pos = torch.arange(n_block)[None, None]
    if homo:
        vert = ((torch.arange(n_block) + 1) % vert_stride == 0)[None, None].expand(n_heads, 1, n_block)
    else:
        step = max(1, int(vert_stride / n_heads))
        vert = torch.vstack([(torch.arange(n_block) + h * step + 1) % vert_stride == 0 for h in range(n_heads)])
        vert = vert.unsqueeze(1)
    block_mask = ((q_pos >= k_pos) & ((q_pos - k_pos < local_blocks) | vert)).float()
    dense = torch.kron(block_mask, torch.ones(block, block))[..., :n_ctx, :n_ctx]
    return dense * torch.tril(torch.ones(n_ctx, n_ctx))[None]


def _rope(x: Any, base: float, scale: float) -> Any:
    dim, length = x.shape[-1], x.shape[-2]
    inv = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.outer(torch.arange(length).float() * scale, inv)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(state: dict[str, Any], c: Phi3SmallConfig, ids: Any) -> Any:
    """The published forward (eval mode, no cache) of one sequence ``ids`` ``[length]``."""
    length, hd = ids.shape[0], c.hidden_size // c.num_attention_heads
    nq, nkv = c.num_attention_heads, c.num_key_value_heads
    per = nq // nkv
    h = state["model.embed_tokens.weight"][ids] * c.mup_embedding_multiplier

    def ln(x: Any, name: str) -> Any:
        return F.layer_norm(x, (c.hidden_size,), state[f"{name}.weight"], state[f"{name}.bias"], c.layer_norm_epsilon)

    def linear(x: Any, name: str) -> Any:
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        mixed = linear(ln(h, f"{p}.input_layernorm"), f"{p}.self_attn.query_key_value")
        mixed = mixed.view(length, -1, per + 2, hd)  # [sq, group, nq/group + 2, hn]
        q = mixed[:, :, :-2].reshape(length, nq, hd).transpose(0, 1)
        k = mixed[:, :, [-2]].reshape(length, nkv, hd).transpose(0, 1)
        v = mixed[:, :, [-1]].reshape(length, nkv, hd).transpose(0, 1)
        q, k = (_rope(x, c.rope_embedding_base, c.rope_position_scale) for x in (q, k))
        k, v = torch.repeat_interleave(k, per, 0), torch.repeat_interleave(v, per, 0)  # expand_kv_to_q_size
        scale = c.mup_attn_multiplier / hd if c.mup_use_scaling else 1 / math.sqrt(hd)
        dense = c.dense_attention_every_n_layers and (i + 1) % c.dense_attention_every_n_layers == 0
        if dense:
            mask = torch.tril(torch.ones(length, length))[None].expand(nq, -1, -1)
        else:
            mask = published_block_mask(
                nq,
                length,
                c.blocksparse_block_size,
                c.blocksparse_num_local_blocks,
                c.blocksparse_vert_stride,
                c.blocksparse_homo_head_pattern,
            )
        heads = []
        for head in range(nq):
            scores = (q[head] @ k[head].T) * scale
            scores = scores.masked_fill(mask[head] == 0, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[head])
        attn = torch.stack(heads, 1).reshape(length, nq * hd)
        h = h + linear(attn, f"{p}.self_attn.dense")
        up = linear(ln(h, f"{p}.post_attention_layernorm"), f"{p}.mlp.up_proj")
        a_gelu, a_linear = up[..., ::2], up[..., 1::2]
        limit = c.gegelu_limit
        a_gelu = torch.where(torch.isinf(a_gelu), a_gelu, a_gelu.clamp(min=None, max=limit))
        a_linear = torch.where(torch.isinf(a_linear), a_linear, a_linear.clamp(min=-limit, max=limit))
        h = h + linear(a_gelu * torch.sigmoid(1.702 * a_gelu) * (a_linear + 1), f"{p}.mlp.down_proj")
    h = ln(h, "model.final_layernorm")
    logits = (h @ state["model.embed_tokens.weight"].T).float() / c.mup_width_multiplier  # lm_head tied
    dummy = torch.zeros(c.vocab_size, dtype=torch.bool)
    dummy[c.vocab_size - 96 :] = True  # 100256-100351 of the real vocabulary: the published dummy_token_indices ...
    dummy[c.vocab_size - 96 + torch.tensor([1, 5, 6, 7, 10])] = False  # ... but for endoftext, system, user, ...
    return logits.masked_fill(dummy, torch.finfo(torch.float32).min)


# ------------------------------------------------------------------------------------------- parity
SMALL = {
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "ff_intermediate_size": 96,
    "vocab_size": 300 + 96,
    "blocksparse_block_size": 16,
    "blocksparse_num_local_blocks": 2,
    "blocksparse_vert_stride": 4,
    "embedding_dropout_prob": 0.0,
    "ffn_dropout_prob": 0.0,
    "gegelu_limit": 1.5,  # low, so that the clamps act on random weights
    "mup_attn_multiplier": 1.3,
    "mup_width_multiplier": 4.0,
    "mup_embedding_multiplier": 3.0,
    "rope_embedding_base": 10000.0,
    "bos_token_id": 301,
    "eos_token_id": 301,
}


def _random_model(**overrides: Any) -> tuple[Any, Phi3SmallConfig]:
    config = Phi3SmallConfig(**{**SMALL, **overrides})
    torch.manual_seed(0)
    model = Phi3SmallForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, which the init leaves at 1 and 0
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model, config


@pytest.mark.parametrize("homo", [False, True], ids=["per-head-pattern", "homogeneous-pattern"])
def test_logits_and_loss_match_the_published_forward_in_fp32(homo: bool) -> None:
    """150 tokens: 10 blocks of 16, so the 2-block local window and the stride-4 vertical blocks both decide, per head
    (8 query heads: head sliding step 1) or for all heads alike; dense and sparse layers alternate; GQA 4:1."""
    model, config = _random_model(blocksparse_homo_head_pattern=homo)
    ids = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(1))
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    expected = reference_logits(state, config, ids)
    out = model(input_ids=ids[None], labels=ids[None])
    assert float((out.logits[0] - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    ref_loss = F.cross_entropy(expected[:-1], ids[1:])
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    # the pattern matters here: a causal-only model gives other logits
    dense, _ = _random_model(blocksparse_homo_head_pattern=homo, dense_attention_every_n_layers=1)
    assert float((dense(input_ids=ids[None]).logits[0] - expected).abs().max()) > 1e-3


def test_the_sparse_layout_is_the_published_one_at_the_real_config() -> None:
    """Phi-3-small-8k's layout (32 heads, blocks of 64, 16 local, vertical stride 8) over 2048 tokens, every head."""
    from phitune.trainer.phi3_small.modeling import sparse_attention_mask, sparse_head_offsets

    config = Phi3SmallConfig()
    positions = torch.arange(2048)[None]
    offsets = sparse_head_offsets(config)
    ours = sparse_attention_mask(positions, positions, offsets, block_size=64, local_blocks=16, vert_stride=8)[0]
    assert torch.equal(ours, published_block_mask(32, 2048, 64, 16, 8, False).bool())
    assert len(set(offsets)) == 8  # heads h and h + 8 share a pattern


def test_bf16_logits_err_as_little_as_the_published_forward_in_bf16() -> None:
    """Under bf16 autocast, within three times the error of the reference run in bf16 weights (plus 2e-3), as the
    rest of the trainer is held to."""
    model, config = _random_model()
    ids = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(2))
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    exact = reference_logits(state, config, ids).double()
    bf16_state = {name: tensor.bfloat16().float() for name, tensor in state.items()}
    theirs = reference_logits(bf16_state, config, ids).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(input_ids=ids[None]).logits[0].double()
    keep = exact > -1e30

    def relative(x: Any) -> float:
        return float((x[keep] - exact[keep]).norm() / exact[keep].norm())

    assert relative(ours) <= 3 * relative(theirs) + 2e-3


def test_packed_padded_and_cached_forwards_equal_the_sequence_alone() -> None:
    """Each example of a packed row, a left-padded row and greedy decoding with the KV cache see the positions and
    block pattern the sequence has alone."""
    model, _ = _random_model()
    a, b = torch.randint(0, 300, (70,)), torch.randint(0, 300, (45,))
    alone = [model.model(input_ids=x[None]).last_hidden_state[0] for x in (a, b)]
    positions = torch.cat([torch.arange(70), torch.arange(45)])[None]
    packed = model.model(
        input_ids=torch.cat([a, b])[None], position_ids=positions, segments=(0, 70, 115), use_cache=False
    ).last_hidden_state[0]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    padded = torch.cat([torch.zeros(25, dtype=torch.long), b])[None]
    mask = torch.cat([torch.zeros(25), torch.ones(45)]).long()[None]
    padded_out = model.model(input_ids=padded, attention_mask=mask).last_hidden_state[0]
    torch.testing.assert_close(padded_out[25:], alone[1], rtol=1e-5, atol=1e-5)
    assert bool(torch.isfinite(padded_out).all())  # padding queries, which no key serves, stay finite
    generated = model.generate(a[None, :40], max_new_tokens=30, do_sample=False, eos_token_id=None)
    again = model(input_ids=generated).logits[0, 39:-1].argmax(-1)
    assert torch.equal(again, generated[0, 40:])


def _published_8k_config() -> dict[str, Any]:
    """microsoft/Phi-3-small-8k-instruct's config.json, as ``benchmarks/write_random_checkpoint.py small`` writes it."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "write_random_checkpoint.py"
    spec = importlib.util.spec_from_file_location("write_random_checkpoint", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.PHI3_SMALL_8K)


PUBLISHED_8K_CONFIG = _published_8k_config()
"""microsoft/Phi-3-small-8k-instruct's config.json, every key."""


def test_the_published_checkpoint_layout_loads_unchanged(tmp_path: Path) -> None:
    """A folder with the published config.json keys and tensor names (no lm_head: tied) loads through
    AutoModelForCausalLM without remote code, and saves back the same names and keys."""
    from safetensors.torch import save_file

    register()
    model, config = _random_model()
    tensors = {name: t.contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    published = {**PUBLISHED_8K_CONFIG, **{key: getattr(config, key) for key in SMALL}}
    published["dense_attention_every_n_layers"] = config.dense_attention_every_n_layers
    (tmp_path / "config.json").write_text(json.dumps(published))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(loaded) is Phi3SmallForCausalLM
    ids = torch.randint(0, 300, (1, 40))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    loaded.save_pretrained(tmp_path / "saved")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as saved:
        assert set(saved.keys()) == set(tensors)
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert set(published) - {"_name_or_path", "torch_dtype", "attention_bias"} <= set(saved_config)
    assert {key: saved_config[key] for key in SMALL} == {key: published[key] for key in SMALL}
    assert "rope_parameters" not in saved_config


def test_the_128k_long_rope_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"rope_scaling.*Phi-3-small-8k"):
        _random_model(rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4})


# ------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_lays_out_the_published_special_ids_after_the_ranks(tmp_path: Path) -> None:
    """At cl100k's 100256 ranks, the special ids are the published ones (a rank file of that size with made-up
    tokens: the layout depends only on the count)."""
    from phitune.trainer.phi3_small.tokenizer import write_ranks

    ranks = {bytes([b]): b for b in range(256)} | {f"t{i}".encode(): 256 + i for i in range(100256 - 256)}
    write_ranks(ranks, tmp_path / "cl100k_base.tiktoken")
    tokenizer = Phi3SmallTokenizer(vocab_file=str(tmp_path / "cl100k_base.tiktoken"))
    published = {"<|endoftext|>": 100257, "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263}
    published |= {"<|end|>": 100266, "<|endofprompt|>": 100276, "<|dummy_id_2|>": 100256, "<|dummy_id_86|>": 100351}
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in published} == published
    assert tokenizer.vocab_size == 100352 == Phi3SmallConfig().vocab_size
    assert Phi3SmallConfig().dummy_token_indices == sorted(
        [100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352)]
    )
    assert CHAT_TEMPLATE.startswith("{{ bos_token }}")


def test_tiny_phi3_small_is_built_offline_with_the_real_special_tokens_and_chat_format(tmp_path: Path) -> None:
    """The folder loads through AutoTokenizer/AutoModelForCausalLM (no remote code); its specials follow its ranks as
    the real ones follow cl100k's; text round-trips; the chat renders as Phi-3-small's and ends turns at <|end|>."""
    from phitune.tiny import ensure_tiny
    from phitune.trainer.phi3_small.tokenizer import SPECIAL_TOKENS, read_ranks

    folder = ensure_tiny(tmp_path, "tiny-phi3-small")
    register()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer) is Phi3SmallTokenizer
    ranks = len(read_ranks(folder / "cl100k_base.tiktoken"))
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(ranks, ranks + 96))
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == ranks + 96 and config["eos_token_id"] == tokenizer.eos_token_id == ranks + 1
    text = "Grüße, 東京! <|user|>\nHi<|end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and ids[-1] == ranks + 10  # <|end|>, one token
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|endoftext|><|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|endoftext|>"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|end|>") in generation["eos_token_id"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is Phi3SmallForCausalLM
    assert [layer.self_attn.blocksparse for layer in model.model.layers] == [True, False, True, False]


def test_the_published_8k_config_builds_the_published_size() -> None:
    """Phi-3-small-8k's config.json, built on the meta device: 7,392,272,384 parameters (the tied head counted once),
    16 sparse and 16 dense layers, the estimator's shape agreeing on its linear layers and embedding."""
    from phitune.estimate.shapes import PHI3_SMALL_SHAPE

    fields = {k: v for k, v in PUBLISHED_8K_CONFIG.items() if k not in ("architectures", "auto_map", "model_type")}
    with torch.device("meta"):
        model = Phi3SmallForCausalLM(Phi3SmallConfig(**fields))
    assert sum(p.numel() for p in model.parameters()) == 7_392_272_384
    assert sum(layer.self_attn.blocksparse for layer in model.model.layers) == 16
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".weight") and "norm" not in n)
    assert weights == PHI3_SMALL_SHAPE.parameters - (2 * 32 + 1) * 4096  # the shape counts norm weights, no biases
