"""Export a model to run outside phitune.

- ``format="adapter"``: the PEFT adapter folder as it is (``peft.PeftModel.from_pretrained`` loads it).
- ``format="merged"``: base and adapter merged by peft's ``merge_and_unload`` into a transformers folder that
  ``AutoModelForCausalLM.from_pretrained`` loads alone, tokenizer and chat template beside it.
- ``format="onnx"``: an ONNX Runtime GenAI folder built by onnxruntime-genai's model builder (fp32 or int4, CPU or
  CUDA) with the tokenizer, the chat template and a ``genai_config.json`` that stops at the end of a turn
  (``<|end|>``, Phi-4's ``<|im_end|>``). The builder takes ``Phi3ForCausalLM`` models (Phi-3, Phi-3.5-mini, Phi-4-mini,
  Phi-4); Phi-3.5-MoE is refused (its builder needs CUDA, int4 and the hub's remote-code layout). A LoRA fine-tune
  is merged into the weights (``adapters="merged"``) or kept apart (``adapters="separate"``): the base is built once
  with every LoRA weight as an optional graph input (empty by default, so the bare base runs unchanged; float even
  when the base is int4) and each fine-tune becomes ``<name>.onnx_adapter``, which ``onnxruntime_genai.Adapters``
  switches per generator. Exporting another fine-tune of the same base into the same folder adds its adapter file.

Every export writes ``export_report.json`` beside it. ONNX and merged exports are checked against the PyTorch model
they come from (``peft.PeftModel`` for fine-tunes) on the same token ids: the largest absolute logits difference,
and for ONNX whether greedy generation is identical and whether both tokenizers give the same prompt ids. An fp32
export outside :data:`FP32_TOLERANCE` (relative to the logits' scale), or whose greedy tokens differ, raises
:class:`ExportCheckError`; the export and its report stay to inspect.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .chat_template import END_OF_TURN_TOKENS
from .engines.onnx_engine import REPORT_NAME
from .errors import ConflictError, MissingDependencyError, PhituneError, SpecError

if TYPE_CHECKING:
    import numpy as np

    from .engines.onnx_engine import OnnxModel, OnnxServed
    from .types import ModelObject

ExportFormat = Literal["onnx", "merged", "adapter"]
Precision = Literal["fp32", "int4"]
Device = Literal["cpu", "cuda"]
AdapterMode = Literal["merged", "separate"]

FP32_TOLERANCE = 1e-4
"""Largest logits difference accepted between an fp32 export and its PyTorch reference, relative to the reference's
largest absolute logit (at least 1). Measured: ~1e-7 on tiny-phi3, ~1.2e-5 on random Phi-3s of 100-450M parameters
(summation order differs between the runtimes, so the absolute difference grows with the model)."""
GREEDY_TOKENS = 16
"""Tokens generated greedily by both sides to check that generation is identical."""
CHECK_MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
"""The chat whose prompt ids both sides score."""

# Phi-3's fused LoRA targets, as the model builder unfuses them: peft module -> (graph block, graph projections).
_LORA_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv_proj": ("attn", ("q_proj", "k_proj", "v_proj")),
    "o_proj": ("attn", ("o_proj",)),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
    "down_proj": ("mlp", ("down_proj",)),
}
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_GRAPH_KEY = re.compile(r"^model\.layers\.\d+\.(?:attn|mlp)\.\w+\.lora_[AB]\.MatMul\.weight$")
_ONNX_MODULES = (("onnxruntime_genai", "onnxruntime-genai"), ("onnxruntime", "onnxruntime"))
_BUILDER_MODULES = (*_ONNX_MODULES, ("onnx", "onnx"), ("onnx_ir", "onnx-ir"))


class ExportCheckError(PhituneError):
    """An export does not match its PyTorch reference within tolerance. ``report`` is the JSON report's path."""

    def __init__(self, message: str, report: Path) -> None:
        self.report = report
        super().__init__(f"{message} (see {report})")


@dataclass(frozen=True)
class ExportSource:
    """What to export: a model id, its base (folder or Hugging Face id) and, for adapters, the PEFT folder."""

    model_id: str
    base_name: str
    base: str
    adapter: str | None = None


