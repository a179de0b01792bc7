"""Will it fit? A local job's peak memory, tokens per epoch and time per epoch, predicted before anything is submitted.

- :mod:`.shapes`: the dimensions of a model (:class:`ModelShape`) from the catalog or a ``config.json``;
- :mod:`.memory`: the memory model, what the trainer holds at its peak, and the rules the trainer shares with it
  (which attention probabilities it keeps, which matmul outputs gradient checkpointing keeps);
- :mod:`.speed`: the speed model, seconds per micro-batch at the machine's measured throughput;
- :mod:`.probe`: that throughput (:class:`MachineProbe`), measured in a child process and cached on disk;
- :mod:`.fit`: :func:`estimate` and :func:`check_fits`, the prediction and the refusal of a job that cannot fit.

Nothing here imports the trainer, and torch only inside a few functions (a generic peft method's parameters counted on
the meta device; free GPU memory on CUDA).
"""

from .fit import Estimate, check_fits, estimate
from .memory import (
    ACT_H,
    ACT_I,
    GEMM_ATTENTION_LENGTH_MULTIPLE,
    KEEP_PROBABILITIES_MAX_LENGTH,
    MEMORY_LIMIT_ENV,
    GiB,
    KeptOutputs,
    MemoryBreakdown,
    attention_probability_bytes,
    available_memory,
    down_projection_output_bytes,
    keeps_attention_probabilities,
    kept_outputs,
    matmul_output_bytes,
    memory_limit,
    probabilities_kept_from,
)
from .probe import MachineProbe, default_probe_cache, probe_machine
from .shapes import CATALOG_SHAPES, ModelShape, model_shape

__all__ = [
    "ACT_H",
    "ACT_I",
    "CATALOG_SHAPES",
    "GEMM_ATTENTION_LENGTH_MULTIPLE",
    "KEEP_PROBABILITIES_MAX_LENGTH",
    "MEMORY_LIMIT_ENV",
    "Estimate",
    "GiB",
    "KeptOutputs",
    "MachineProbe",
    "MemoryBreakdown",
    "ModelShape",
    "attention_probability_bytes",
    "available_memory",
    "check_fits",
    "default_probe_cache",
    "down_projection_output_bytes",
    "estimate",
    "keeps_attention_probabilities",
    "kept_outputs",
    "matmul_output_bytes",
    "memory_limit",
    "model_shape",
    "probabilities_kept_from",
    "probe_machine",
]
