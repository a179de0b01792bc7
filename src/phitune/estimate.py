"""Will it fit? Peak memory, tokens per epoch and time per epoch of a local job, before anything is submitted.

The memory model follows what the local trainer holds at its peak (a backward pass after the first optimizer step):

- ``runtime``: the Python process with torch, transformers, peft and the data (measured on this stack);
- ``weights``: the base as loaded (:mod:`phitune.trainer.loading`): bf16 for frozen bases where bf16 is fast, fp32 for
  full fine-tuning, 4-bit NF4 blocks plus their scales for QLoRA's linear layers (embeddings and head in bf16). A
  frozen bf16 embedding loaded from a bf16 checkpoint stays memory-mapped on the CPU, and only the rows of the tokens
  the data holds are ever read: it counts those rows (each with a page of slack) when the data is known;
- ``trainable``: trainable parameters in fp32 with their gradients and AdamW's two moments (16 bytes each);
- ``activations``: per token and decoder layer, ``ACT_H`` x hidden + ``ACT_I`` x intermediate bytes kept for the
  backward pass, plus on a CPU the attention probabilities the attention kernel keeps on narrow models
  (:func:`attention_probability_bytes`); with gradient checkpointing ``CHECKPOINT_BYTES`` x hidden per token and
  layer, plus one layer recomputed at a time, plus the matmul outputs checkpointing keeps (:func:`kept_outputs`, in
  half the memory beside that peak: the down projection's in every layer first, then whole layers, which recompute
  no matmul, with their attention probabilities);
- ``logits``: the LM head and loss. The trainer computes them in chunks (:mod:`phitune.trainer.loss`): one chunk of
  logits at a time plus the stored gradient of the hidden states (and of the head in full fine-tuning). Where it uses
  the plain loss (prompt learning, DeepSpeed ZeRO-3), vocabulary x ``LOGIT_BYTES`` per labelled token;
- ``transient``: QLoRA's dequantisation buffer (``DEQUANTISED_WEIGHTS`` of its largest weight in bf16, fitted);
  the bf16 copies of every weight that autocast makes in full fine-tuning; and where the trainer runs on the C
  library's allocator rather than mimalloc (:mod:`phitune.trainer.allocator`), the heap's fragmentation, a
  frozen base's ``SYSTEM_HEAP_SLACK_LAYERS`` decoder layers of bf16 weights.

Time comes from the FLOPs of a step (forward, backward, the recomputation of layers that keep no matmul outputs) and
its memory-bound work, at a fraction
(``MATMUL_EFFICIENCY``) of this machine's matmul throughput measured by a short timed GEMM (:func:`probe_machine`,
cached), plus QLoRA's per-pass dequantisation at its measured rate and AdamW's update. The constants were fitted on
this project's 2-core CPU machine against measured runs; ``docs/sizing.md`` has predicted against measured values.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from . import catalog
from .errors import SpecError, WontFitError
from .trainer import allocator
from .types import PEFT, Distributed, DoRA, Full, JobSpec, LoRA, Method, QLoRA, Response

GiB = 2**30

RUNTIME_BYTES = 480 * 2**20
"""Resident memory of a trainer process before the model: interpreter, torch, transformers, peft, tokenizer, data, on
mimalloc (tiny-phi3 jobs measured 505-510 MB with peft)."""
ACT_H = 60.0
"""Activation bytes kept per token, decoder layer and unit of hidden size (bf16 autocast, LoRA on every linear)."""
ACT_I = 15.0
"""Activation bytes kept per token, decoder layer and unit of intermediate size."""
CHECKPOINT_BYTES = 4.0
"""Bytes kept per token, decoder layer and unit of hidden size with gradient checkpointing: the layer's bf16 input (2)
and the allocator's slack around it (fitted against Phi-3-mini and the 60M model at 256-token micro-batches)."""
KEEP_PROBABILITIES_MAX_LENGTH = 1024
"""The longest example whose attention probabilities the CPU attention kernel keeps (they take ``2 * heads * length``
bytes per token and layer); longer ones recompute them."""
GEMM_ATTENTION_LENGTH_MULTIPLE = 32
"""That kernel pads each example to a multiple of this many tokens (``phitune.trainer.attention.LENGTH_MULTIPLE``)."""
KEEP_PROBABILITIES_SHARE = 0.02
"""That kernel keeps an example's attention probabilities for the backward where recomputing them (the score matmul,
``2 * length² * hidden`` FLOPs per layer) would cost at least this share of the layer's matmul work on the example
(forward and input-gradient products, ``4 * length * layer parameters``): see :func:`keeps_attention_probabilities`."""
KEEP_MATMULS_SHARE = 0.5
"""Share of the memory left beside a fully recomputing job's predicted peak that kept matmul outputs may take (see
:func:`kept_outputs`); the rest is margin for what the estimate does not see."""
ACT_FULL = 1.25
"""Activations grow by this factor when every weight trains (each linear also keeps its input for its gradient)."""
LOGIT_BYTES = 14
"""Bytes per labelled token and vocabulary entry of the plain loss: bf16 logits, their fp32 copy, log-softmax,
gradient."""
LOSS_CHUNK_ELEMENTS = 8 * 2**20
"""Logits per chunk of the chunked loss (the trainer's ``CHUNK_ELEMENTS``), in the buffers it keeps: fp32 logits and
their bf16 product and gradient, 6 bytes each."""
LOSS_MIN_CHUNK_ROWS = 128
"""The fewest rows per chunk (the trainer's ``MIN_CHUNK_ROWS``): large vocabularies (Phi-4-mini's 200064) get chunks of
more than ``LOSS_CHUNK_ELEMENTS`` logits."""
PROMPT_LEARNING = frozenset({"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING"})
MATMUL_EFFICIENCY = 0.8
"""Fraction of the probed GEMM throughput that a training step's matmuls reach."""
ELEMENTWISE_FLOPS_PER_BYTE = 110.0
"""The memory-bound work (norms, activations, rotary, dropout, casts) in FLOP-equivalents per activation byte and
pass: why a mid-sized model (hidden 512) reaches a third of the GEMM rate where Phi-3-mini reaches three quarters."""
STEP_OVERHEAD_SECONDS = 0.015
"""Fixed cost per micro-batch (collation, loss, optimizer bookkeeping): what dominates at toy sizes."""
LAYER_OVERHEAD_SECONDS = 1e-3
"""Fixed cost per decoder layer and pass (operator dispatch)."""
OPTIMIZER_SECONDS_PER_PARAMETER = 8e-9
"""AdamW's memory-bound update (and gradient clipping) per trainable parameter and optimizer step, on the CPU."""
DEQUANTISED_WEIGHTS = 1.7
"""QLoRA's transient at the peak, in units of its largest linear weight in bf16: the trainer's dequantisation buffer
(one weight) and bitsandbytes' temporaries beside it (fitted on Phi-3-mini: 1.7)."""
SYSTEM_HEAP_SLACK_LAYERS = 1.0
"""Decoder layers of bf16 weights that the C library's allocator adds at the peak of a frozen base's training, over
mimalloc: free holes in its heap (Phi-3-mini: 0.5 layers for LoRA, 1.4 for QLoRA)."""
PROBE_VERSION = 2
"""Part of a cached probe's key: raised when what the probe times changes (2: dequantisation into a reused buffer)."""
PROBE_TTL_SECONDS = 3600
"""How long a probe is reused: an hour, so that one taken while the machine was busy (a quarter of the quiet rate was
seen here) does not skew estimates for long."""

