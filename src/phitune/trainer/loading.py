"""Memory-lean loading of a base model for training, with the peak memory of the load measured.

What transformers 5.24's ``from_pretrained`` does with a bf16 safetensors checkpoint, measured on a random-weight
Phi-3-mini (3.82B parameters, two shards of 5.0 and 2.6 GB; docs/sizing.md has the tables):

- ``dtype=torch.bfloat16``: already lean. The weights stay views of the memory-mapped shards (no copy); the load
  takes seconds and the pages come in as the first step touches them. Nothing here beats that, so bf16 bases load
  through ``from_pretrained`` unchanged.
- ``dtype=torch.float32`` (what full fine-tuning needs): every weight is converted into a new fp32 tensor
  while the mapped bf16 pages stay resident until the end: 1.5x the fp32 size at the peak on a 60M model (~23 GB
  for Phi-3-mini, extrapolated).
- 4-bit QLoRA (``BitsAndBytesConfig``): every shard stays mapped until the last is done, and the mappings stay
  alive afterwards (the unquantised embedding and norms are views into them): peak 10.5 GB, 9.9 GB still resident
  after loading a model whose weights take 2.3 GB.

:func:`load_for_training` therefore streams the 4-bit and the fp32 cases itself: the model is built on the meta
device (buffers real), each tensor to quantise or convert is read with ``pread`` (no mapping stays resident),
brought to its final form on its device (quantised a slice of rows at a time), and dropped, so the peak is the
final model plus one slice in flight: Phi-3-mini QLoRA peaks at 3.05 GB, Phi-3-medium at 8.7 GB. Tensors already
in their final dtype (QLoRA's bf16 embedding, head and norms) stay views of the private, copy-on-write mapping, as
``from_pretrained`` leaves a bf16 base: the embedding's rows are read only as tokens use them. The modules are
transformers' own (its bitsandbytes quantizer and ``replace_with_bnb_linear``), so peft sees the same model, and
the outputs are identical. Checkpoints whose tensors transformers converts while loading (Phi-3.5-MoE's per-expert
``block_sparse_moe`` weights, stacked into ``[experts, out, in]`` tensors) load through ``from_pretrained``.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from .. import _allocator as allocator
from ..errors import MissingDependencyError, SpecError
from ..estimate.memory import compute_dtype, weight_dtype
from ..types import Method, QLoRA

Precision = Literal["auto", "fp32", "bf16"]


class LoadReport(BaseModel):
    """What loading a base model took; ``data()`` is the payload of the job event that reports it."""

    path: str
    loader: Literal["from_pretrained", "streamed"]
    dtype: str = Field(description="dtype of the weights that are not quantised.")
    quantized: bool
    seconds: float
    peak_rss_bytes: int = Field(description="Peak resident memory of the process while loading.")
    peak_scope: Literal["load", "process"] = Field(
        description="'load': the peak of the load alone (Linux); 'process': the process's lifetime peak."
    )
    rss_after_bytes: int
    weight_bytes: int = Field(description="Bytes of every parameter and buffer as they lie in memory.")
    peak_gpu_bytes: int | None = None
    allocator: Literal["mimalloc", "system"] = Field(
        "system", description="The process's C allocator (:mod:`phitune._allocator`)."
    )

    @property
    def message(self) -> str:
        gib = 2**30
        return (
            f"base model loaded in {self.seconds:.1f} s ({self.loader}, {'4-bit + ' if self.quantized else ''}"
            f"{self.dtype}): weights {self.weight_bytes / gib:.2f} GiB, peak RSS while loading "
            f"{self.peak_rss_bytes / gib:.2f} GiB ({self.allocator} allocator)"
            + (f", peak GPU {self.peak_gpu_bytes / gib:.2f} GiB" if self.peak_gpu_bytes is not None else "")
        )

    def data(self) -> dict[str, Any]:
        """The job event's payload: everything but ``path``, a folder of the machine that trained."""
        return {"load": self.model_dump(exclude={"path"})}