def source_of(model: ModelObject, home: Path) -> ExportSource:
    """Where the weights of a local model lie (a PEFT folder given as a model exports as that adapter)."""
    from .trainer.model import resolve_base

    if model.kind == "adapter" and model.base_model is not None and model.path is not None:
        return ExportSource(model.id, model.base_model, resolve_base(model.base_model, home), model.path)
    if model.kind == "full" and model.path is not None:
        return ExportSource(model.id, model.id, model.path)
    peft_config = Path(model.path or "") / "adapter_config.json"
    if model.path is not None and peft_config.exists():
        base = json.loads(peft_config.read_text(encoding="utf-8"))["base_model_name_or_path"]
        return ExportSource(model.id, base, resolve_base(base, home), str(peft_config.parent))
    return ExportSource(model.id, model.id, model.path or resolve_base(model.id, home))


def adapter_filename(model_id: str) -> str:
    """The ``.onnx_adapter`` file name of a fine-tuned model id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._") + ".onnx_adapter"


def export(
    source: ExportSource,
    *,
    format: ExportFormat,
    dest: str | os.PathLike[str],
    precision: Precision = "fp32",
    device: Device = "cpu",
    adapters: AdapterMode = "merged",
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export ``source`` to ``dest`` (see the module docs); returns ``dest`` as an absolute path.

    ``dest`` must be absent or empty unless ``overwrite``; the one exception is ``adapters="separate"`` into a folder
    that already holds a LoRA-ready ONNX base of the same base model: the adapter is added beside it.
    """
    _check_options(source, format, precision, device, adapters)
    _register_architectures()
    target = Path(dest).expanduser().resolve()
    if format == "onnx":
        _require(_BUILDER_MODULES)
        _check_onnx_architecture(source)
    if format == "onnx" and adapters == "separate" and not overwrite and _lora_base_report(target) is not None:
        checks = _add_adapter(source, target, verify)
    else:
        with _staging(target, overwrite) as folder:
            if format == "adapter":
                shutil.copytree(str(source.adapter), folder, dirs_exist_ok=True)
                report, checks = _report(source, format), []
            elif format == "merged":
                report, checks = _export_merged(source, folder, verify)
            else:
                report, checks = _export_onnx(source, folder, precision, device, adapters, verify)
            report["files"] = [*sorted(p.name for p in folder.iterdir()), REPORT_NAME]
            _write_json(folder / REPORT_NAME, report)
    failed = [c for c in checks if c.get("passed") is False]
    if failed:
        worst = max(failed, key=lambda c: c["logits_max_abs_diff"] - c["allowed_abs_diff"])
        greedy = all(c.get("greedy_identical", True) for c in failed)
        raise ExportCheckError(
            f"the export does not match its PyTorch reference: max logits diff {worst['logits_max_abs_diff']:.3g} "
            f"(allowed {worst['allowed_abs_diff']:.3g}), greedy tokens identical: {greedy}",
            target / REPORT_NAME,
        )
    return target


def onnx_for_deployment(model: ModelObject, home: Path) -> OnnxServed:
    """The ONNX export a deployment with ``engine="onnx"`` runs, exported into the home on first use.

    A model that is itself an ONNX export folder runs as it is. Fine-tunes of one base share one LoRA-ready base
    under ``home/exports/onnx`` (one ``.onnx_adapter`` each); other models get a folder of their own.
    """
    from .engines.onnx_engine import OnnxServed

    _require(_ONNX_MODULES)
    if model.path is not None and (Path(model.path) / "genai_config.json").exists():
        return OnnxServed(model.id, model.path)
    source = source_of(model, home)
    _check_onnx_architecture(source)
    root = home / "exports" / "onnx"
    folder = root / (_slug(source.base_name) + ("-lora" if source.adapter else ""))
    adapter_file = folder / adapter_filename(model.id) if source.adapter else None
    done = adapter_file or folder / REPORT_NAME
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                export(source, format="onnx", dest=folder, adapters="separate" if source.adapter else "merged")
    report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    entry = report["adapters"][adapter_file.stem] if adapter_file else report
    if entry.get("checks", {}).get("passed") is False:  # an earlier export failed its checks: never serve it
        raise ExportCheckError(f"the ONNX export of {model.id} does not match PyTorch", folder / REPORT_NAME)
    return OnnxServed(model.id, str(folder), str(adapter_file) if adapter_file else None)