PAGE_BYTES = 4096
"""A memory page: a touched row of a memory-mapped embedding brings in the pages it spans."""
_QUANT_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
"""Bytes per 4-bit weight: packed nibbles, plus one scale per block of 64 (uint8 with double quantisation, whose
fp32 scales cover 256 blocks each; fp32 without)."""


# ------------------------------------------------------------------------------------------------------- shapes
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


def model_shape(model: str, home: Path | None = None) -> ModelShape:
    """The shape of a model argument: a local folder's config.json, the catalog, or a config in the hub cache."""
    entry = catalog.find(model)
    if entry is not None and entry.name in CATALOG_SHAPES:
        return CATALOG_SHAPES[entry.name]
    config_path: Path | None = None
    if entry is not None and entry.hf_id is None:
        from .trainer.tiny import ensure_tiny

        config_path = ensure_tiny((home or Path.home() / ".phitune") / "models" / "base", entry.name) / "config.json"
    elif Path(model).expanduser().is_dir():
        config_path = Path(model).expanduser() / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
            config_path = Path(cached) if isinstance(cached, str) else None
        except ImportError:
            config_path = None
    if config_path is None or not config_path.is_file():
        raise SpecError("model", f"cannot estimate {model!r}: no config.json for it on this machine")
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "phi3small":  # the published keys: its MLP width, embeddings tied by default
        config = {"intermediate_size": config.get("ff_intermediate_size"), "tie_word_embeddings": True, **config}
    return ModelShape.model_validate(
        {k: v for k, v in config.items() if k in ModelShape.model_fields and v is not None}
    )


# -------------------------------------------------------------------------------------------------------- probe
class MachineProbe(BaseModel):
    """Measured throughput of this machine: dense matmuls in bf16 and fp32, and bitsandbytes' NF4 dequantisation."""

    device: str
    threads: int
    bf16_flops: float = Field(description="FLOP/s of a timed bf16 GEMM.")
    fp32_flops: float = Field(description="FLOP/s of a timed fp32 GEMM.")
    dequant_per_second: float | None = Field(None, description="NF4 weights dequantised to bf16 per second.")
    measured_at: float
    fingerprint: str


def default_probe_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phitune" / "machine_probe.json"