def base_dtype_name(method: Method, precision: Precision = "auto") -> Literal["bf16", "fp32"]:
    """The dtype the base weights are kept in on this machine (:func:`phitune.estimate.memory.weight_dtype`)."""
    from .model import bf16_supported

    return weight_dtype(method, compute_dtype(precision, bf16_supported()))


class PeakRSS:
    """Peak resident memory of this process inside a ``with`` block. On Linux the kernel's high-water mark is reset
    on entry (``/proc/self/clear_refs``) and read on exit, which is exact; elsewhere the process's lifetime peak."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.scope: Literal["load", "process"] = "process"

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "load"
        except OSError:
            self.scope = "process"
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_bytes = _status_bytes("VmHWM") if self.scope == "load" else max_rss_bytes()


def max_rss_bytes() -> int:
    """Lifetime peak RSS of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def load_for_training(
    path: str, method: Method, *, device: str, precision: Precision = "auto"
) -> tuple[Any, LoadReport]:
    """Load the causal LM at ``path`` (a local folder, or a hub id) to train with ``method`` on ``device``, never
    holding a full-precision copy: see the module docstring. Returns the model and a :class:`LoadReport`."""
    import torch

    from .model import register_architectures

    register_architectures()
    dtype_name = base_dtype_name(method, precision)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    folder = _local_folder(path)
    shards = _safetensors_shards(folder)
    streamed = bool(shards) and (isinstance(method, QLoRA) or dtype == torch.float32) and not _converted(folder)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with PeakRSS() as peak:
        if streamed:
            model = _load_streamed(folder, shards, method, dtype, device)
        else:
            model = _from_pretrained(folder, method, dtype, device)
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if isinstance(method, QLoRA):
        weight_bytes += _quant_state_bytes(model)
    report = LoadReport(
        path=str(folder),
        loader="streamed" if streamed else "from_pretrained",
        dtype=dtype_name,
        quantized=isinstance(method, QLoRA),
        seconds=round(time.perf_counter() - started, 2),
        peak_rss_bytes=peak.peak_bytes,
        peak_scope=peak.scope,
        rss_after_bytes=rss_bytes(),
        weight_bytes=weight_bytes,
        peak_gpu_bytes=int(torch.cuda.max_memory_allocated(device)) if torch.device(device).type == "cuda" else None,
        allocator=allocator.in_use(),
    )
    return model, report


def _converted(folder: Path) -> bool:
    """Whether transformers converts this model type's checkpoint tensors while loading (renamed, stacked)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    return get_checkpoint_conversion_mapping(model_type) is not None


def _local_folder(path: str) -> Path:
    """A local model folder; a hub id is resolved through the hub cache (downloaded where there is a network)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]
    try:
        return Path(snapshot_download(path, allow_patterns=patterns))
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not available"
        offline = " (offline: use a local folder or pre-download it)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise SpecError("model", f"cannot load {path!r}: {exc}{offline}") from exc


