"""``Phi3SmallForCausalLM`` in plain PyTorch: the published checkpoint's modules, names and function, without its
Triton and flash-attention kernels, on any device.

Read from microsoft/Phi-3-small-8k-instruct's ``modeling_phi3_small.py``, ``configuration_phi3_small.py``,
``triton_blocksparse_attention_layer.py`` and ``triton_flash_blocksparse_attn.py`` (the 2024 revision whose config says
``transformers_version`` 4.38.1, in public mirrors of the Hugging Face repository's files; the same formulas are in
vLLM's ``vllm/attention/ops/blocksparse_attention/utils.py`` and mlx-lm's ``phi3small.py``):

- a decoder layer is ``x + dense(attention(LayerNorm(x)))`` then ``x + dropout(down_proj(GeGELU(up_proj(LayerNorm
  (x)))))``; the projections carry biases, the LayerNorms weights and biases;
- ``query_key_value`` is fused per key/value group: its output is ``[groups, queries per group + 2, head_dim]`` (the
  group's queries, then its key, then its value); query head ``h`` reads key/value head ``h // queries per group``;
- ``up_proj`` is interleaved: even columns feed the gate (``x * sigmoid(1.702 x)``, clamped above at
  ``gegelu_limit``), odd columns the linear part (clamped to +-``gegelu_limit``, plus one);
- muP: embeddings times ``mup_embedding_multiplier``; attention scale ``mup_attn_multiplier / head_dim`` (not
  ``1 / sqrt(head_dim)``); logits divided by ``mup_width_multiplier``; the head is the embedding (tied);
- the vocabulary's unused tokens (``config.dummy_token_indices``) get the smallest fp32 logit;
- every ``dense_attention_every_n_layers``-th layer attends densely (causal); the others block-sparsely, see
  :func:`sparse_attention_mask`.

How the block-sparse pattern is computed: as an exact dense mask. A block-sparse layer could instead run only the
blocks its pattern keeps (gathering them per query block) and skip the rest. Measured on this 2-core CPU
(``benchmarks/phi3_small_attention.py``: fp32, one sequence, 8 heads of 128, the real pattern of blocks of 64, 16
local blocks and vertical stride 8), forward plus backward of the attention alone took, mask / blocked: 1.32 / 1.24 s
at 1024 tokens (every causal block is local there: the same work), 2.91 / 3.60 s at 2048 and 9.94 / 20.8 s at 4096:
SDPA's one fused call under the mask beats a loop of small gathered calls, even where the pattern skips blocks. The
mask is also exact by construction (no online softmax to get right), runs on CPU and GPU through the same kernel,
and composes with padding, packed examples and a KV cache. It is built once per forward from token positions and
shared by every sparse layer: one ``[patterns, queries, keys]`` boolean tensor, each pattern serving the heads that
have it (8 patterns at Phi-3-small's 32 heads).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .config import Phi3SmallConfig


def gegelu(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Phi-3-small's gated GELU of an interleaved ``up_proj`` output: gate ``x[..., ::2]``, linear ``x[..., 1::2]``;
    infinities pass the clamps unchanged."""
    gate, linear = x[..., ::2], x[..., 1::2]
    if limit is not None:
        gate = torch.where(torch.isinf(gate), gate, gate.clamp(max=limit))
        linear = torch.where(torch.isinf(linear), linear, linear.clamp(min=-limit, max=limit))
    return gate * torch.sigmoid(1.702 * gate) * (linear + 1)


def sparse_head_offsets(config: Phi3SmallConfig) -> list[int]:
    """Each query head's vertical-stride offset: head ``h`` keeps the key blocks ``b`` with ``(b + h * step + 1) %
    vert_stride == 0``, ``step = max(1, vert_stride // heads)``; a homogeneous pattern gives every head offset 0."""
    heads, stride = config.num_attention_heads, config.blocksparse_vert_stride
    if config.blocksparse_homo_head_pattern:
        return [0] * heads
    step = max(1, int(stride / heads))
    return [(h * step) % stride for h in range(heads)]


