"""``Phi3SmallConfig``: the ``config.json`` of microsoft/Phi-3-small-8k-instruct and -128k-instruct, field for field.

The fields and their defaults are those of the published ``configuration_phi3_small.py`` (``model_type``
``phi3small``), so a checkpoint's ``config.json`` loads unchanged and saves back with the same keys.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import PretrainedConfig

SPECIAL_TOKEN_SLOTS = 96
"""Ids past the byte-pair ranks that Phi-3-small's tokenizer reserves: 100256-100351 of its 100352."""
DUMMY_SLOTS = (0, 2, 3, 4, 8, 9, *range(11, SPECIAL_TOKEN_SLOTS))
"""Offsets (from the first id past the ranks) of the tokens the model never predicts: the unused ``<|dummy_id_*|>``,
``<|fim_*|>`` and ``<|endofprompt|>``; their logits are set to the dtype's minimum."""


class Phi3SmallConfig(PretrainedConfig):  # type: ignore[misc]
    """Phi-3-small's configuration. ``dummy_token_indices`` are the vocabulary's last 96 ids laid out as the
    published tokenizer lays them (100256-100351 at the real vocabulary size)."""

    model_type = "phi3small"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 100352,
        max_position_embeddings: int = 8192,
        rope_embedding_base: float = 10**6,
        rope_position_scale: float = 1.0,
        rope_scaling: dict[str, Any] | None = None,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        hidden_act: str = "gegelu",
        gegelu_limit: float = 20.0,
        gegelu_pad_to_256: bool = True,
        ff_dim_multiplier: int | None = None,
        ff_intermediate_size: int | None = 14336,
        blocksparse_homo_head_pattern: bool = False,
        blocksparse_block_size: int = 64,
        blocksparse_num_local_blocks: int = 16,
        blocksparse_vert_stride: int = 8,
        blocksparse_triton_kernel_block_size: int = 64,
        dense_attention_every_n_layers: int | None = 2,
        embedding_dropout_prob: float = 0.1,
        attention_dropout_prob: float = 0.0,
        ffn_dropout_prob: float = 0.1,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        mup_use_scaling: bool = True,
        mup_width_multiplier: float = 8.0,
        mup_embedding_multiplier: float = 10.0,
        mup_attn_multiplier: float = 1.0,
        use_cache: bool = True,
        bos_token_id: int = 100257,
        eos_token_id: int = 100257,
        reorder_and_upcast_attn: bool = False,
        pad_sequence_to_multiple_of_64: bool = True,
        **kwargs: Any,
    ) -> None:
        if (ff_dim_multiplier is None) == (ff_intermediate_size is None):
            raise ValueError("give exactly one of ff_dim_multiplier and ff_intermediate_size")
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_embedding_base = rope_embedding_base
        self.rope_position_scale = rope_position_scale
        self.rope_scaling = rope_scaling
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.gegelu_limit = gegelu_limit
        self.gegelu_pad_to_256 = gegelu_pad_to_256
        self.ff_dim_multiplier = ff_dim_multiplier
        self.ff_intermediate_size = ff_intermediate_size
        self.blocksparse_homo_head_pattern = blocksparse_homo_head_pattern
        self.blocksparse_block_size = blocksparse_block_size
        self.blocksparse_num_local_blocks = blocksparse_num_local_blocks
        self.blocksparse_vert_stride = blocksparse_vert_stride
        self.blocksparse_triton_kernel_block_size = blocksparse_triton_kernel_block_size
        self.dense_attention_every_n_layers = dense_attention_every_n_layers
        self.embedding_dropout_prob = embedding_dropout_prob
        self.attention_dropout_prob = attention_dropout_prob
        self.ffn_dropout_prob = ffn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.mup_use_scaling = mup_use_scaling
        self.mup_width_multiplier = mup_width_multiplier
        self.mup_embedding_multiplier = mup_embedding_multiplier
        self.mup_attn_multiplier = mup_attn_multiplier
        self.use_cache = use_cache
        self.reorder_and_upcast_attn = reorder_and_upcast_attn
        self.pad_sequence_to_multiple_of_64 = pad_sequence_to_multiple_of_64
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """Phi-3-small-128k's LongRoPE settings, None for 8k: kept under the published name (transformers would
        rename it ``rope_parameters``, which the published code does not read)."""
        value: dict[str, Any] | None = self.__dict__.get("_longrope")
        return value

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        self.__dict__["_longrope"] = value

    def to_dict(self) -> dict[str, Any]:
        """The config as ``config.json`` holds it, with the published keys."""
        output: dict[str, Any] = super().to_dict()
        output.pop("_longrope", None)
        output.pop("rope_parameters", None)
        output["rope_scaling"] = self.rope_scaling
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``save_pretrained`` writes: every Phi-3-small field, defaults included, as the published
        ``config.json`` lists them (transformers would drop those equal to this class's defaults)."""
        output: dict[str, Any] = super().to_diff_dict()
        output.pop("_longrope", None)
        output.pop("rope_parameters", None)
        full = self.to_dict()
        for key in inspect.signature(Phi3SmallConfig.__init__).parameters:
            if key in full:
                output.setdefault(key, full[key])
        return output

    @property
    def intermediate_size(self) -> int:
        """The GeGELU's width: ``ff_intermediate_size``, or ``ff_dim_multiplier`` times two thirds of the hidden size
        (rounded up to a multiple of 256 with ``gegelu_pad_to_256``)."""
        if self.ff_intermediate_size is not None:
            return int(self.ff_intermediate_size)
        assert self.ff_dim_multiplier is not None  # __init__ checks that one of the two is set
        size = self.ff_dim_multiplier * (self.hidden_size // 3) * 2
        return -(-size // 256) * 256 if self.gegelu_pad_to_256 else size

    @property
    def head_dim(self) -> int:
        return int(self.hidden_size // self.num_attention_heads)

    @property
    def dummy_token_indices(self) -> list[int]:
        first = self.vocab_size - SPECIAL_TOKEN_SLOTS
        return [first + offset for offset in DUMMY_SLOTS]

    def is_dense_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` (from 0) attends densely: every ``dense_attention_every_n_layers``-th
        layer does (layers 1, 3, 5, ... at 2); the others attend block-sparsely."""
        every = self.dense_attention_every_n_layers
        return every is not None and every > 0 and (layer_idx + 1) % every == 0