def probe_machine(
    cache: Path | None = None, *, refresh: bool = False, quantized: bool = False, device: str | None = None
) -> MachineProbe:
    """This machine's matmul throughput (and dequantisation rate when ``quantized``), from ``cache`` when it holds
    a measurement of the same machine and software younger than an hour; else measured (about a second) and saved."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fingerprint = (
        f"{platform.node()}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}|{device}|v{PROBE_VERSION}"
    )
    cached: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            cached = {}
    found = cached.get(fingerprint)
    if found and not refresh:
        probe = MachineProbe.model_validate(found)
        fresh = time.time() - probe.measured_at < PROBE_TTL_SECONDS
        if fresh and (probe.dequant_per_second is not None or not quantized):
            return probe
    from .trainer.model import bf16_supported

    probe = MachineProbe(
        device=device,
        threads=torch.get_num_threads(),
        # where bf16 is emulated (a CPU without AVX512-BF16) one full-size GEMM takes tens of seconds: time fewer rows
        bf16_flops=_gemm_flops(torch.bfloat16, device, rows=512 if bf16_supported() else 4),
        fp32_flops=_gemm_flops(torch.float32, device),
        dequant_per_second=_dequant_rate(device) if quantized else None,
        measured_at=time.time(),
        fingerprint=fingerprint,
    )
    if cache is not None:
        cached[fingerprint] = probe.model_dump()
        cache.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file of this thread's own, then an atomic rename: concurrent probes never see half a file
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, cache)
    return probe


def _timed(fn: Any, seconds: float) -> float:
    """Seconds per call of ``fn``: best of repeated calls over about ``seconds``, after a warm-up call."""
    fn()
    best = math.inf
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _gemm_flops(dtype: Any, device: str, rows: int = 512) -> float:
    """A Phi-3-mini-sized projection (``rows`` tokens x 3072 -> 3072): the best of a second of repeats, which sees the
    machine's speed between other processes' time slices."""
    import torch

    a = torch.randn(rows, 3072, dtype=dtype, device=device)
    b = torch.randn(3072, 3072, dtype=dtype, device=device)

    def matmul() -> None:
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return 2 * rows * 3072 * 3072 / _timed(matmul, 1.0)


def _dequant_rate(device: str) -> float | None:
    """NF4 -> bf16 dequantisation of a Phi-3-mini-sized weight (8192 x 3072) as QLoRA runs it on every pass: into the
    reused buffer on CPU (:mod:`phitune.trainer.quantized`), bitsandbytes' own op elsewhere. Random packed bytes and
    scales stand in for a quantised weight (the kernel's speed does not depend on them)."""
    try:
        from .trainer.quantized import dequantize_into
    except ImportError:  # no bitsandbytes
        return None
    import torch

    shape = (8192, 3072)
    packed = torch.randint(0, 256, (shape[0] * shape[1] // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(shape[0] * shape[1] // 64, dtype=torch.float32, device=device)
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    if dequantize_into(packed, absmax, blocksize=64, quant_type="nf4", out=out):
        seconds = _timed(lambda: dequantize_into(packed, absmax, blocksize=64, quant_type="nf4", out=out), 0.3)
    else:
        op = torch.ops.bitsandbytes.dequantize_4bit.default
        seconds = _timed(lambda: op(packed, absmax, 64, "nf4", shape, torch.bfloat16), 0.3)
    return float(shape[0] * shape[1] / seconds)


# ----------------------------------------------------------------------------------------------------- estimate
class MemoryBreakdown(BaseModel):
    """Bytes at the peak of a training step, by what holds them."""

    runtime: int
    weights: int
    trainable: int = Field(description="Trainable parameters with their gradients and optimizer state.")
    activations: int
    logits: int
    transient: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.trainable + self.activations + self.logits + self.transient


class Estimate(Response):
    """A job's predicted peak memory and speed on this machine, and whether it fits."""

    model: str
    method: str
    device: str
    weight_dtype: Literal["bf16", "fp32"] = Field(
        description="The dtype of the base's weights; with QLoRA, of those not quantised (embeddings, norms, LM head)."
    )
    quantization: Literal["nf4", "fp4"] | None = Field(
        None, description="QLoRA: the 4-bit type of the base's linear layers, which hold most of its weights."
    )
    compute_dtype: Literal["bf16", "fp32"]
    parameters: int
    trainable_parameters: int
    micro_batch_tokens: int = Field(description="Tokens of the largest micro-batch of one process (batch x length).")
    kept_matmul_layers: int = Field(
        0, description="Decoder layers whose matmul outputs gradient checkpointing keeps instead of recomputing."
    )
    kept_down_projections: int = Field(
        0, description="Other decoder layers that keep the output of their MLP's down projection alone."
    )
    processes: int = 1
    memory: MemoryBreakdown = Field(description="Per process.")
    peak_bytes: int = Field(description="Peak memory of the job: every process together.")
    available_bytes: int
    fits: bool
    examples: int | None = None
    tokens_per_epoch: int | None = Field(None, description="Tokens fed to the model per epoch (after truncation).")
    trainable_tokens_per_epoch: int | None = Field(None, description="Those of them that carry loss.")
    steps_per_epoch: int | None = None
    tokens_per_second: float = Field(
        description="The data's tokens trained per second, padding excluded: with a dataset, tokens_per_epoch / "
        "seconds_per_epoch."
    )
    trainable_tokens_per_second: float | None = Field(
        None, description="Those of them that carry loss: the rate a job's metrics events report as tokens_per_second."
    )
    seconds_per_epoch: float | None = None
    probe: MachineProbe
    suggestions: list[str] = Field(default_factory=list)

    @property
    def summary(self) -> str:
        time_part = f", ~{self.seconds_per_epoch / 60:.1f} min per epoch" if self.seconds_per_epoch else ""
        return (
            f"{self.method} of {self.model}: peak ~{self.peak_bytes / GiB:.2f} GiB of "
            f"{self.available_bytes / GiB:.2f} GiB available ({'fits' if self.fits else 'does not fit'}), "
            f"~{self.tokens_per_second:.1f} tokens/s{time_part}"
        )


class _Data(BaseModel):
    examples: int | None
    mean_tokens: float
    max_tokens: int
    p95_tokens: int
    trainable_fraction: float


def estimate(
    spec: JobSpec,
    *,
    home: Path | None = None,
    dataset: str | os.PathLike[str] | None = None,
    tokens_per_example: int | None = None,
    available_bytes: int | None = None,
    probe: MachineProbe | None = None,
) -> Estimate:
    """Predict ``spec``'s peak memory and speed on this machine with the local trainer.

    Token counts come from ``dataset`` (a JSONL file; counted with the model's tokenizer where it is on this machine,
    else approximately), else every example is taken as ``tokens_per_example`` long (default: ``max_seq_length``,
    the worst case). ``available_bytes`` defaults to the memory available now (GPU memory on CUDA).
    """
    hp = spec.hyperparameters
    shape = model_shape(spec.model, home)
    data = _dataset_tokens(dataset, spec, home) if dataset is not None else None
    length = min(hp.max_seq_length, data.max_tokens if data else tokens_per_example or hp.max_seq_length)
    device = "cuda" if _cuda() else "cpu"
    probe = probe or probe_machine(default_probe_cache(), quantized=isinstance(spec.method, QLoRA))
    compute = _compute_dtype(spec)
    processes = spec.distributed.nproc
    micro = math.ceil(hp.batch_size / processes)
    embedding_rows = round(data.examples * data.mean_tokens) if data and data.examples and device == "cpu" else None
    probabilities = attention_probability_bytes(shape, length, compute, device)
    memory = _memory(shape, spec, micro * length, compute, probabilities, embedding_rows=embedding_rows)
    peak = _job_peak(memory, spec)
    available = available_bytes if available_bytes is not None else available_memory(device)
    kept = kept_outputs(shape, spec, micro * length, compute, available - peak, probabilities)
    if kept.layers or kept.down_projections:
        memory.activations += kept.bytes(shape, micro * length, compute, probabilities)
        peak = _job_peak(memory, spec)
    trainable = _trainable_parameters(shape, spec)

    # -- speed. A process's micro-batch is its examples packed into one row, so it costs their own tokens (the mean
    # length each); prompt learning pads them to the longest of the batch instead (about the p95 length).
    mean = min(hp.max_seq_length, data.mean_tokens) if data else float(length)
    padded = data is not None and hp.batch_size > 1 and _pads_batches(spec)
    cost_length = min(hp.max_seq_length, data.p95_tokens) if data is not None and padded else mean
    seconds_per_micro = _seconds(shape, spec, micro, cost_length, compute, probe, kept)
    tokens_per_second = processes * micro * mean / seconds_per_micro
    examples = data.examples if data else None
    epoch_tokens = trainable_tokens = steps = epoch_seconds = trainable_per_second = None
    if examples and data is not None:
        epoch_tokens = round(examples * mean)
        trainable_tokens = round(epoch_tokens * data.trainable_fraction)
        full, rest = divmod(examples, hp.batch_size)  # the last micro-batch of an epoch may be short
        steps = math.ceil((full + (rest > 0)) / hp.gradient_accumulation_steps)
        epoch_seconds = full * seconds_per_micro
        if rest:
            epoch_seconds += _seconds(shape, spec, math.ceil(rest / processes), cost_length, compute, probe, kept)
        tokens_per_second = epoch_tokens / epoch_seconds  # the printed figures agree: time x tokens/s = tokens
        trainable_per_second = trainable_tokens / epoch_seconds
    result = Estimate(
        model=spec.model,
        method=spec.method.type,
        device=device,
        weight_dtype=_weight_dtype(spec),
        quantization=spec.method.quant_type if isinstance(spec.method, QLoRA) else None,
        compute_dtype=compute,
        parameters=shape.parameters,
        trainable_parameters=trainable,
        micro_batch_tokens=micro * length,
        kept_matmul_layers=kept.layers,
        kept_down_projections=kept.down_projections,
        processes=processes,
        memory=memory,
        peak_bytes=peak,
        available_bytes=available,
        fits=peak <= available,
        examples=examples,
        tokens_per_epoch=epoch_tokens,
        trainable_tokens_per_epoch=trainable_tokens,
        steps_per_epoch=steps,
        tokens_per_second=tokens_per_second,
        trainable_tokens_per_second=trainable_per_second,
        seconds_per_epoch=epoch_seconds,
        probe=probe,
    )
    if not result.fits:
        result.suggestions = _suggestions(shape, spec, length, compute, available, embedding_rows, device)
    return result


def check_fits(
    spec: JobSpec,
    *,
    home: Path | None = None,
    dataset: str | os.PathLike[str] | None = None,
    available_bytes: int | None = None,
) -> Estimate | None:
    """Refuse a job that cannot fit: :func:`estimate`, raising :class:`~phitune.errors.WontFitError` (with the numbers
    and the changes that would fit) when the predicted peak exceeds the available memory. Returns the estimate, or
    None where the model's shape is not on this machine (a hub id not downloaded yet): then nothing is refused."""
    try:
        model_shape(spec.model, home)
    except SpecError:
        return None
    result = estimate(spec, home=home, dataset=dataset, available_bytes=available_bytes)
    if not result.fits:
        memory = result.memory
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in memory.model_dump().items() if v)
        per_process = f" per process, {result.processes} processes" if result.processes > 1 else ""
        raise WontFitError(
            f"{result.method} fine-tuning of {result.model} needs ~{result.peak_bytes / GiB:.1f} GiB at its peak "
            f"({parts} GiB{per_process}) but {result.available_bytes / GiB:.1f} GiB is available on this "
            f"{result.device}. What would fit:",
            result,
            result.suggestions or ["nothing within reach: a smaller model, or a machine with more memory"],
        )
    return result


def matmul_output_bytes(shape: ModelShape, compute: str, probabilities: int = 0) -> int:
    """Bytes per token of one decoder layer's matmul and attention outputs (what a layer that keeps them holds);
    ``probabilities``: the attention probabilities' (:func:`attention_probability_bytes`), kept with them."""
    shapes = shape.linear_shapes()
    mlp = shape.active_mlps * (shapes["gate_up_proj"][1] + shapes["down_proj"][1])
    values = shapes["qkv_proj"][1] + shapes["o_proj"][1] + mlp + shape.hidden_size
    return values * (2 if compute == "bf16" else 4) + probabilities


def probabilities_kept_from(shape: ModelShape) -> int:
    """The shortest example whose attention probabilities the CPU attention kernel keeps for the backward (see
    :data:`KEEP_PROBABILITIES_SHARE`): ~180 tokens on the 32M-parameter benchmark model (hidden 384), where attention
    is a large share of the work; ~1500 tokens on Phi-3-mini, beyond :data:`KEEP_PROBABILITIES_MAX_LENGTH`, so Phi-3's
    real sizes always recompute them, as a flash kernel does."""
    return math.ceil(2 * KEEP_PROBABILITIES_SHARE * shape.layer_active_parameters / shape.hidden_size)


def keeps_attention_probabilities(shape: ModelShape, length: int) -> bool:
    """Whether the CPU attention kernel (``phitune.trainer.attention``) keeps the probabilities of an example of
    ``length`` tokens for the backward, on a model of ``shape``; the trainer asks this too."""
    return probabilities_kept_from(shape) <= length <= KEEP_PROBABILITIES_MAX_LENGTH


def attention_probability_bytes(shape: ModelShape, length: int, compute: str, device: str) -> int:
    """Bytes per token and decoder layer of the softmax probabilities that the CPU attention kernel
    (``phitune.trainer.attention``) keeps for the backward, in examples of ``length`` tokens: heads x the padded
    length where it keeps them (:func:`keeps_attention_probabilities`). Nothing on a GPU (SDPA's kernels)."""
    if device != "cpu" or not keeps_attention_probabilities(shape, length):
        return 0
    padded = length + -length % GEMM_ATTENTION_LENGTH_MULTIPLE
    return shape.num_attention_heads * padded * (2 if compute == "bf16" else 4)


def down_projection_output_bytes(shape: ModelShape, compute: str) -> int:
    """Bytes per token of one decoder layer's down-projection output: the matmul that saves the most recomputation per
    byte kept (its inner dimension is the intermediate size, the others' the hidden size)."""
    return shape.hidden_size * (2 if compute == "bf16" else 4)


class KeptOutputs(BaseModel):
    """What gradient checkpointing keeps instead of recomputing: every matmul and attention output of the first
    ``layers`` decoder layers, the down projection's alone in the next ``down_projections``."""

    layers: int = 0
    down_projections: int = 0

    def bytes(self, shape: ModelShape, tokens: int, compute: str, probabilities: int = 0) -> int:
        return tokens * (
            self.layers * matmul_output_bytes(shape, compute, probabilities)
            + self.down_projections * down_projection_output_bytes(shape, compute)
        )


def kept_outputs(
    shape: ModelShape, spec: JobSpec, tokens: int, compute: str, headroom: int, probabilities: int = 0
) -> KeptOutputs:
    """What gradient checkpointing can keep in ``KEEP_MATMULS_SHARE`` of ``headroom`` (the memory beside a fully
    recomputing job's peak), the most recomputation saved per byte first: the down projection's output in every
    layer, then whole layers (so that only element-wise work is recomputed in them: a third less compute for a frozen
    base). Single-process jobs only; nothing without gradient checkpointing, where every activation is kept anyway."""
    if not spec.hyperparameters.gradient_checkpointing or spec.distributed.nproc > 1 or headroom <= 0:
        return KeptOutputs()
    layers, budget = shape.num_hidden_layers, int(headroom * KEEP_MATMULS_SHARE)
    down = max(1, tokens * down_projection_output_bytes(shape, compute))
    if budget < layers * down:
        return KeptOutputs(down_projections=budget // down)
    # a whole layer beyond its down projection
    upgrade = max(1, tokens * matmul_output_bytes(shape, compute, probabilities) - down)
    whole = min(layers, (budget - layers * down) // upgrade)
    return KeptOutputs(layers=whole, down_projections=layers - whole)


def plan_kept_outputs(
    spec: JobSpec, model_path: str, tokens: int, longest: int, *, distinct_tokens: int | None = None
) -> tuple[KeptOutputs, int]:
    """For the trainer: (what checkpointing keeps, decoder layers) for ``spec`` on the model at ``model_path``, with
    micro-batches of at most ``tokens`` tokens, examples of at most ``longest`` and ``distinct_tokens`` token ids in
    the data, against :func:`available_memory`."""
    shape = model_shape(model_path)
    compute = _compute_dtype(spec)
    device = "cuda" if _cuda() else "cpu"
    rows = distinct_tokens if device == "cpu" else None
    probabilities = attention_probability_bytes(shape, longest, compute, device)
    peak = _job_peak(_memory(shape, spec, tokens, compute, probabilities, embedding_rows=rows), spec)
    headroom = available_memory(device) - peak
    return kept_outputs(shape, spec, tokens, compute, headroom, probabilities), shape.num_hidden_layers


MEMORY_LIMIT_ENV = "PHITUNE_MEMORY_LIMIT"
"""The memory a local job may use (``24GiB``, ``512MiB``, ``8G`` or bytes): the fit check's available memory."""
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    **{f"{prefix}{suffix}": 1024 ** (i + 1) for i, prefix in enumerate("kmgt") for suffix in ("", "ib")},
    **{f"{prefix}b": 1000 ** (i + 1) for i, prefix in enumerate("kmgt")},
}


def memory_limit() -> int | None:
    """``$PHITUNE_MEMORY_LIMIT`` in bytes, or None where unset. ``K``, ``M``, ``G``, ``T`` and ``KiB``... are powers
    of 1024, ``KB``... of 1000."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text:
        return None
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match[2].lower()) if match else None
    if match is None or unit is None or float(match[1]) <= 0:
        raise SpecError(MEMORY_LIMIT_ENV, f"{text!r} is not a size: give bytes or a size with a unit, like 24GiB")
    return int(float(match[1]) * unit)


def available_memory(device: str = "cpu") -> int:
    """The memory a local job may use: ``$PHITUNE_MEMORY_LIMIT`` where set, else what is available now (free GPU
    memory on CUDA)."""
    limit = memory_limit()
    return limit if limit is not None else _available(device)


# ------------------------------------------------------------------------------------------------------ details
def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _available(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _weight_dtype(spec: JobSpec) -> Literal["bf16", "fp32"]:
    from .trainer.loading import base_dtype_name

    return base_dtype_name(spec.method, spec.hyperparameters.precision)


def _compute_dtype(spec: JobSpec) -> Literal["bf16", "fp32"]:
    from .trainer.model import bf16_supported

    precision = spec.hyperparameters.precision
    return "bf16" if precision == "bf16" or (precision == "auto" and bf16_supported()) else "fp32"


def _trainable_parameters(shape: ModelShape, spec: JobSpec) -> int:
    method = spec.method
    if isinstance(method, Full):
        return shape.parameters
    if isinstance(method, PEFT):
        return _count_on_meta(shape, method)
    linear = shape.linear_shapes()
    expert_tensors = {
        "experts.gate_up_proj": linear["gate_up_proj"],
        "experts.down_proj": linear["down_proj"],
    }
    per_layer = 0
    for target in method.targets(shape.model_type):
        if target not in linear:
            return _count_on_meta(shape, method)
        fan_in, fan_out = linear[target]
        per_layer += method.r * (fan_in + fan_out) + (fan_out if isinstance(method, DoRA) else 0)
    for target in method.expert_targets(shape.model_type):  # one rank-r adapter per expert
        if target not in expert_tensors:
            return _count_on_meta(shape, method)
        per_layer += shape.experts * method.r * sum(expert_tensors[target])
    return shape.num_hidden_layers * per_layer


def _count_on_meta(shape: ModelShape, method: LoRA | QLoRA | DoRA | PEFT) -> int:
    """Trainable parameters counted by building the model on the meta device (no memory) and applying peft."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .trainer.model import peft_config

    fields = shape.model_dump(exclude_none=True, exclude={"model_type", "dtype", "torch_dtype"})
    try:
        config = AutoConfig.for_model(shape.model_type, **fields, pad_token_id=None)
    except ValueError as exc:
        raise SpecError("model", f"transformers has no {shape.model_type} model to count parameters on") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if isinstance(method, PEFT):
        adapter = peft_config(method)
    else:
        adapter = peft.LoraConfig(
            r=method.r,
            target_modules=list(method.targets(shape.model_type)),
            target_parameters=list(method.expert_targets(shape.model_type)) or None,
            lora_dropout=0.0,
            use_dora=isinstance(method, DoRA),
            task_type="CAUSAL_LM",
        )
    try:
        wrapped = peft.get_peft_model(model, adapter)
    except ValueError as exc:
        raise SpecError("method", f"peft cannot apply it to {type(model).__name__}: {exc}") from exc
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def _memory(
    shape: ModelShape,
    spec: JobSpec,
    tokens: int,
    compute: str,
    probabilities: int,
    *,
    embedding_rows: int | None = None,
) -> MemoryBreakdown:
    """Bytes at the peak of one process that trains micro-batches of ``tokens`` tokens, keeping ``probabilities``
    bytes of attention probabilities per token and layer (:func:`attention_probability_bytes`). ``embedding_rows``:
    how many rows of a memory-mapped embedding the data can touch (its distinct tokens, or an upper bound); None:
    all."""
    method, hp = spec.method, spec.hyperparameters
    h, i, layers, vocab = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.vocab_size
    weight_bytes = 2 if _weight_dtype(spec) == "bf16" else 4
    linear = layers * shape.layer_linear_parameters
    other = shape.parameters - linear
    if isinstance(method, QLoRA):
        weights = round(linear * _QUANT_BYTES[method.double_quant]) + other * weight_bytes
    else:
        weights = shape.parameters * weight_bytes
    mapped = not isinstance(method, Full) and shape.checkpoint_dtype == "bfloat16" and not shape.tie_word_embeddings
    if embedding_rows is not None and mapped and weight_bytes == 2:
        row = h * weight_bytes
        weights -= max(0, vocab * row - min(embedding_rows, vocab) * (row + PAGE_BYTES))
    trainable = _trainable_parameters(shape, spec)
    trainable_bytes = trainable * (12 if isinstance(method, Full) else 16)  # Full: the fp32 weights are `weights`
    act_bytes = 1.0 if compute == "bf16" else 2.0  # fp32 compute keeps fp32 activations
    per_layer = tokens * (ACT_H * h + ACT_I * i * shape.active_mlps) * act_bytes
    per_layer = per_layer * (ACT_FULL if isinstance(method, Full) else 1.0) + tokens * probabilities
    # peft's expert adapters merge into each targeted expert tensor on every forward: a layer's merged weights are
    # kept for its backward, and their gradient made there
    merged = _merged_expert_parameters(shape, method) * weight_bytes
    if hp.gradient_checkpointing:
        activations = round(layers * tokens * h * CHECKPOINT_BYTES * act_bytes + per_layer + merged)
    else:
        activations = round(layers * (per_layer + merged))
    layout = spec.distributed
    plain_loss = _pads_batches(spec) or (layout.strategy == "deepspeed" and (layout.zero_stage or 0) >= 3)
    if plain_loss:
        logits = tokens * vocab * LOGIT_BYTES
    else:
        stored = tokens * h * act_bytes * 2  # the gradient of the hidden states, in the compute dtype
        chunk = max(LOSS_CHUNK_ELEMENTS, LOSS_MIN_CHUNK_ROWS * vocab)
        logits = round(chunk * 6 + stored + (vocab * h * 4 if isinstance(method, Full) else 0))
    transient = merged
    if isinstance(method, QLoRA):
        quantized = ("qkv_proj", "o_proj") if shape.experts else tuple(shape.linear_shapes())
        largest = max(a * b for name, (a, b) in shape.linear_shapes().items() if name in quantized)
        transient += round(DEQUANTISED_WEIGHTS * largest * 2)
    if isinstance(method, Full):  # autocast's bf16 copy of each weight, saved for backward
        transient += layers * shape.layer_weight_parameters * 2 if compute == "bf16" else 0
    elif allocator.for_trainers() == "system":
        transient += round(SYSTEM_HEAP_SLACK_LAYERS * shape.layer_weight_parameters * 2)
    return MemoryBreakdown(
        runtime=RUNTIME_BYTES,
        weights=weights,
        trainable=trainable_bytes,
        activations=activations,
        logits=logits,
        transient=transient,
    )


def _merged_expert_parameters(shape: ModelShape, method: Method) -> int:
    """Weights of one layer's expert tensors that the method's expert adapters merge into (0 without)."""
    if not isinstance(method, LoRA | QLoRA | DoRA):
        return 0
    sizes = {"experts.gate_up_proj": 2, "experts.down_proj": 1}  # in units of hidden x intermediate, per expert
    units = sum(sizes.get(target, 0) for target in method.expert_targets(shape.model_type))
    return shape.experts * units * shape.hidden_size * shape.intermediate_size


def _job_peak(memory: MemoryBreakdown, spec: JobSpec) -> int:
    """Every process of the job together; FSDP and ZeRO shard what they shard across the processes."""
    return spec.distributed.nproc * (memory.total - _sharded(memory, spec)) + _sharded(memory, spec)


def _process_peak(memory: MemoryBreakdown, spec: JobSpec) -> int:
    """One process of the job (one GPU's share under FSDP or ZeRO)."""
    sharded = _sharded(memory, spec)
    return memory.total - sharded + sharded // spec.distributed.nproc


def _sharded(memory: MemoryBreakdown, spec: JobSpec) -> int:
    """The bytes of one process's memory that FSDP or ZeRO divide among the processes (none with one process)."""
    layout = spec.distributed
    if layout.nproc == 1:
        return 0
    if layout.strategy == "fsdp" or (layout.strategy == "deepspeed" and (layout.zero_stage or 0) >= 3):
        return memory.weights + memory.trainable
    if layout.strategy == "deepspeed":
        return memory.trainable * 3 // 4  # ZeRO-1/2 shard optimizer state (and gradients at 2)
    return 0


def _pads_batches(spec: JobSpec) -> bool:
    """Whether the trainer pads a micro-batch's examples to the longest (prompt learning) rather than packing them."""
    method = spec.method
    return isinstance(method, PEFT) and str(method.config.get("peft_type", "")).upper() in PROMPT_LEARNING


def _seconds(
    shape: ModelShape,
    spec: JobSpec,
    micro: int,
    length: float,
    compute: str,
    probe: MachineProbe,
    kept: KeptOutputs | None = None,
) -> float:
    """Seconds per micro-batch of ``micro`` sequences of ``length`` tokens (a typical length: the mean where they are
    packed); ``kept``: the matmuls not recomputed."""
    kept = kept or KeptOutputs()
    method, hp = spec.method, spec.hyperparameters
    layers, tokens = shape.num_hidden_layers, micro * length
    decoder = 2 * tokens * layers * shape.layer_active_parameters
    attention = 2 * tokens * layers * length * shape.hidden_size  # causal: half of 4 * S * H per token
    head = 2 * tokens * shape.vocab_size * shape.hidden_size
    backward = 2 if isinstance(method, Full) else 1  # a frozen base needs input gradients only
    passes = 1 + backward + (1 if hp.gradient_checkpointing else 0)
    matmul_passes = passes - (kept.layers / layers if hp.gradient_checkpointing else 0)
    inner, outer = shape.linear_shapes()["down_proj"]
    unrepeated = 2 * tokens * inner * outer * shape.active_mlps * kept.down_projections
    unrepeated = unrepeated if hp.gradient_checkpointing else 0
    activation_bytes = (
        tokens * layers * (ACT_H * shape.hidden_size + ACT_I * shape.intermediate_size * shape.active_mlps)
    )
    work = (
        (decoder + attention) * matmul_passes
        - unrepeated
        + head * (1 + backward)
        + ELEMENTWISE_FLOPS_PER_BYTE * activation_bytes * passes
    )
    rate = (probe.bf16_flops if compute == "bf16" else probe.fp32_flops) * MATMUL_EFFICIENCY
    seconds = work / rate + STEP_OVERHEAD_SECONDS + LAYER_OVERHEAD_SECONDS * layers * passes
    if isinstance(method, LoRA | QLoRA | DoRA):
        # expert adapters: each forward (and its recomputation) merges them into every expert tensor they target,
        # 2 r FLOPs per weight, and the backward takes two products as large for the factors' gradients
        forwards = passes - backward
        seconds += 2 * method.r * layers * _merged_expert_parameters(shape, method) * (forwards + 2) / rate
    if probe.device == "cpu":
        optimizer = OPTIMIZER_SECONDS_PER_PARAMETER * _trainable_parameters(shape, spec)
        seconds += optimizer / hp.gradient_accumulation_steps
    if isinstance(method, QLoRA) and probe.dequant_per_second:
        dequant_passes = 2 + (1 if hp.gradient_checkpointing else 0)
        seconds += dequant_passes * layers * shape.layer_linear_parameters / probe.dequant_per_second
    return seconds


def _dataset_tokens(dataset: str | os.PathLike[str], spec: JobSpec, home: Path | None) -> _Data:
    from .datasets import counter_for, validate

    tokenizer_dir: Path | None = None
    try:
        from .trainer.model import resolve_base

        base = Path(resolve_base(spec.model, home or Path.home() / ".phitune"))
        tokenizer_dir = base if (base / "tokenizer.json").is_file() else None
    except (SpecError, OSError):
        tokenizer_dir = None
    report = validate(dataset, model=spec.model, counter=counter_for(tokenizer_dir))
    stats = report.tokens
    return _Data(
        examples=report.examples,
        mean_tokens=stats.mean,
        max_tokens=stats.max,
        p95_tokens=stats.p95,
        trainable_fraction=stats.trainable / stats.total if stats.total else 1.0,
    )


def _suggestions(
    shape: ModelShape,
    spec: JobSpec,
    length: int,
    compute: str,
    available: int,
    embedding_rows: int | None,
    device: str,
) -> list[str]:
    """Changes to ``spec`` that would fit, each with its predicted peak: per kind of change (gradient checkpointing,
    QLoRA, a smaller micro-batch, shorter sequences) the mildest that fits alone; where none does, the first
    combination of them, in that order, that fits."""
    hp = spec.hyperparameters
    adapter = spec.method.model_dump(exclude={"type"}) if isinstance(spec.method, LoRA | DoRA) else {}
    kinds: list[list[tuple[str, dict[str, Any]]]] = []
    if not hp.gradient_checkpointing:
        kinds.append([("gradient_checkpointing=True", {"gradient_checkpointing": True})])
    if not isinstance(spec.method, QLoRA | PEFT):
        kinds.append([("method='qlora'", {"method": QLoRA(**adapter)})])
    batches: list[tuple[str, dict[str, Any]]] = []
    batch = hp.batch_size
    while batch > 1:
        batch //= 2
        accumulation = hp.gradient_accumulation_steps * math.ceil(hp.batch_size / batch)
        label = f"batch_size={batch} with gradient_accumulation_steps={accumulation} (the same global batch)"
        batches.append((label, {"batch_size": batch, "gradient_accumulation_steps": accumulation}))
    lengths: list[tuple[str, dict[str, Any]]] = []
    seq = min(hp.max_seq_length, length)
    while seq > 256:
        seq //= 2
        lengths.append((f"max_seq_length={seq}", {"max_seq_length": seq}))
    kinds += [k for k in (batches, lengths) if k]

    def memory_of(changes: dict[str, Any]) -> tuple[MemoryBreakdown, JobSpec]:
        method, layout = changes.get("method", spec.method), changes.get("distributed", spec.distributed)
        hyper = hp.model_copy(update={k: v for k, v in changes.items() if k not in ("method", "distributed")})
        changed = spec.model_copy(update={"method": method, "hyperparameters": hyper, "distributed": layout})
        longest = min(length, hyper.max_seq_length)
        tokens = math.ceil(hyper.batch_size / layout.nproc) * longest
        probabilities = attention_probability_bytes(shape, longest, compute, device)
        return _memory(shape, changed, tokens, compute, probabilities, embedding_rows=embedding_rows), changed

    def peak_of(changes: dict[str, Any]) -> int:
        return _job_peak(*memory_of(changes))

    found: list[str] = []
    for options in kinds:
        for label, changes in options:
            if (peak := peak_of(changes)) <= available:
                found.append(f"{label}: ~{peak / GiB:.1f} GiB")
                break
    if found:
        return found
    combined: dict[str, Any] = {}
    labels: list[str] = []
    peak = peak_of(combined)
    for options in kinds:
        for label, changes in options:
            if (peak := peak_of({**combined, **changes})) <= available or (label, changes) == options[-1]:
                combined.update(changes)
                labels.append(label)
                break
        if peak <= available:
            return [f"{', '.join(labels)}: ~{peak / GiB:.1f} GiB"]
    return _elsewhere(spec, labels, combined, peak, memory_of)


GPU_BYTES = 80 * 10**9
"""The memory of the largest common training GPU (an 80 GB A100 or H100), for :func:`_elsewhere`."""


def _elsewhere(
    spec: JobSpec,
    labels: list[str],
    leanest: dict[str, Any],
    peak: int,
    memory_of: Callable[[dict[str, Any]], tuple[MemoryBreakdown, JobSpec]],
) -> list[str]:
    """Where a job that nothing fits on this machine would run: the memory of its leanest single-process form
    (``leanest``, the ``labels`` changes, predicted at ``peak``), and the fewest 80 GB GPUs that FSDP would share
    its unquantised method across."""
    leanest_form = ", ".join(labels) or "the job as it is"
    found = [f"{leanest_form} on a machine (or GPU) with ~{peak / GiB:.0f} GiB or more: ~{peak / GiB:.1f} GiB"]
    method = spec.method
    if isinstance(method, QLoRA):
        method = LoRA(**method.model_dump(include={"r", "alpha", "dropout", "target_modules", "target_parameters"}))
    hp = spec.hyperparameters
    unquantised = {k: v for k, v in leanest.items() if k != "method"} | {"method": method}
    for gpus in (2, 4, 8):
        accumulation = hp.gradient_accumulation_steps * max(1, math.ceil(hp.batch_size / gpus))
        layout = Distributed(strategy="fsdp", nproc=gpus)
        changes = unquantised | {"batch_size": gpus, "gradient_accumulation_steps": accumulation, "distributed": layout}
        per_gpu = _process_peak(*memory_of(changes))
        if per_gpu <= GPU_BYTES:
            found.append(
                f"method={method.type!r} with distributed=Distributed(strategy='fsdp', nproc={gpus}) on {gpus} GPUs "
                f"of 80 GB (batch_size={gpus}, gradient_accumulation_steps={accumulation}): ~{per_gpu / GiB:.1f} GiB "
                "per GPU"
            )
            break
    return found