def sparse_attention_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    offsets: list[int],
    *,
    block_size: int,
    local_blocks: int,
    vert_stride: int,
) -> torch.Tensor:
    """Which keys each query attends to in a block-sparse layer: ``[batch, len(offsets), queries, keys]`` booleans
    from ``[batch, queries]`` and ``[batch, keys]`` token positions (counted from the start of each sequence).

    Query block ``qb = q // block_size`` sees key block ``kb = k // block_size`` when ``qb - kb < local_blocks``
    (the local window) or ``(kb + offset + 1) % vert_stride == 0`` (the vertical stride), and within those blocks
    only keys at positions ``k <= q`` (causal)."""
    q = query_positions[:, None, :, None]
    k = key_positions[:, None, None, :]
    query_block, key_block = q // block_size, k // block_size
    shift = torch.tensor(offsets, device=k.device)[None, :, None, None]
    vertical = (key_block + shift + 1) % vert_stride == 0
    return (k <= q) & ((query_block - key_block < local_blocks) | vertical)


@dataclass
class AttentionInputs:
    """What every layer's attention needs besides its hidden states, computed once per forward: token positions of
    the queries and of the keys (the cached ones included), which keys are real (not padding), and each token's
    example in a packed row."""

    query_positions: torch.Tensor
    key_positions: torch.Tensor
    key_valid: torch.Tensor | None
    segments: torch.Tensor | None
    masks: dict[tuple[int, ...] | None, torch.Tensor] = field(default_factory=dict)
    """Masks built so far in this forward, by head offsets: every sparse layer shares one, every dense layer one."""

    def allowed(self, sparse: list[int] | None, config: Phi3SmallConfig) -> torch.Tensor:
        """``[batch, patterns, queries, keys]`` booleans: causal within each example, block-sparse when ``sparse``
        gives the heads' offsets. A padding query, which no key may serve, attends to every key instead of none (its
        output is never used; an empty row would make the softmax NaN)."""
        key = None if sparse is None else tuple(sparse)
        if key not in self.masks:
            self.masks[key] = self._build(sparse, config)
        return self.masks[key]

    def _build(self, sparse: list[int] | None, config: Phi3SmallConfig) -> torch.Tensor:
        if sparse is None:
            allowed = (self.key_positions[:, None, :] <= self.query_positions[:, :, None])[:, None]
        else:
            allowed = sparse_attention_mask(
                self.query_positions,
                self.key_positions,
                sparse,
                block_size=config.blocksparse_block_size,
                local_blocks=config.blocksparse_num_local_blocks,
                vert_stride=config.blocksparse_vert_stride,
            )
        if self.segments is not None:
            allowed = allowed & (self.segments[:, None, :, None] == self.segments[:, None, None, :])
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, None, :]
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed


class Phi3SmallRotaryEmbedding(nn.Module):
    """Rotary embedding over the whole head (``rotate_half`` layout), base ``rope_embedding_base``, positions times
    ``rope_position_scale``; computed in fp32."""

    inv_freq: torch.Tensor

    def __init__(self, config: Phi3SmallConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)
        self.position_scale = float(config.rope_position_scale)

    def frequencies(self) -> torch.Tensor:
        dim = self.config.head_dim
        return 1.0 / (self.config.rope_embedding_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (positions.float()[..., None] * self.position_scale) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [batch, 1, tokens, head_dim]
        return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Phi3SmallMLP(nn.Module):
    def __init__(self, config: Phi3SmallConfig) -> None:
        super().__init__()
        if config.hidden_act != "gegelu":
            raise ValueError(f"Phi-3-small's MLP is a GeGELU; config.hidden_act is {config.hidden_act!r}")
        self.gegelu_limit = config.gegelu_limit
        self.up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.ffn_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.dropout(self.down_proj(gegelu(self.up_proj(x), self.gegelu_limit)))
        return result


class Phi3SmallSelfAttention(nn.Module):
    def __init__(self, config: Phi3SmallConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.queries_per_group = self.num_heads // self.num_key_value_heads
        self.softmax_scale = (
            config.mup_attn_multiplier / self.head_dim if config.mup_use_scaling else self.head_dim**-0.5
        )
        width = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.sparse_offsets = None if config.is_dense_layer(layer_idx) else sparse_head_offsets(config)

    @property
    def blocksparse(self) -> bool:
        return self.sparse_offsets is not None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention: AttentionInputs,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        grouped = self.query_key_value(hidden_states).view(
            batch, length, self.num_key_value_heads, self.queries_per_group + 2, self.head_dim
        )
        query = grouped[:, :, :, :-2].reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = grouped[:, :, :, -2].transpose(1, 2)
        value = grouped[:, :, :, -1].transpose(1, 2)
        cos, sin = rotary
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        key = key.repeat_interleave(self.queries_per_group, dim=1)
        value = value.repeat_interleave(self.queries_per_group, dim=1)
        out = self._attend(query, key, value, attention)
        result: torch.Tensor = self.dense(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
        return result

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention: AttentionInputs
    ) -> torch.Tensor:
        """SDPA under the layer's exact mask. Heads sharing a pattern share its mask: with ``P`` patterns repeating
        every ``P`` heads, the heads are viewed as ``[heads / P, P]`` so one ``[P, queries, keys]`` mask serves all."""
        offsets = self.sparse_offsets
        patterns = _period(offsets) if offsets is not None else 1
        allowed = attention.allowed(offsets[:patterns] if offsets is not None else None, self.config)
        batch, heads, length, dim = query.shape
        dropout = self.config.attention_dropout_prob if self.training else 0.0

        def grouped(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, heads // patterns, patterns, x.shape[2], dim)

        if batch == 1:  # the mask broadcasts over the head groups, which take the batch dimension
            out = F.scaled_dot_product_attention(
                grouped(query)[0],
                grouped(key)[0],
                grouped(value)[0],
                attn_mask=allowed[0],
                dropout_p=dropout,
                scale=self.softmax_scale,
            )
        else:
            mask = allowed[:, None].expand(batch, heads // patterns, *allowed.shape[1:])
            out = F.scaled_dot_product_attention(
                grouped(query).flatten(0, 1),
                grouped(key).flatten(0, 1),
                grouped(value).flatten(0, 1),
                attn_mask=mask.flatten(0, 1),
                dropout_p=dropout,
                scale=self.softmax_scale,
            )
        return out.reshape(batch, heads, length, dim)


def _period(offsets: list[int]) -> int:
    """The smallest ``P`` dividing the head count with ``offsets[h] == offsets[h % P]`` for every head."""
    heads = len(offsets)
    for period in range(1, heads + 1):
        if heads % period == 0 and all(offsets[h] == offsets[h % period] for h in range(heads)):
            return period
    return heads  # pragma: no cover - the head count itself always qualifies


class Phi3SmallDecoderLayer(GradientCheckpointingLayer):  # type: ignore[misc]
    def __init__(self, config: Phi3SmallConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Phi3SmallSelfAttention(config, layer_idx)
        self.mlp = Phi3SmallMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention: AttentionInputs,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention, rotary, cache)
        result: torch.Tensor = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return result


class Phi3SmallPreTrainedModel(PreTrainedModel):  # type: ignore[misc]
    config_class = Phi3SmallConfig
    config: Phi3SmallConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Phi3SmallDecoderLayer"]
    _supports_sdpa = True
    # The trainer's packing names its attention implementation on the model (transformers' heuristic would refuse a
    # module that does not dispatch through AttentionInterface); this attention reads `segments` itself, whatever
    # the name.
    _supports_attention_backend = True
    _can_set_attn_implementation_cached_value = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, Phi3SmallRotaryEmbedding):  # buffers too: from_pretrained builds on the meta device
            module.inv_freq.copy_(module.frequencies())
        elif isinstance(module, Phi3SmallForCausalLM):
            module.dummy_tokens_mask.copy_(_dummy_mask(self.config))
        elif isinstance(module, Phi3SmallMLP):  # the published init: the MLP's output scaled by 1/sqrt(2 * layers)
            module.down_proj.weight.normal_(0.0, std / math.sqrt(2 * self.config.num_hidden_layers))


class Phi3SmallModel(Phi3SmallPreTrainedModel):
    def __init__(self, config: Phi3SmallConfig) -> None:
        super().__init__(config)
        if config.rope_scaling is not None:
            raise ValueError(
                "this Phi-3-small config has rope_scaling (Phi-3-small-128k's LongRoPE), which phitune's local "
                "Phi-3-small does not implement: use a Phi-3-small-8k checkpoint"
            )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList(Phi3SmallDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = Phi3SmallRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        segments: tuple[int, ...] | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """The decoder stack. ``segments`` (cumulative example lengths of a packed row, with ``position_ids``
        restarting at each example) keeps the examples apart, each with the positions and block pattern it would
        have alone."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = self.embedding_dropout(inputs_embeds)
        if self.config.mup_embedding_multiplier:
            hidden_states = hidden_states * self.config.mup_embedding_multiplier
        attention = self._attention_inputs(hidden_states, attention_mask, position_ids, cache, segments)
        rotary = self.rotary_emb(attention.query_positions if position_ids is None else position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention, rotary, cache=cache if use_cache else None)
        return BaseModelOutputWithPast(
            last_hidden_state=self.final_layernorm(hidden_states), past_key_values=cache if use_cache else None
        )

    def _attention_inputs(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
        segments: tuple[int, ...] | None,
    ) -> AttentionInputs:
        batch, length = hidden_states.shape[:2]
        device = hidden_states.device
        if segments is not None:
            if position_ids is None:
                raise ValueError("a packed row (segments) needs position_ids restarting at each example")
            ids = torch.repeat_interleave(
                torch.arange(len(segments) - 1, device=device),
                torch.tensor([b - a for a, b in itertools.pairwise(segments)], device=device),
            )
            positions = position_ids.to(device).expand(batch, length)
            return AttentionInputs(positions, positions, None, ids[None].expand(batch, length))
        past = cache.get_seq_length(0) if cache is not None else 0
        keys = past + length
        if attention_mask is not None and attention_mask.shape[-1] == keys and not bool(attention_mask.all()):
            valid = attention_mask.to(device).bool()
            key_positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            return AttentionInputs(key_positions[:, past:], key_positions, valid, None)
        key_positions = torch.arange(keys, device=device)[None].expand(batch, keys)
        return AttentionInputs(key_positions[:, past:], key_positions, None, None)


def _dummy_mask(config: Phi3SmallConfig) -> torch.Tensor:
    """True at the tokens the model never predicts (``config.dummy_token_indices``)."""
    dummy = torch.zeros(config.vocab_size, dtype=torch.bool)
    dummy[config.dummy_token_indices] = True
    return dummy


class Phi3SmallForCausalLM(Phi3SmallPreTrainedModel, GenerationMixin):  # type: ignore[misc]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Phi3SmallConfig) -> None:
        super().__init__(config)
        self.model = Phi3SmallModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("dummy_tokens_mask", _dummy_mask(config), persistent=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def head_adjustment(self) -> tuple[float, torch.Tensor]:
        """How the published model turns head outputs into logits, for a loss computed from hidden states: hidden
        states times the first (``1 / mup_width_multiplier``), plus the second as a bias: ``-2**100`` on the unused
        tokens (where the published model writes fp32's minimum: either way their probability is exactly 0, and this
        one stays finite in bf16), 0 elsewhere."""
        scale = 1.0 / self.config.mup_width_multiplier if self.config.mup_width_multiplier else 1.0
        floor = -(2.0**100)
        bias = torch.zeros(self.config.vocab_size, device=self.dummy_tokens_mask.device)
        return scale, bias.masked_fill_(self.dummy_tokens_mask, floor)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            segments=kwargs.get("segments"),
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        if self.config.mup_width_multiplier:
            logits = logits / self.config.mup_width_multiplier
        logits = logits.masked_fill(self.dummy_tokens_mask, torch.finfo(logits.dtype).min)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
