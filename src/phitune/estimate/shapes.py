"""The dimensions of a model that decide its memory and compute: :class:`ModelShape`, from the catalog's known shapes or
a ``config.json`` on this machine. Light: no torch."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from .. import catalog
from ..errors import SpecError
from ..tiny import ensure_tiny


class ModelShape(BaseModel):
    """The dimensions of a Phi decoder (or a Llama-shaped one) that decide its memory and compute. A mixture of
    experts (``num_local_experts`` > 0, Phi-3.5-MoE) has that many MLPs of ``intermediate_size`` per layer, as
    ``[experts, out, in]`` tensors beside a router, and runs ``num_experts_per_tok`` of them per token."""

    model_type: str = "phi3"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    attention_bias: bool = False
    lm_head_bias: bool = False
    dtype: str | None = Field(None, description="The checkpoint's dtype (config.json's dtype or torch_dtype).")
    torch_dtype: str | None = None

    @property
    def checkpoint_dtype(self) -> str | None:
        return self.dtype or self.torch_dtype

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * (self.head_dim or self.hidden_size // self.num_attention_heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer (of one expert's MLP in a mixture of experts), under
        Phi-3's fused and Llama's split names, and Phi-3-small's own."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        q = self.num_attention_heads * (self.head_dim or h // self.num_attention_heads)
        shapes = {
            "qkv_proj": (h, q + 2 * kv),
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_up_proj": (h, 2 * i),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if self.model_type == "phi3small":  # its published names: fused query_key_value, dense, gated up_proj
            shapes.update(query_key_value=shapes["qkv_proj"], dense=shapes["o_proj"], up_proj=(h, 2 * i))
        return shapes

    def _parameters_of(self, *names: str) -> int:
        shapes = self.linear_shapes()
        return sum(a * b for a, b in (shapes[n] for n in names))

    @property
    def experts(self) -> int:
        """Experts per layer; 0 for a dense model."""
        return self.num_local_experts

    @property
    def mlp_parameters(self) -> int:
        """One MLP's weights (one expert's in a mixture of experts)."""
        return self._parameters_of("gate_up_proj", "down_proj")

    @property
    def layer_linear_parameters(self) -> int:
        """Weights of one decoder layer's linear layers: attention and MLP, or attention alone in a mixture of
        experts, whose expert tensors are no linear layers (QLoRA quantises these weights, and only these)."""
        attention = self._parameters_of("qkv_proj", "o_proj")
        return attention if self.experts else attention + self.mlp_parameters

    @property
    def layer_expert_parameters(self) -> int:
        """Weights of one decoder layer's experts and router (0 for a dense model)."""
        return self.experts * (self.mlp_parameters + self.hidden_size)

    @property
    def layer_weight_parameters(self) -> int:
        """Every matrix weight of one decoder layer."""
        return self.layer_linear_parameters + self.layer_expert_parameters

    @property
    def layer_active_parameters(self) -> int:
        """The weights one token's forward multiplies in one decoder layer: a mixture of experts runs
        ``num_experts_per_tok`` of its MLPs."""
        return self.layer_linear_parameters + (self.active_mlps * self.mlp_parameters if self.experts else 0)

    @property
    def active_mlps(self) -> int:
        """MLPs a token passes through per layer: one, or ``num_experts_per_tok`` experts."""
        return self.num_experts_per_tok if self.experts else 1

    @property
    def embedding_parameters(self) -> int:
        """Input embedding plus LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def parameters(self) -> int:
        h, layers = self.hidden_size, self.num_hidden_layers
        norms = (2 * layers + 1) * h * (2 if self.experts else 1)  # Phi-3.5-MoE's LayerNorms have biases
        biases = layers * self.linear_shapes()["qkv_proj"][1] + layers * h if self.attention_bias else 0
        head_bias = self.vocab_size if self.lm_head_bias else 0
        return layers * self.layer_weight_parameters + self.embedding_parameters + norms + biases + head_bias


PHI3_MINI_SHAPE = ModelShape(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    torch_dtype="bfloat16",
)

PHI3_MEDIUM_SHAPE = ModelShape(
    hidden_size=5120,
    intermediate_size=17920,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=10,
    vocab_size=32064,
    torch_dtype="bfloat16",
)

PHI3_SMALL_SHAPE = ModelShape(
    model_type="phi3small",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=100352,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)

PHI35_MOE_SHAPE = ModelShape(
    model_type="phimoe",
    hidden_size=4096,
    intermediate_size=6400,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32064,
    num_local_experts=16,
    num_experts_per_tok=2,
    attention_bias=True,
    lm_head_bias=True,
    torch_dtype="bfloat16",
)

PHI4_MINI_SHAPE = ModelShape(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=24,
    num_key_value_heads=8,
    vocab_size=200064,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)

PHI4_SHAPE = ModelShape(
    hidden_size=5120,
    intermediate_size=17920,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=10,
    vocab_size=100352,
    torch_dtype="bfloat16",
)

CATALOG_SHAPES: dict[str, ModelShape] = {
    "Phi-3-mini-4k-instruct": PHI3_MINI_SHAPE,
    "Phi-3-mini-128k-instruct": PHI3_MINI_SHAPE,
    "Phi-3-small-8k-instruct": PHI3_SMALL_SHAPE,
    "Phi-3-small-128k-instruct": PHI3_SMALL_SHAPE,
    "Phi-3-medium-4k-instruct": PHI3_MEDIUM_SHAPE,
    "Phi-3-medium-128k-instruct": PHI3_MEDIUM_SHAPE,
    "Phi-3.5-mini-instruct": PHI3_MINI_SHAPE,
    "Phi-3.5-MoE-instruct": PHI35_MOE_SHAPE,
    "Phi-4-mini-instruct": PHI4_MINI_SHAPE,
    "Phi-4": PHI4_SHAPE,
}
"""The shapes of the catalog's models (their hub config.json; Phi-3-small's dense counterpart of its block-sparse
attention), for estimates without a download. The built-in tiny models are read from their folders."""


def model_folder(model: str, home: Path | None = None) -> Path | None:
    """The folder on this machine that holds a model argument's ``config.json``: a tiny model's (built on first use),
    a local folder, or the model's snapshot in the Hugging Face cache; None where there is none."""
    entry = catalog.find(model)
    if entry is not None and entry.hf_id is None:
        return ensure_tiny((home or Path.home() / ".phitune") / "models" / "base", entry.name)
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(model, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def model_shape(model: str, home: Path | None = None) -> ModelShape:
    """The shape of a model argument: the catalog, else the ``config.json`` of its :func:`model_folder`."""
    entry = catalog.find(model)
    if entry is not None and entry.name in CATALOG_SHAPES:
        return CATALOG_SHAPES[entry.name]
    folder = model_folder(model, home)
    config_path = folder / "config.json" if folder is not None else None
    if config_path is None or not config_path.is_file():
        raise SpecError("model", f"cannot estimate {model!r}: no config.json for it on this machine")
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "phi3small":  # the published keys: its MLP width, embeddings tied by default
        config = {"intermediate_size": config.get("ff_intermediate_size"), "tie_word_embeddings": True, **config}
    return ModelShape.model_validate(
        {k: v for k, v in config.items() if k in ModelShape.model_fields and v is not None}
    )