# ---------------------------------------------------------------------------------------------------- options
def _check_options(source: ExportSource, format: str, precision: str, device: str, adapters: str) -> None:
    for field, value, allowed in (
        ("format", format, ("onnx", "merged", "adapter")),
        ("precision", precision, ("fp32", "int4")),
        ("device", device, ("cpu", "cuda")),
        ("adapters", adapters, ("merged", "separate")),
    ):
        if value not in allowed:
            raise SpecError(field, f"{value!r} is not one of {', '.join(allowed)}")
    if format == "adapter" and source.adapter is None:
        raise SpecError("format", f"{source.model_id} is not an adapter; use format='merged' or 'onnx'")
    if format != "onnx" and (precision, device) != ("fp32", "cpu"):
        raise SpecError("precision" if precision != "fp32" else "device", "applies to format='onnx' only")
    if adapters == "separate":
        if format != "onnx" or source.adapter is None:
            raise SpecError("adapters", "'separate' applies to format='onnx' exports of LoRA fine-tunes")
        _lora_scale(source.adapter)


ONNX_ARCHITECTURES = frozenset({"Phi3ForCausalLM"})
"""The architectures phitune exports through onnxruntime-genai's model builder (checked against its output)."""


def _check_onnx_architecture(source: ExportSource) -> None:
    """Refuse an ONNX export of an architecture outside :data:`ONNX_ARCHITECTURES`, saying why and what works."""
    from transformers import AutoConfig

    _register_architectures()
    architecture = (AutoConfig.from_pretrained(source.base).architectures or ["unknown"])[0]
    if architecture in ONNX_ARCHITECTURES:
        return
    why = (
        "onnxruntime-genai's model builder builds Phi-3.5-MoE only in int4 for CUDA, from the hub's remote-code "
        "layout (block_sparse_moe), not from transformers' PhimoeForCausalLM"
        if architecture == "PhimoeForCausalLM"
        else "onnxruntime-genai's model builder reads Phi-3-small through its published remote code and maps its "
        "block-sparse layers to ONNX Runtime's SparseAttention operator, which phitune has not checked against its "
        "own Phi3SmallForCausalLM"
        if architecture == "Phi3SmallForCausalLM"
        else f"phitune's ONNX export takes {', '.join(sorted(ONNX_ARCHITECTURES))}"
    )
    raise SpecError("format", f"no ONNX export of {source.model_id} ({architecture}): {why}; use format='merged'")


def _register_architectures() -> None:
    """Let transformers load the architectures the trainer implements itself (Phi-3-small), as the trainer does."""
    from .trainer.model import register_architectures

    register_architectures()


def _require(modules: tuple[tuple[str, str], ...]) -> None:
    for module, package in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(package, "onnx")


