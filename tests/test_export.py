"""Exports of a trained tiny-phi3 LoRA job: PEFT folder, merged transformers folder, ONNX Runtime GenAI (merged and
with separate adapters), and chat through an ONNX deployment. Every ONNX claim is measured against PyTorch here."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import phitune
from conftest import write_chat
from phitune.errors import ConflictError, SpecError
from phitune.export import CHECK_MESSAGES, FP32_TOLERANCE, ExportCheckError

ONNX_MISSING = [
    m for m in ("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir") if importlib.util.find_spec(m) is None
]
needs_onnx = pytest.mark.skipif(
    bool(ONNX_MISSING), reason=f"{', '.join(ONNX_MISSING)} not installed: pip install 'phitune[onnx]'"
)
HYPERPARAMETERS = {"epochs": 50, "batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128, "max_steps": 6}


class Trained:
    """A home with two finished LoRA jobs of tiny-phi3 (ranks 8 and 4) and helpers to compute PyTorch references."""

    def __init__(self, home: Path, client: phitune.Client, models: list[str]) -> None:
        self.home, self.client, self.models = home, client, models
        self.base = home / "models" / "base" / "tiny-phi3"

    def torch_model(self, adapter_of: str | None = None) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)
        if adapter_of is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.client.models.get(adapter_of).path)
        return model.eval()

    def prompt_ids(self) -> list[int]:
        from transformers import AutoTokenizer

        encoded = AutoTokenizer.from_pretrained(self.base).apply_chat_template(
            CHECK_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Trained]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PHITUNE_WORKER_IDLE_TIMEOUT", "4")
        patch.setenv("HF_HUB_OFFLINE", "1")
        home = tmp_path_factory.mktemp("export") / "home"
        shutil.copytree(tiny_model_dir, home / "models" / "base" / "tiny-phi3")
        client = phitune.Client(home=home)
        data = client.files.upload(write_chat(home.parent / "train.jsonl"))
        jobs = [
            client.finetune.create(
                model="tiny-phi3",
                training_file=data.id,
                method={"type": "lora", "r": rank, "alpha": 16, "dropout": 0.0},
                hyperparameters=HYPERPARAMETERS,
                suffix=f"r{rank}",
            )
            for rank in (8, 4)
        ]
        models = []
        for job in jobs:
            done = client.finetune.wait(job.id, timeout=1800, progress=False)
            assert done.status == "succeeded", done.error
            assert done.fine_tuned_model is not None
            models.append(done.fine_tuned_model)
        yield Trained(home, client, models)
        client.close()


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_adapter_export_is_the_peft_folder(trained: Trained, tmp_path: Path) -> None:
    source = Path(str(trained.client.models.get(trained.models[0]).path))
    path = trained.client.models.export(trained.models[0], format="adapter", dest=tmp_path / "adapter")
    assert (path / "adapter_model.safetensors").read_bytes() == (source / "adapter_model.safetensors").read_bytes()
    assert json.loads((path / "export_report.json").read_text())["model"] == trained.models[0]

    from peft import PeftModel

    loaded = PeftModel.from_pretrained(trained.torch_model(), path)
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) > 0


def test_merged_export_loads_with_transformers_alone_and_matches_peft(trained: Trained, tmp_path: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = trained.client.models.export(trained.models[0], format="merged", dest=tmp_path / "merged")
    assert not (path / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(path).chat_template is not None
    ids = trained.prompt_ids()
    diff = float(np.abs(_logits(merged, ids) - _logits(trained.torch_model(trained.models[0]), ids)).max())
    assert diff < FP32_TOLERANCE
    report = json.loads((path / "export_report.json").read_text())
    assert report["checks"]["passed"] is True and report["checks"]["logits_max_abs_diff"] < FP32_TOLERANCE


@needs_onnx
def test_onnx_fp32_export_matches_peft_logits_and_greedy_tokens(trained: Trained, tmp_path: Path) -> None:
    import numpy as np
    import torch

    from phitune.engines.onnx_engine import OnnxModel

    path = trained.client.models.export(trained.models[0], format="onnx", dest=tmp_path / "onnx")
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in path.iterdir()
    }
    genai = json.loads((path / "genai_config.json").read_text())["model"]
    from transformers import AutoTokenizer

    end = AutoTokenizer.from_pretrained(trained.base).convert_tokens_to_ids("<|end|>")
    assert end in genai["eos_token_id"]

    ids = trained.prompt_ids()
    onnx_model = OnnxModel(path)
    assert onnx_model.prompt_ids(CHECK_MESSAGES) == ids  # both tokenizers agree, BOS included
    reference = trained.torch_model(trained.models[0])
    diff = float(np.abs(onnx_model.logits(ids) - _logits(reference, ids)).max())
    assert diff < FP32_TOLERANCE
    stop = sorted(onnx_model.stop_ids)
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stop)
    expected = [t for t in out[0, len(ids) :].tolist() if t not in stop]
    assert onnx_model.greedy(ids, 12) == expected

    report = json.loads((path / "export_report.json").read_text())
    checks = report["checks"]
    assert checks["passed"] is True and checks["greedy_identical"] is True and checks["reference"] == "peft.PeftModel"
    assert checks["logits_max_abs_diff"] < checks["tolerance"] == FP32_TOLERANCE
    assert report["tokenizer"]["token_ids_identical"] is True and report["check_prompt"]["token_ids"] == ids


@needs_onnx
def test_separate_adapters_of_different_ranks_switch_on_one_base(trained: Trained, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime_genai as og

    from phitune.engines.onnx_engine import OnnxModel

    dest = tmp_path / "shared"
    for model in trained.models:
        assert trained.client.models.export(model, format="onnx", dest=dest, adapters="separate") == dest
    files = sorted(p.name for p in dest.iterdir())
    adapters = [f for f in files if f.endswith(".onnx_adapter")]
    assert len(adapters) == 2 and files.count("model.onnx") == 1
    report = json.loads((dest / "export_report.json").read_text())
    assert sorted(entry["rank"] for entry in report["adapters"].values()) == [4, 8]
    assert all(entry["checks"]["passed"] for entry in report["adapters"].values())

    ids = trained.prompt_ids()
    onnx_model = OnnxModel(dest)  # one og.Model; the adapters are switched per generator
    assert isinstance(onnx_model.adapters, og.Adapters)
    results = {}
    for model in trained.models:
        entry = next(e for e in report["adapters"].values() if e["model"] == model)
        results[model] = onnx_model.logits(ids, str(dest / entry["file"]))
        diff = float(np.abs(results[model] - _logits(trained.torch_model(model), ids)).max())
        assert diff < FP32_TOLERANCE, model
    bare = onnx_model.logits(ids)
    assert float(np.abs(bare - _logits(trained.torch_model(), ids)).max()) < FP32_TOLERANCE
    first, second = results.values()
    assert float(np.abs(first - second).max()) > 1e-3 and float(np.abs(first - bare).max()) > 1e-3


@needs_onnx
def test_int4_base_keeps_lora_layers_float(trained: Trained, tmp_path: Path) -> None:
    import numpy as np
    import onnx

    from phitune.engines.onnx_engine import OnnxModel

    path = trained.client.models.export(
        trained.models[1], format="onnx", dest=tmp_path / "int4", precision="int4", adapters="separate"
    )
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    lora_ops = {n.op_type for n in graph.node if "/lora_" in n.name}
    assert lora_ops == {"MatMul"} and any(n.op_type == "MatMulNBits" for n in graph.node)
    report = json.loads((path / "export_report.json").read_text())
    (entry,) = report["adapters"].values()
    checks = entry["checks"]  # int4 error is recorded, not held to the fp32 tolerance
    assert checks["tolerance"] is None and checks["passed"] is None and 0 < checks["logits_max_abs_diff"] < 100
    assert 0 <= checks["top1_agreement"] <= 1
    onnx_model = OnnxModel(path)
    ids = trained.prompt_ids()
    assert float(np.abs(onnx_model.logits(ids, str(path / entry["file"])) - onnx_model.logits(ids)).max()) > 1e-3


@needs_onnx
def test_onnx_deployment_chats_like_the_torch_engine(trained: Trained) -> None:
    from phitune.engines.onnx_engine import OnnxServed
    from phitune.engines.torch_engine import Generation

    client, model = trained.client, trained.models[0]
    onnx_dep = client.deployments.create(model=model, name="ft-onnx", engine="onnx")
    torch_dep = client.deployments.create(model=model, name="ft-torch")
    assert onnx_dep.engine == "onnx" and client.deployments.get("ft-onnx").engine == "onnx"
    served = client.backend.served_model("ft-onnx")
    assert isinstance(served, OnnxServed) and served.adapter_file is not None
    assert Path(served.folder).parent == trained.home / "exports" / "onnx"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    got = onnx_dep.chat(messages, max_tokens=12)
    expected = torch_dep.chat(messages, max_tokens=12)
    assert got.object == "chat.completion" and got.model == model
    assert got.text == expected.text and got.usage == expected.usage
    assert got.choices[0].finish_reason == expected.choices[0].finish_reason

    stream = client.backend.stream_chat("ft-onnx", messages, max_tokens=12, temperature=0.0, top_p=1.0, seed=None)
    pieces = list(stream)
    final = pieces[-1]
    assert isinstance(final, Generation) and all(isinstance(p, str) for p in pieces[:-1])
    assert "".join(pieces[:-1]) == final.text == expected.text

    sampled = [onnx_dep.chat(messages, max_tokens=8, temperature=0.9, top_p=0.9, seed=3).text for _ in range(2)]
    assert sampled[0] == sampled[1]

    client.deployments.create(model=trained.models[1], name="ft2-onnx", engine="onnx")
    folders = [p for p in (trained.home / "exports" / "onnx").iterdir() if p.is_dir()]
    assert len(folders) == 1 and len(list(folders[0].glob("*.onnx_adapter"))) == 2  # one base, two adapters
    assert client.deployments.get("ft2-onnx").chat(messages, max_tokens=4).usage is not None

    from_folder = client.deployments.create(model=served.folder, name="from-export", engine="onnx")
    assert from_folder.chat(messages, max_tokens=4).choices[0].message.role == "assistant"


def test_export_refuses_what_it_cannot_do(trained: Trained, tmp_path: Path) -> None:
    client, model = trained.client, trained.models[0]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "tiny-phi3", "format": "adapter"}, "format"),
        ({"model": model, "format": "merged", "precision": "int4"}, "precision"),
        ({"model": model, "format": "merged", "device": "cuda"}, "device"),
        ({"model": model, "format": "tflite"}, "format"),
        ({"model": "tiny-phi3", "format": "onnx", "adapters": "separate"}, "adapters"),
    ]
    for options, field in cases:
        with pytest.raises(SpecError) as info:
            client.models.export(dest=tmp_path / "never", **options)
        assert info.value.field == field, options
    assert not (tmp_path / "never").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ConflictError):
        client.models.export(model, format="adapter", dest=occupied)
    assert client.models.export(model, format="adapter", dest=occupied, overwrite=True) == occupied
    assert not (occupied / "keep.txt").exists()


def test_an_export_outside_tolerance_raises_and_keeps_its_report(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("phitune.export.FP32_TOLERANCE", 0.0)
    with pytest.raises(ExportCheckError) as info:
        trained.client.models.export(trained.models[0], format="merged", dest=tmp_path / "strict")
    assert info.value.report == tmp_path / "strict" / "export_report.json"
    checks = json.loads(info.value.report.read_text())["checks"]
    assert checks["passed"] is False and checks["tolerance"] == 0.0 and checks["logits_max_abs_diff"] > 0
