"""Kaito manifests: CRD-valid Workspaces, a parseable training_config.yaml, and every admission rule refused first."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import phitune
from phitune import catalog, kaito
from phitune.errors import MissingDependencyError, SpecError, UnsupportedOptionError
from phitune.types import PHI3_LORA_TARGETS

CRD = Path(__file__).resolve().parents[2] / "shared" / "data" / "kaito" / "kaito.sh_workspaces.yaml"
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "kaito_workspace.py"
SECTIONS = ["ModelConfig", "QuantizationConfig", "LoraConfig", "TrainingArguments", "DatasetConfig", "DataCollator"]
MODEL = "Phi-3-mini-4k-instruct"
URL = "https://example.com/data/train.jsonl"
IMAGE = "myacr.azurecr.io/adapters/phi3-demo:1"
SKU = "Standard_NC24ads_A100_v4"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    if not CRD.is_file():
        pytest.skip(f"Kaito CRD not found at {CRD} (shared test data absent)")
    crd = yaml.safe_load(CRD.read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return dict(version["schema"]["openAPIV3Schema"])


def unknown_fields(doc: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would prune: the CRD schema itself accepts them, so walk it like a structural schema."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(doc, dict) and "properties" in node:
        found: list[str] = []
        for key, value in doc.items():
            if key not in node["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(value, node["properties"][key], f"{path}.{key}")
        return found
    if isinstance(doc, list) and "items" in node:
        return [f for i, item in enumerate(doc) for f in unknown_fields(item, node["items"], f"{path}[{i}]")]
    return []


def check_workspace(workspace: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(schema).validate(workspace)
    assert unknown_fields(workspace, schema) == []
    assert "spec" not in workspace
    assert workspace["apiVersion"] == "kaito.sh/v1beta1"
    assert workspace["kind"] == "Workspace"


def make_spec(**overrides: Any) -> phitune.JobSpec:
    return phitune.JobSpec.model_validate({"model": MODEL, "training_file": "train.jsonl", **overrides})


def tuning(spec: phitune.JobSpec | None = None, **overrides: Any) -> list[dict[str, Any]]:
    kwargs: dict[str, Any] = {
        "name": "phi3-demo",
        "instance_type": SKU,
        "input_urls": [URL],
        "output_image": IMAGE,
        "push_secret": "acr-push",
        **overrides,
    }
    return kaito.tuning_workspace(spec or make_spec(), **kwargs)


def config_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config_map, workspace = docs
    assert config_map["kind"] == "ConfigMap"
    assert workspace["tuning"]["config"] == config_map["metadata"]["name"]
    document = yaml.safe_load(config_map["data"]["training_config.yaml"])
    assert list(document) == ["training_config"]
    return dict(document["training_config"])


# ------------------------------------------------------------------------------------------------ tuning workspace
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("source", ["urls", "volume", "image"])
@pytest.mark.parametrize("destination", ["image", "volume"])
def test_tuning_workspace_matches_the_crd(method: str, source: str, destination: str, schema: dict[str, Any]) -> None:
    input_kinds: dict[str, dict[str, Any]] = {
        "urls": {"input_urls": [URL, "https://example.com/data/more.jsonl"]},
        "volume": {"input_urls": None, "input_volume": "training-data"},
        "image": {"input_urls": None, "input_image": "myacr.azurecr.io/data/chat:1", "input_pull_secrets": ["pull"]},
    }
    output_kinds: dict[str, dict[str, Any]] = {
        "image": {},
        "volume": {"output_image": None, "push_secret": None, "output_volume": {"azureFile": {"shareName": "out"}}},
    }
    docs = tuning(make_spec(method=method), namespace="ml", **input_kinds[source], **output_kinds[destination])
    config_map, workspace = docs
    check_workspace(workspace, schema)
    assert workspace["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "ml"
    assert workspace["resource"] == {"instanceType": SKU, "labelSelector": {"matchLabels": {"app": "phi3-demo"}}}
    tune = workspace["tuning"]
    assert tune["method"] == method
    assert tune["preset"] == {"name": "phi-3-mini-4k-instruct"}
    assert len(tune["input"]) == (2 if source == "image" else 1)
    if source == "volume":
        assert tune["input"] == {"volumeSource": {"persistentVolumeClaim": {"claimName": "training-data"}}}
    if destination == "image":
        assert tune["output"] == {"image": IMAGE, "imagePushSecret": "acr-push"}
    else:
        assert tune["output"] == {"volumeSource": {"azureFile": {"shareName": "out"}}}
    assert config_of(docs)["QuantizationConfig"]["load_in_4bit"] is (method == "qlora")


@pytest.mark.parametrize(
    ("model", "preset"),
    [
        ("Phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct"),
        ("microsoft/Phi-3-mini-128k-instruct", "phi-3-mini-128k-instruct"),
        ("phi-3-medium-4k-instruct", "phi-3-medium-4k-instruct"),
        ("Phi-3-medium-128k-instruct", "phi-3-medium-128k-instruct"),
        ("Phi-3.5-mini-instruct", "phi-3.5-mini-instruct"),
        ("microsoft/Phi-4-mini-instruct", "phi-4-mini-instruct"),
        ("Phi-4", "phi-4"),
    ],
)
def test_presets_come_from_the_catalog(model: str, preset: str, schema: dict[str, Any]) -> None:
    """Kaito's presets (presets/workspace/models/phi3 and phi4 of kaito-project/kaito): each a Phi3ForCausalLM,
    tuned with LoRA on its fused projections; its inference Workspace serves the same preset."""
    assert kaito.preset(model) == preset
    docs = tuning(make_spec(model=model))
    check_workspace(docs[1], schema)
    assert docs[1]["tuning"]["preset"]["name"] == preset
    assert config_of(docs)["LoraConfig"]["target_modules"] == list(PHI3_LORA_TARGETS)
    served = kaito.inference_workspace(model, name="phi-serve", instance_type=SKU, adapter_image=IMAGE)
    assert served["inference"]["preset"]["name"] == preset
    entry = catalog.find(model)
    assert entry is not None and entry.architecture == "phi3"


def test_training_config_has_six_sections_and_phi3_targets() -> None:
    spec = make_spec(
        method={"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.1, "quant_type": "fp4", "double_quant": False},
        task="chat_completion",
        hyperparameters={
            "epochs": 3,
            "max_steps": 500,
            "learning_rate": 1e-4,
            "batch_size": 2,
            "gradient_accumulation_steps": 8,
            "warmup_ratio": 0.03,
            "lr_scheduler": "cosine",
            "weight_decay": 0.01,
            "max_grad_norm": None,
            "seed": 7,
            "checkpoint_every": 100,
            "gradient_checkpointing": True,
            "precision": "bf16",
        },
    )
    config = config_of(tuning(spec))
    assert list(config) == SECTIONS
    assert config == kaito.training_config(spec)["training_config"]
    assert config["ModelConfig"] == {"torch_dtype": "bfloat16", "local_files_only": True, "device_map": "auto"}
    assert config["QuantizationConfig"] == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_use_double_quant": False,
    }
    assert config["LoraConfig"] == {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    }
    assert config["TrainingArguments"] == {
        "output_dir": "/mnt/results",
        "num_train_epochs": 3,
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 8,
        "warmup_ratio": 0.03,
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.01,
        "max_grad_norm": 0.0,
        "seed": 7,
        "gradient_checkpointing": True,
        "ddp_find_unused_parameters": False,
        "max_steps": 500,
        "save_strategy": "steps",
        "save_steps": 100,
        "bf16": True,
    }
    assert config["DatasetConfig"] == {
        "shuffle_dataset": True,
        "shuffle_seed": 7,
        "train_test_split": 1,
        "messages_column": "messages",
    }
    assert config["DataCollator"] == {"mlm": False}


def test_lora_defaults() -> None:
    config = kaito.training_config(make_spec(method="lora", hyperparameters={"precision": "fp32"}))["training_config"]
    assert config["QuantizationConfig"] == {"load_in_4bit": False}
    assert config["ModelConfig"]["torch_dtype"] == "float32"
    assert config["LoraConfig"]["target_modules"] == list(PHI3_LORA_TARGETS)
    assert config["TrainingArguments"]["bf16"] is False
    assert config["TrainingArguments"]["save_strategy"] == "epoch"
    assert "max_steps" not in config["TrainingArguments"]
    assert "messages_column" not in config["DatasetConfig"]


def test_custom_target_modules_are_kept() -> None:
    spec = make_spec(method={"type": "lora", "target_modules": ["qkv_proj", "o_proj"]})
    assert kaito.training_config(spec)["training_config"]["LoraConfig"]["target_modules"] == ["qkv_proj", "o_proj"]


def test_training_file_url_is_the_default_input() -> None:
    docs = tuning(make_spec(training_file=URL), input_urls=None)
    assert docs[1]["tuning"]["input"] == {"urls": [URL]}


# ---------------------------------------------------------------------------------------------------- refusals
SPEC_REFUSALS = [
    ({"method": "dora"}, "method"),
    ({"method": "full"}, "method"),
    ({"method": {"type": "peft", "config": {"peft_type": "IA3"}}}, "method"),
    ({"distributed": {"strategy": "ddp", "nproc": 2}}, "distributed.strategy"),
    ({"distributed": {"strategy": "fsdp", "nproc": 2}}, "distributed.strategy"),
    ({"distributed": {"strategy": "deepspeed", "nproc": 2, "zero_stage": 3}}, "distributed.strategy"),
    ({"model": "Phi-3-small-8k-instruct"}, "model"),
    ({"model": "tiny-phi3"}, "model"),
    ({"model": "tiny-phi4-mini"}, "model"),
    ({"model": "Phi-3.5-MoE-instruct"}, "model"),  # Kaito has no preset for it
    ({"method": {"type": "lora", "target_parameters": ["experts.down_proj"]}}, "method.target_parameters"),
    ({"model": "meta-llama/Meta-Llama-3-8B-Instruct"}, "model"),
    ({"compute": {"compute": "gpu-cluster"}}, "compute"),
    ({"validation_file": "valid.jsonl"}, "validation_file"),
    ({"hyperparameters": {"max_seq_length": 4096}}, "hyperparameters.max_seq_length"),
    ({"hyperparameters": {"drop_untrainable_examples": True}}, "hyperparameters.drop_untrainable_examples"),
]


@pytest.mark.parametrize(("overrides", "field"), SPEC_REFUSALS)
def test_spec_options_kaito_rejects_are_refused(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(UnsupportedOptionError) as caught:
        tuning(make_spec(**overrides))
    assert caught.value.field == field
    assert caught.value.backend == "kaito"


ARGUMENT_REFUSALS = [
    ({"input_volume": "training-data"}, "input"),
    ({"input_image": "myacr.azurecr.io/data:1"}, "input"),
    ({"input_urls": None}, "input"),
    ({"input_urls": ["file:///data/train.jsonl"]}, "input_urls"),
    ({"input_urls": ["http://localhost:8000/train.jsonl"]}, "input_urls"),
    ({"input_urls": ["http://169.254.169.254/latest"]}, "input_urls"),
    ({"input_urls": ["https://10.0.0.4/train.jsonl"]}, "input_urls"),
    ({"input_urls": "https://example.com/train.jsonl"}, "input_urls"),
    ({"input_pull_secrets": ["pull"]}, "input_pull_secrets"),
    ({"input_urls": None, "input_volume": {"a": {}, "b": {}}}, "input_volume"),
    ({"output_image": None, "push_secret": None}, "output"),
    ({"output_volume": "adapters"}, "output"),
    ({"push_secret": None}, "push_secret"),
    ({"output_image": None, "output_volume": "adapters"}, "push_secret"),
    ({"push_secret": "ACR_Secret"}, "push_secret"),
    ({"output_image": "not an image"}, "output_image"),
    ({"output_image": "MyACR.azurecr.io/Adapters:1"}, "output_image"),
    ({"name": "Phi3_Demo"}, "name"),
    ({"name": "-phi3"}, "name"),
    ({"name": "p" * 64}, "name"),
    ({"namespace": "ML"}, "namespace"),
    ({"instance_type": ""}, "instance_type"),
    ({"instance_type": "Standard NC24"}, "instance_type"),
    ({"label_selector": {}}, "label_selector"),
    ({"label_selector": {"app": "bad value"}}, "label_selector"),
]


@pytest.mark.parametrize(("overrides", "field"), ARGUMENT_REFUSALS)
def test_workspace_arguments_kaito_rejects_are_refused(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        tuning(**overrides)
    assert caught.value.field == field
    assert field in str(caught.value)


# -------------------------------------------------------------------------------------------- inference workspace
@pytest.mark.parametrize("strength", [None, 0.5, 1])
def test_inference_workspace_serves_the_adapter(strength: float | None, schema: dict[str, Any]) -> None:
    workspace = kaito.inference_workspace(
        "Phi-3-medium-128k-instruct",
        name="phi3-serve",
        adapter_image=IMAGE,
        instance_type=SKU,
        adapter_strength=strength,
        adapter_pull_secrets=["acr-pull"],
    )
    check_workspace(workspace, schema)
    assert "tuning" not in workspace
    assert workspace["inference"]["preset"] == {"name": "phi-3-medium-128k-instruct"}
    (adapter,) = workspace["inference"]["adapters"]
    assert adapter["source"] == {"name": "phi3-demo", "image": IMAGE, "imagePullSecrets": ["acr-pull"]}
    if strength is None:
        assert "strength" not in adapter
        assert "annotations" not in workspace["metadata"]
    else:
        assert float(adapter["strength"]) == strength
        assert workspace["metadata"]["annotations"] == {"kaito.sh/runtime": "transformers"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model": "tiny-phi3"}, "model"),
        ({"model": "Phi-3.5-MoE-instruct"}, "model"),
        ({"model": "Phi-3-small-128k-instruct"}, "model"),
        ({"name": "Serve"}, "name"),
        ({"adapter_image": "https://myacr.azurecr.io/a:1"}, "adapter_image"),
        ({"adapter_image": "myacr.azurecr.io/my_adapter:1"}, "adapter_name"),
        ({"adapter_strength": 1.5}, "adapter_strength"),
        ({"adapter_strength": -0.1}, "adapter_strength"),
        ({"instance_type": ""}, "instance_type"),
    ],
)
def test_inference_refusals(overrides: dict[str, Any], field: str) -> None:
    kwargs: dict[str, Any] = {"name": "phi3-serve", "adapter_image": IMAGE, "instance_type": SKU, **overrides}
    model = kwargs.pop("model", MODEL)
    with pytest.raises(SpecError) as caught:
        kaito.inference_workspace(model, **kwargs)
    assert caught.value.field == field


# ---------------------------------------------------------------------------------------------------- yaml, cli
def test_yaml_round_trips() -> None:
    docs = tuning(make_spec(method="qlora"))
    serve = kaito.inference_workspace(MODEL, name="phi3-serve", adapter_image=IMAGE, instance_type=SKU)
    text = kaito.to_yaml([*docs, serve])
    assert list(yaml.safe_load_all(text)) == [*docs, serve]
    assert "training_config.yaml: |" in text  # the ConfigMap's file stays readable
    assert list(yaml.safe_load_all(kaito.to_yaml(serve))) == [serve]


def test_missing_pyyaml_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(MissingDependencyError) as caught:
        kaito.to_yaml([{"kind": "ConfigMap"}])
    assert caught.value.package == "pyyaml"
    assert caught.value.extra == "kaito"


def test_import_stays_light() -> None:
    code = "import sys, phitune.kaito; assert 'yaml' not in sys.modules and 'jsonschema' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_writes_tuning_yaml(tmp_path: Path, schema: dict[str, Any]) -> None:
    out = tmp_path / "phi3-demo.yaml"
    argv = ["tuning", "--name", "phi3-demo", "--method", "qlora", "--epochs", "2", "--learning-rate", "0.0001"]
    argv += ["--batch-size", "8", "--input-url", URL, "--input-url", "https://example.com/b.jsonl"]
    argv += ["--output-image", IMAGE, "--push-secret", "acr-push", "--instance-type", SKU, "-o", str(out)]
    assert kaito.cli(argv) == 0
    config_map, workspace = yaml.safe_load_all(out.read_text(encoding="utf-8"))
    check_workspace(workspace, schema)
    assert workspace["tuning"]["input"]["urls"] == [URL, "https://example.com/b.jsonl"]
    arguments = config_of([config_map, workspace])["TrainingArguments"]
    assert (arguments["num_train_epochs"], arguments["learning_rate"], arguments["per_device_train_batch_size"]) == (
        2,
        1e-4,
        8,
    )


def test_cli_prints_inference_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["inference", "--name", "phi3-serve", "--adapter-image", IMAGE, "--instance-type", SKU]
    assert kaito.cli([*argv, "--adapter-strength", "0.8"]) == 0
    (workspace,) = yaml.safe_load_all(capsys.readouterr().out)
    assert workspace["inference"]["adapters"][0]["strength"] == "0.8"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tuning", "--name", "x", "--method", "dora", "--input-url", URL, "--output-pvc", "out"], "method"),
        (["tuning", "--name", "x", "--input-url", URL, "--output-image", IMAGE], "push_secret"),
        (["tuning", "--name", "x", "--input-pvc", "data", "--output-pvc", "out", "--epochs", "0"], "epochs"),
    ],
)
def test_cli_errors_name_the_option(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert kaito.cli([*argv, "--instance-type", SKU]) == 2
    assert message in capsys.readouterr().err


def test_cli_usage_error_returns_two(capsys: pytest.CaptureFixture[str]) -> None:
    assert kaito.cli(["tuning"]) == 2
    assert "--name" in capsys.readouterr().err


def test_sample_writes_manifests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schema: dict[str, Any]) -> None:
    monkeypatch.setattr(sys, "argv", [str(SAMPLE), str(tmp_path)])
    runpy.run_path(str(SAMPLE), run_name="__main__")
    written = sorted(tmp_path.glob("*.yaml"))
    assert [p.name for p in written] == ["phi3-mini-qlora-inference.yaml", "phi3-mini-qlora-tuning.yaml"]
    for path in written:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc["kind"] == "Workspace":
                check_workspace(doc, schema)