@contextmanager
def _staging(target: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh folder beside ``target`` that replaces it once the export is complete."""
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise ConflictError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)
    try:
        yield staging
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------- merged
def _export_merged(source: ExportSource, folder: Path, verify: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(source)
    ids = _prompt_ids(tokenizer)
    reference = _reference_model(source)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0].numpy() if verify else None
    merged = reference.merge_and_unload() if source.adapter else reference
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del merged, reference
    report = _report(source, "merged")
    if expected is None:
        report["checks"] = {"skipped": "verify=False"}
        return report, []
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(input_ids=torch.tensor([ids])).logits[0].numpy()
    check = _compare_logits(got, expected, "fp32")
    check["passed"] = check.pop("logits_within_tolerance")
    report.update(check_prompt={"messages": CHECK_MESSAGES, "token_ids": ids}, checks=check)
    return report, [check]


# ------------------------------------------------------------------------------------------------------ onnx
def _export_onnx(
    source: ExportSource, folder: Path, precision: str, device: str, adapters: str, verify: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    separate = adapters == "separate"
    tokenizer = _tokenizer(source)
    extra: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="phitune-export-") as tmp:
        builder_input = source.base
        if source.adapter is not None and not separate:
            builder_input = str(Path(tmp) / "merged")
            _export_merged(source, Path(builder_input), verify=False)
        elif separate:
            extra["adapter_path"] = str(source.adapter)
            if precision == "int4":  # LoRA MatMuls stay float: quantized ones could not take adapters of any rank
                extra["nodes_to_exclude"] = ",".join(_lora_node_names(source))
        seconds = _run_builder(builder_input, folder, precision, device, extra, Path(tmp) / "cache")
    _stop_on_end(folder, tokenizer)
    report = _report(source, "onnx")
    report.update(precision=precision, device=device, adapter_mode=adapters, build_seconds=round(seconds, 2))
    adapter_file = None
    if separate:
        baked = _make_lora_inputs(folder)
        arrays = _adapter_arrays(source, {name: (value.shape, value.dtype) for name, value in baked.items()})
        _same_weights(arrays, baked)
        adapter_file = folder / adapter_filename(source.model_id)
        _write_adapter(adapter_file, arrays)
    if not verify:
        report["checks"] = {"skipped": "verify=False"}
        return report, []
    skipped = _cannot_run(device)
    if skipped:
        report["checks"] = {"skipped": skipped}
        return report, []
    runs: dict[str, Path | None] = {"base": None, "adapter": adapter_file} if separate else {"model": None}
    checks, onnx_info = _check_onnx(source, folder, tokenizer, precision, runs)
    report.update(onnx_info)
    if separate:
        assert adapter_file is not None
        report["checks"] = checks["base"]
        report["adapters"] = {adapter_file.stem: _adapter_entry(source, adapter_file, checks["adapter"])}
    else:
        report["checks"] = checks["model"]
    return report, list(checks.values())


def _add_adapter(source: ExportSource, folder: Path, verify: bool) -> list[dict[str, Any]]:
    """Write one more ``.onnx_adapter`` beside an existing LoRA-ready base, and check it."""
    report = _lora_base_report(folder)
    assert report is not None
    if report["base_model"] != source.base_name:
        raise ConflictError(
            f"{folder} holds an ONNX base of {report['base_model']}, not of {source.base_name}: export to a new folder"
        )
    inputs = _lora_inputs(folder)
    arrays = _adapter_arrays(source, inputs)
    adapter_file = folder / adapter_filename(source.model_id)
    _write_adapter(adapter_file, arrays)
    checks: dict[str, Any] = {"skipped": "verify=False"}
    skipped = _cannot_run(report["device"])
    if verify and skipped:
        checks = {"skipped": skipped}
    elif verify:
        checks = _check_onnx(source, folder, _tokenizer(source), report["precision"], {"adapter": adapter_file})[0]
        checks = checks["adapter"]
    report.setdefault("adapters", {})[adapter_file.stem] = _adapter_entry(source, adapter_file, checks)
    report["files"] = sorted(p.name for p in folder.iterdir())
    _write_json(folder / REPORT_NAME, report)
    return [checks]


def _lora_base_report(folder: Path) -> dict[str, Any] | None:
    """The report of a LoRA-ready ONNX base in ``folder``, if that is what it holds."""
    path = folder / REPORT_NAME
    if not (folder / "model.onnx").exists() or not path.exists():
        return None
    report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return report if report.get("format") == "onnx" and report.get("adapter_mode") == "separate" else None


def _run_builder(source: str, out: Path, precision: str, device: str, extra: dict[str, str], cache: Path) -> float:
    """Run onnxruntime-genai's model builder in a child process; returns the seconds it took."""
    if Path(source).is_dir():
        where = ["-i", source]
    else:  # a Hugging Face id: the builder downloads it into the usual cache
        from huggingface_hub.constants import HF_HUB_CACHE

        where, cache = ["-m", source], Path(HF_HUB_CACHE)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", *where, "-o", str(out)]
    command += ["-p", precision, "-e", device, "-c", str(cache)]
    if extra:
        command += ["--extra_options", *(f"{key}={value}" for key, value in extra.items())]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise PhituneError(f"onnxruntime-genai's model builder failed (exit {done.returncode}):\n{tail}")
    return time.monotonic() - started


def _lora_node_names(source: ExportSource) -> list[str]:
    """The builder's names of every LoRA MatMul node (kept out of int4 quantization)."""
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(source.base).num_hidden_layers
    projections = [(block, p) for block, parts in _LORA_PARTS.values() for p in parts]
    return [
        f"/model/layers.{i}/{block}/{projection}/lora_{ab}/MatMul"
        for i in range(layers)
        for block, projection in projections
        for ab in "AB"
    ]


def _stop_on_end(folder: Path, tokenizer: Any) -> None:
    """Make generation stop at the end of a turn (``<|end|>``, Phi-4's ``<|im_end|>``) as well as on the configured
    EOS ids."""
    ends = [tokenizer.convert_tokens_to_ids(token) for token in END_OF_TURN_TOKENS]
    ends = [end for end in ends if isinstance(end, int) and end != tokenizer.unk_token_id]
    path = folder / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    eos = config["model"]["eos_token_id"]
    ids = list(eos) if isinstance(eos, list) else [eos]
    if any(end not in ids for end in ends):
        config["model"]["eos_token_id"] = [*ids, *(end for end in ends if end not in ids)]
        _write_json(path, config)


# ----------------------------------------------------------------------------------------------- lora inputs
def _make_lora_inputs(folder: Path) -> dict[str, np.ndarray]:
    """Turn the builder's baked LoRA weights into optional graph inputs; returns the weights they held.

    Each weight becomes an input whose rank dimension is symbolic (``lora_r``) with an empty initializer as its
    default, so the graph runs as the bare base when no adapter is active and takes adapters of any rank.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    baked: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        if not _GRAPH_KEY.match(init.name):
            continue
        value = numpy_helper.to_array(init, base_dir=str(folder))
        baked[init.name] = value
        rank_dim = 1 if ".lora_A." in init.name else 0
        empty: list[int] = list(value.shape)
        empty[rank_dim] = 0
        dims: list[int | str] = list(value.shape)
        dims[rank_dim] = "lora_r"
        init.CopyFrom(numpy_helper.from_array(np.zeros(empty, value.dtype), init.name))
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, dims))
    if not baked:
        raise PhituneError("the model builder made no LoRA MatMul weights; this onnxruntime-genai is not supported")
    onnx.save_model(model, str(path))  # the weights stay in model.onnx.data; the old LoRA bytes there go unused
    return baked


def _lora_inputs(folder: Path) -> dict[str, tuple[tuple[int | None, ...], np.dtype[Any]]]:
    """The LoRA inputs of a LoRA-ready base: name -> (shape with ``None`` for the rank, dtype)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inputs: dict[str, tuple[tuple[int | None, ...], np.dtype[Any]]] = {}
    for value in graph.input:
        if _GRAPH_KEY.match(value.name):
            tensor = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
            inputs[value.name] = (shape, helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    return inputs


def _lora_scale(adapter: str) -> float:
    """The LoRA scaling of a PEFT adapter, refusing what a separate ONNX adapter cannot express."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    targets = config.get("target_modules") or []
    problems = [
        ("it is not LoRA", config.get("peft_type") != "LORA"),
        ("it uses DoRA", bool(config.get("use_dora"))),
        ("it has rank_pattern/alpha_pattern", bool(config.get("rank_pattern") or config.get("alpha_pattern"))),
        ("it saves whole modules (modules_to_save)", bool(config.get("modules_to_save"))),
        ("it has LoRA biases", bool(config.get("lora_bias")) or config.get("bias", "none") != "none"),
        (f"it targets {targets}", isinstance(targets, str) or not set(targets) <= set(_LORA_PARTS)),
    ]
    for problem, found in problems:
        if found:
            raise SpecError(
                "adapters",
                f"a separate ONNX adapter needs plain LoRA on {', '.join(_LORA_PARTS)}, but {problem}; "
                "use adapters='merged'",
            )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _adapter_arrays(
    source: ExportSource, inputs: dict[str, tuple[tuple[int | None, ...], np.dtype[Any]]]
) -> dict[str, np.ndarray]:
    """A PEFT adapter's weights under the graph's LoRA input names: A transposed, B scaled, transposed and split
    the way the builder unfuses ``qkv_proj`` and ``gate_up_proj``; cast to each input's dtype."""
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    assert source.adapter is not None
    scale = _lora_scale(source.adapter)
    config = AutoConfig.from_pretrained(source.base)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    arrays: dict[str, np.ndarray] = {}
    for key, value in load_file(str(Path(source.adapter) / "adapter_model.safetensors")).items():
        match = _PEFT_KEY.match(key)
        if match is None or match.group(2) not in _LORA_PARTS:
            raise SpecError("adapters", f"a separate ONNX adapter cannot hold the weight {key}; use adapters='merged'")
        layer, module, ab = match.groups()
        block, parts = _LORA_PARTS[module]
        if ab == "A":
            pieces = [value.T] * len(parts)
        else:
            rows = value.shape[0]
            head_dim = rows // (heads + 2 * kv_heads)
            sizes = {1: [rows], 2: [rows // 2] * 2, 3: [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]}
            bounds = np.cumsum(sizes[len(parts)])[:-1]
            pieces = [(piece * scale).T for piece in np.split(value, bounds)]
        for part, piece in zip(parts, pieces, strict=True):
            arrays[f"model.layers.{layer}.{block}.{part}.lora_{ab}.MatMul.weight"] = piece
    for name, array in arrays.items():
        expected = inputs.get(name)
        rank_dim = 1 if ".lora_A." in name else 0
        fixed = [d for i, d in enumerate(array.shape) if i != rank_dim]
        if expected is None or fixed != [d for i, d in enumerate(expected[0]) if i != rank_dim]:
            raise ConflictError(
                f"the ONNX base has no LoRA input matching {name} {array.shape}: export to a new folder"
            )
        arrays[name] = np.ascontiguousarray(array, dtype=expected[1])
    return arrays


def _same_weights(ours: dict[str, np.ndarray], baked: dict[str, np.ndarray]) -> None:
    """Our mapping of the first adapter must give exactly what the builder baked from it."""
    import numpy as np

    same = ours.keys() == baked.keys() and all(np.allclose(ours[k], baked[k], rtol=1e-6, atol=1e-8) for k in ours)
    if not same:
        raise PhituneError(
            "this onnxruntime-genai's model builder lays LoRA weights out differently from phitune's adapter mapping; "
            "use adapters='merged'"
        )


def _write_adapter(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.onnx_adapter`` (``onnxruntime.AdapterFormat``) atomically."""
    import onnxruntime as ort

    # OrtValue borrows the numpy buffers without keeping them alive: ``arrays`` must outlive export_adapter.
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(values)
    partial = path.with_name(path.name + ".partial")
    adapter.export_adapter(str(partial))
    os.replace(partial, path)


def _adapter_entry(source: ExportSource, adapter_file: Path, checks: dict[str, Any]) -> dict[str, Any]:
    config = json.loads((Path(str(source.adapter)) / "adapter_config.json").read_text(encoding="utf-8"))
    return {
        "model": source.model_id,
        "file": adapter_file.name,
        "rank": config["r"],
        "lora_alpha": config["lora_alpha"],
        "created_at": int(time.time()),
        "checks": checks,
    }


# ---------------------------------------------------------------------------------------------------- checks
def _cannot_run(device: str) -> str | None:
    """Why this machine cannot run an export for ``device``, if it cannot."""
    import onnxruntime_genai as og

    if device == "cuda" and not og.is_cuda_available():
        return "a CUDA export needs onnxruntime-genai-cuda and a GPU to run; not checked on this machine"
    return None


def _check_onnx(
    source: ExportSource, folder: Path, tokenizer: Any, precision: str, runs: dict[str, Path | None]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Compare the ONNX model with its PyTorch reference, once per named run (``None``: no adapter active).

    Returns the checks by run, and the report's ``check_prompt`` and ``tokenizer`` entries.
    """
    from .engines.onnx_engine import OnnxModel

    ids = _prompt_ids(tokenizer)
    onnx_model = OnnxModel(folder)
    tokenizer_info = _tokenizer_fix(onnx_model, tokenizer, ids)
    reference = _reference_model(source)
    checks: dict[str, dict[str, Any]] = {}
    for run, adapter_file in runs.items():
        adapter = str(adapter_file) if adapter_file is not None else None
        bare = adapter is None and source.adapter is not None and "adapter" in runs
        with reference.disable_adapter() if bare else _nothing():
            expected, expected_tokens = _torch_outputs(reference, ids, onnx_model.stop_ids)
        got = onnx_model.logits(ids, adapter)
        tokens = onnx_model.greedy(ids, GREEDY_TOKENS, adapter)
        check: dict[str, Any] = {"reference": "peft.PeftModel" if source.adapter and not bare else "transformers"}
        check.update(_compare_logits(got, expected, precision))
        within = check.pop("logits_within_tolerance")
        check.update(greedy_token_ids=tokens, greedy_identical=tokens == expected_tokens)
        check["passed"] = None if within is None else bool(within and tokens == expected_tokens)
        checks[run] = check
    return checks, {"check_prompt": {"messages": CHECK_MESSAGES, "token_ids": ids}, "tokenizer": tokenizer_info}


def _compare_logits(got: np.ndarray, expected: np.ndarray, precision: str) -> dict[str, Any]:
    """The logits entries of a check; ``logits_within_tolerance`` is None where no tolerance applies (int4)."""
    import numpy as np

    diff = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    tolerance = FP32_TOLERANCE if precision == "fp32" else None
    return {
        "logits_max_abs_diff": diff,
        "reference_logits_max_abs": scale,
        "tolerance": tolerance,
        "allowed_abs_diff": None if tolerance is None else tolerance * scale,
        "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean()),
        "logits_within_tolerance": None if tolerance is None else diff <= tolerance * scale,
    }


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _tokenizer_fix(onnx_model: OnnxModel, tokenizer: Any, ids: list[int]) -> dict[str, Any]:
    """Compare both tokenizers on the check prompt and set the BOS fix that makes the ONNX side's ids equal."""
    raw = onnx_model.raw_prompt_ids(CHECK_MESSAGES)
    bos = onnx_model.bos_id
    onnx_model.bos = "add" if ids == [bos, *raw] else "strip" if raw == [bos, *ids] else "keep"
    text = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=False)
    return {
        "bos": onnx_model.bos,
        "prompt_text_identical": onnx_model.render(CHECK_MESSAGES) == text,
        "token_ids_identical": onnx_model.prompt_ids(CHECK_MESSAGES) == ids,
        "onnxruntime_genai_ids": raw,
    }


def _torch_outputs(model: Any, ids: list[int], stop_ids: set[int]) -> tuple[np.ndarray, list[int]]:
    """Logits over ``ids`` and the greedy continuation (up to a stop token) of a PyTorch model."""
    import torch

    inputs = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=inputs).logits[0].float().numpy()
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            eos_token_id=sorted(stop_ids),
            pad_token_id=min(stop_ids),
        )
    return logits, [t for t in out[0, len(ids) :].tolist() if t not in stop_ids]


def _reference_model(source: ExportSource) -> Any:
    """The PyTorch model an export must match: the base in fp32, with the PEFT adapter on it (unmerged)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.base, dtype=torch.float32)
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter)
    return model.eval()


def _tokenizer(source: ExportSource) -> Any:
    """The tokenizer saved with the adapter (the trainer saves it there), else the base's."""
    from .trainer.model import load_tokenizer

    has_own = source.adapter is not None and (Path(source.adapter) / "tokenizer_config.json").exists()
    return load_tokenizer(str(source.adapter) if has_own else source.base)


def _prompt_ids(tokenizer: Any) -> list[int]:
    encoded = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [int(t) for t in encoded["input_ids"]]


# ---------------------------------------------------------------------------------------------------- report
def _report(source: ExportSource, format: str) -> dict[str, Any]:
    versions = {}
    for package in ("phitune", "torch", "transformers", "peft", "onnxruntime", "onnxruntime-genai"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "format": format,
        "model": source.model_id,
        "base_model": source.base_name,
        "created_at": int(time.time()),
        "versions": versions,
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _slug(text: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[-48:]
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
