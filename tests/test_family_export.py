"""Exports and chat of LoRA fine-tunes of the Phi family's tiny architectures: the PEFT folder, a merged folder that
matches peft, ONNX Runtime GenAI where its builder takes the architecture (Phi-4-mini's partial rotary and tied
embeddings, Phi-4) and a clear refusal where it does not (Phi-3.5-MoE), and generation in each model's own chat
format, stopping at its end of turn."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import train_tiny_adapter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from phitune.engines import torch_engine  # noqa: E402
from phitune.engines.torch_engine import ModelPool, ServedModel  # noqa: E402
from phitune.errors import SpecError  # noqa: E402
from phitune.export import CHECK_MESSAGES, ExportSource, export  # noqa: E402

MODELS = ("tiny-phi4-mini", "tiny-phi4", "tiny-phi3.5-moe")
END_OF_TURN = {"tiny-phi4-mini": "<|end|>", "tiny-phi4": "<|im_end|>", "tiny-phi3.5-moe": "<|end|>"}
needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir")),
    reason="pip install 'phitune[onnx]'",
)


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportSource]:
    """A LoRA fine-tune of each tiny architecture (expert adapters included), trained in this process."""
    root = tmp_path_factory.mktemp("family-export")
    return {name: train_tiny_adapter(root / name, name, root / "base") for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_adapter_and_merged_exports_match_peft(fine_tunes: dict[str, ExportSource], tmp_path: Path, name: str) -> None:
    source = fine_tunes[name]
    adapter = export(source, format="adapter", dest=tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    merged = export(source, format="merged", dest=tmp_path / "merged")
    report = json.loads((merged / "export_report.json").read_text())
    assert report["checks"]["passed"] is True, report["checks"]  # transformers alone, against peft's logits
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == transformers.AutoConfig.from_pretrained(source.base).architectures


@needs_onnx
@pytest.mark.parametrize("name", ["tiny-phi4-mini", "tiny-phi4"])
def test_onnx_export_matches_peft_and_stops_at_the_end_of_a_turn(
    fine_tunes: dict[str, ExportSource], tmp_path: Path, name: str
) -> None:
    source = fine_tunes[name]
    folder = export(source, format="onnx", dest=tmp_path / "onnx")
    report = json.loads((folder / "export_report.json").read_text())
    checks = report["checks"]
    assert checks["passed"] is True and checks["greedy_identical"], checks
    assert report["tokenizer"]["prompt_text_identical"] and report["tokenizer"]["token_ids_identical"]
    end = transformers.AutoTokenizer.from_pretrained(source.base).convert_tokens_to_ids(END_OF_TURN[name])
    assert end in json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]


def test_onnx_export_of_the_mixture_of_experts_is_refused(fine_tunes: dict[str, ExportSource], tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        export(fine_tunes["tiny-phi3.5-moe"], format="onnx", dest=tmp_path / "onnx")
    assert caught.value.field == "format" and "format='merged'" in str(caught.value)
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("name", MODELS)
def test_chat_renders_each_models_format_and_stops_at_its_end_of_turn(
    fine_tunes: dict[str, ExportSource], name: str
) -> None:
    source = fine_tunes[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.base)
    prompt = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    pool = ModelPool()
    for served in (ServedModel(name, source.base), ServedModel(source.model_id, source.base, source.adapter)):
        reply = pool.generate(served, CHECK_MESSAGES, max_tokens=24, temperature=0.0, top_p=1.0, seed=None)
        assert reply.prompt_tokens == len(prompt)
        assert END_OF_TURN[name] not in reply.text
    model = pool._load(ServedModel(name, source.base))[0]
    assert tokenizer.convert_tokens_to_ids(END_OF_TURN[name]) in torch_engine._stop_ids(model, tokenizer)
