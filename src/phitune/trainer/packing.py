"""Padding-free micro-batches: the examples laid end to end in one row, each attending only to itself.

A padded micro-batch of chat examples is mostly padding (lengths spread from tens to thousands of tokens), and every
padded position costs a full forward and backward. :func:`pack` concatenates the examples instead, with position ids
that restart at every example (so rotary embeddings see each one as if alone) and the example boundaries.

Attention must not cross those boundaries. transformers, given packed position ids and no attention mask, would build
a ``[tokens, tokens]`` block-diagonal mask and make SDPA compute every masked-out block; here :func:`varlen_attention`
(registered with transformers as the ``"phitune_varlen"`` attention) runs causal attention on each example's slice
instead (:mod:`phitune.trainer.attention` on a CPU up to its length limit, else SDPA's kernel): the work of attention
is the sum of the examples' squared lengths, not the square of their sum, and no ``[tokens, tokens]`` mask is ever
built.

Loss cannot cross a boundary either: an example's first label is never trained (nothing before it in the example
predicts it), so the last position of one example is never asked to predict the first token of the next.

The trainer pads each row to a :func:`bucket` length. On a CPU, oneDNN builds a matmul primitive (its kernels
generated for the exact shapes) for every new number of rows, and a packed row has a new length nearly every step:
~70 new primitives per step on the benchmark model, 10-20% of its step time. The padding is one more segment of pad
tokens that attends only to itself and carries no loss, so the examples train exactly as without it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from ..estimate.memory import keeps_attention_probabilities
from ..estimate.shapes import ModelShape
from . import attention
from .data import IGNORE_INDEX, Example

ATTENTION = "phitune_varlen"
"""The attention implementation name :func:`use_varlen_attention` gives a model."""


def pack(examples: Sequence[Example], *, pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """One row of all ``examples``: ``input_ids``, ``labels``, ``position_ids`` (restarting at each example), an
    all-ones ``attention_mask``, ``cu_seq_lens``, the cumulative lengths ``[0, len0, len0 + len1, ...]``, and
    ``example_tokens``, the tokens of the examples. With ``pad_id``, the row ends in a segment of that token, without
    loss, up to its :func:`bucket` length."""
    if not examples:
        raise ValueError("pack needs at least one example")
    lengths = [len(example.input_ids) for example in examples]
    example_tokens = sum(lengths)
    if pad_id is not None and (padding := bucket(sum(lengths)) - sum(lengths)):
        examples = [*examples, Example([pad_id] * padding, [IGNORE_INDEX] * padding)]
        lengths.append(padding)
    input_ids = torch.tensor([token for example in examples for token in example.input_ids], dtype=torch.long)
    labels = torch.tensor([label for example in examples for label in example.labels], dtype=torch.long)
    cu_seq_lens = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
    labels[cu_seq_lens[:-1]] = IGNORE_INDEX  # an example's first token has nothing in the example to predict it
    position_ids = torch.cat([torch.arange(length, dtype=torch.long) for length in lengths])
    return {
        "input_ids": input_ids[None],
        "attention_mask": torch.ones_like(input_ids)[None],
        "labels": labels[None],
        "position_ids": position_ids[None],
        "cu_seq_lens": cu_seq_lens,
        "example_tokens": torch.tensor(example_tokens),
    }


def bucket(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of 1/16 to 1/32 of it (a power of two, at least 16): ~2% more tokens on
    average, and 16 row counts per doubling of the length, whose primitives oneDNN's cache (1024) keeps."""
    step = 1 << max(4, tokens.bit_length() - 5)
    return -(-tokens // step) * step


def use_varlen_attention(model: Any) -> None:
    """Make ``model`` (transformers, possibly peft-wrapped) attend through :func:`varlen_attention`. Padded batches
    keep transformers' SDPA and its masks, so the model trains on both kinds. For training only: the mask rule assumes
    queries and keys cover the same positions, which a generation cache breaks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionMaskInterface.register(ATTENTION, _padding_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(ATTENTION)


def varlen_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    segments: tuple[int, ...] | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface. Queries, keys and values are ``[batch, heads, tokens, dim]``;
    ``segments`` are the cumulative example lengths of a packed row (ints), else each row is one example. Every
    example gets causal attention on its own slice (:func:`phitune.trainer.attention.preferred` says whose kernel);
    an example longer than ``sliding_window`` gets SDPA with the window's mask. A padded batch (``attention_mask``
    given) goes to transformers' SDPA with that mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None:
        padded: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs
        )
        return padded
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves ``groups`` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    lengths = [end - start for start, end in pairwise(segments or (0, query.shape[2]))]
    outputs = []
    # split, not slicing: the backward of a split is one concatenation, of each slice a zero-filled full-size tensor
    for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True):
        window = _window_mask(q.shape[2], sliding_window, q.device)
        if attention.preferred(q, dropout=kwargs.get("dropout", 0.0), window=window is not None):
            scale = kwargs.get("scaling") or q.shape[-1] ** -0.5
            keep = _keeps_probabilities(module.config, q.shape[2])
            # squeeze, not q[0]: the backward of a select writes its gradient into a zero-filled copy
            outputs.append(attention.causal_attention(q.squeeze(0), k.squeeze(0), v.squeeze(0), scale, keep=keep)[None])
            continue
        outputs.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=window,
                dropout_p=kwargs.get("dropout", 0.0),
                is_causal=window is None,
                scale=kwargs.get("scaling"),
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _keeps_probabilities(config: Any, length: int) -> bool:
    """Whether the CPU kernel keeps the attention probabilities of an example of ``length`` tokens for the backward,
    on a model of ``config``: :func:`phitune.estimate.keeps_attention_probabilities`, the rule the memory estimate
    follows. A config without a decoder's dimensions keeps none."""
    shape = _shape_of(tuple(getattr(config, name, None) for name in _SHAPE_FIELDS))
    return shape is not None and keeps_attention_probabilities(shape, length)


_SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
)


@functools.cache
def _shape_of(values: tuple[Any, ...]) -> ModelShape | None:
    try:
        return ModelShape.model_validate({k: v for k, v in zip(_SHAPE_FIELDS, values, strict=True) if v is not None})
    except ValidationError:
        return None


def _window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Causal attention within ``window`` positions (True: attend), as transformers' sliding-window mask; None when
    the example is no longer than the window, where plain causal attention is the same."""
    if window is None or length <= window:
        return None
    position = torch.arange(length, device=device)
    distance = position[:, None] - position[None, :]
    return (distance >= 0) & (distance < window)


def _padding_mask(*, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """The mask builder of :data:`ATTENTION`: transformers' SDPA mask when some position is padding, else None
    (:func:`varlen_attention` then keeps examples apart and applies causality and sliding windows itself)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None or bool(attention_mask.all()):
        return None
    mask: torch.Tensor | None = sdpa_mask(attention_mask=attention_mask, **kwargs)
    return mask