def _safetensors_shards(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files (from the index when sharded); empty for other formats."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    return [single] if single.exists() else []


def _bnb_config(method: QLoRA, compute_dtype: Any) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("bitsandbytes", "qlora") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _from_pretrained(folder: Path, method: Method, dtype: Any, device: str) -> Any:
    """transformers' own loading: lean already for a bf16 base (see the module docstring), and the way to read
    checkpoints that are not safetensors."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if isinstance(method, QLoRA):
        kwargs["quantization_config"] = _bnb_config(method, dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as exc:
        raise SpecError("model", f"cannot load {str(folder)!r}: {exc}") from exc
    return model if isinstance(method, QLoRA) else model.to(device)


def _load_streamed(folder: Path, shards: list[Path], method: Method, dtype: Any, device: str) -> Any:
    """Build the model on the meta device, then fill it one tensor at a time (read, convert or quantise, assign)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary frequencies) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantizer = None
    if isinstance(method, QLoRA):
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(_bnb_config(method, dtype), pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": device})
    expected = {name for name, p in model.named_parameters(remove_duplicate=False) if p.is_meta}
    unexpected: list[str] = []
    for shard in shards:
        with (
            safe_open(str(shard), framework="pt", device="cpu", backend="pread") as read,
            safe_open(str(shard), framework="pt", device="cpu") as mapped,
        ):
            for name in read.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name not in expected:
                    unexpected.append(name)
                    continue
                _assign(model, name, read, mapped, dtype, device)
                expected.discard(name)
                _release_free_heap()
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = sorted(n for n, p in model.named_parameters() if p.is_meta)
    if missing or unexpected:
        raise SpecError(
            "model",
            f"{folder} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
        )
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    model.eval()  # as from_pretrained leaves it
    return model


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the system: glibc keeps the holes that quantisation's temporaries leave
    between the packed weights (0.6 GB after quantising Phi-3-mini). A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _assign(model: Any, name: str, read: Any, mapped: Any, dtype: Any, device: str) -> None:
    """Put checkpoint tensor ``name`` into its (meta) parameter: read and quantised for a 4-bit layer; a view of the
    memory-mapped shard where it is already ``dtype`` on the CPU (its pages are read as they are touched: only the
    rows of the embedding that the data uses ever are); else read and cast to ``dtype``."""
    import torch

    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = owner._parameters[leaf]
    if type(old).__name__ == "Params4bit":
        new = quantize_4bit(read.get_tensor(name).to(device=device, dtype=dtype), old)
        owner._is_hf_initialized = True
    else:
        tensor = mapped.get_tensor(name)  # lazy: nothing is read yet
        if tensor.dtype != dtype or torch.device(device).type != "cpu":
            tensor = read.get_tensor(name).to(device=device, dtype=dtype)
        new = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    owner._parameters[leaf] = new


QUANT_SLICE_ELEMENTS = 16 * 2**20
"""Weights quantised at a time: bitsandbytes' CPU kernel makes ~16 bytes of temporaries per weight, 2.9 GB for
Phi-3-medium's gate_up_proj (184M weights) in one go, 0.25 GB per slice."""


def quantize_4bit(weight: Any, meta: Any) -> Any:
    """``bitsandbytes.functional.quantize_4bit`` of ``weight`` with the options of the meta ``Params4bit`` ``meta``,
    a slice of rows at a time. Blocks (64 consecutive weights) never straddle two slices, and the statistics are
    compressed over the whole tensor as bitsandbytes does, so the result is bit-identical to quantising it at once."""
    import bitsandbytes as bnb
    import torch

    functional = bnb.functional
    rows, columns = weight.shape
    step = meta.blocksize // math.gcd(columns, meta.blocksize)  # rows that hold whole blocks
    slice_rows = max(step, QUANT_SLICE_ELEMENTS // columns // step * step)
    packed, absmax = [], []
    for start in range(0, rows, slice_rows):
        part, scales = torch.ops.bitsandbytes.quantize_4bit.default(
            weight[start : start + slice_rows], meta.blocksize, meta.quant_type, meta.quant_storage
        )
        packed.append(part)
        absmax.append(scales)
    scales = torch.cat(absmax)
    common = {
        "shape": weight.shape,
        "dtype": weight.dtype,
        "blocksize": meta.blocksize,
        "code": functional.get_4bit_type(meta.quant_type, device=weight.device),
        "quant_type": meta.quant_type,
    }
    if meta.compress_statistics:  # as bitsandbytes.functional.quantize_4bit
        offset = scales.mean()
        nested, nested_state = functional.quantize_blockwise(scales - offset, blocksize=256)
        state = functional.QuantState(absmax=nested, offset=offset, state2=nested_state, **common)
    else:
        state = functional.QuantState(absmax=scales, **common)
    options = {k: v for k, v in meta.__dict__.items() if k not in ("quant_state", "bnb_quantized")}
    param = bnb.nn.Params4bit(torch.cat(packed), requires_grad=False, quant_state=state, bnb_quantized=True, **options)
    if param.module is not None:
        param.module.quant_state = state  # as Params4bit's own quantisation leaves its layer
    return param


def _quant_state_bytes(model: Any) -> int:
    """Bytes of the 4-bit layers' quantisation state (block scales, nested scales, code books)."""
    import torch

    total = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += sum(
                v.numel() * v.element_size()
                for v in state.as_dict(packed=False).values()
                if isinstance(v, torch.Tensor)
            )
    return total
