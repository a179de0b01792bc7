"""Kaito manifests from a :class:`~phitune.JobSpec`: fine-tune and serve Phi models on your own Kubernetes cluster.

`Kaito <https://github.com/kaito-project/kaito>`_ (Kubernetes AI Toolchain Operator) runs LoRA/QLoRA tuning and
inference from a ``Workspace`` custom resource (``kaito.sh/v1beta1``; ``resource``, ``tuning`` and ``inference``
sit at the top level, there is no ``spec``). This module turns a JobSpec into that Workspace plus the ConfigMap
holding Kaito's ``training_config.yaml``, and builds the inference Workspace that serves the resulting adapter.

Everything Kaito's admission webhook (``api/v1beta1/workspace_validation.go``) or its tuning entry point
(``presets/workspace/tuning/text-generation``) would reject is refused here first, with a
:class:`~phitune.errors.SpecError` whose ``field`` names what to change. Nothing here talks to a cluster.

```python
docs = phitune.kaito.tuning_workspace(spec, name="phi3-demo", input_urls=["https://example.com/train.jsonl"],
                                      output_image="myacr.azurecr.io/adapters/phi3-demo:1",
                                      push_secret="acr-push", instance_type="Standard_NC24ads_A100_v4")
Path("phi3-demo.yaml").write_text(phitune.kaito.to_yaml(docs))     # kubectl apply -f phi3-demo.yaml
```
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import catalog
from .errors import MissingDependencyError, PhituneError, SpecError, UnsupportedOptionError
from .types import METHOD_NAMES, Hyperparameters, JobSpec, LoRA, QLoRA

__all__ = [
    "API_VERSION",
    "OUTPUT_DIR",
    "cli",
    "inference_workspace",
    "preset",
    "to_yaml",
    "training_config",
    "tuning_workspace",
]

API_VERSION = "kaito.sh/v1beta1"
OUTPUT_DIR = "/mnt/results"
"""Where Kaito's tuning container writes the adapter (the webhook requires a folder under ``/mnt``)."""

_BACKEND = "kaito"
_RUNTIME_ANNOTATION = "kaito.sh/runtime"
_MANAGED_BY = {"app.kubernetes.io/managed-by": "phitune"}
# TRL's SFTTrainer, which Kaito's tuning image runs, truncates to 1024 tokens; Kaito's training_config.yaml has no
# parameter that changes it (DatasetConfig, DataCollator and TrainingArguments all reject unknown keys).
_KAITO_MAX_SEQ_LENGTH = 1024

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# The docker reference grammar (github.com/distribution/reference), which the webhook parses images with.
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]+)?"
_IMAGE = re.compile(
    rf"^(?P<name>(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*)"
    r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.google", "instance-data.ec2.internal"})


# ------------------------------------------------------------------------------------------------------ checks
def _dns_label(field: str, value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise SpecError(
            field,
            f"{value!r} is not a Kubernetes name (DNS-1123 label): 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit",
        )
    return value


def _dns_subdomain(field: str, value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise SpecError(
            field,
            f"{value!r} is not a Kubernetes object name (DNS-1123 subdomain): lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit",
        )
    return value


def _image(field: str, value: str) -> str:
    match = _IMAGE.match(value)
    if match is None or len(match["name"]) > 255:
        raise SpecError(field, f"{value!r} is not a container image reference such as 'myacr.azurecr.io/repo:tag'")
    return value


def _is_http(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _url(field: str, value: str) -> str:
    """The checks of Kaito's ``validateDataSourceURL``: public http(s) URLs only."""
    if not _is_http(value):
        raise SpecError(field, f"{value!r} is not an http or https URL (Kaito downloads the data itself)")
    host = (urlsplit(value).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost") or host in _METADATA_HOSTS:
        raise SpecError(field, f"{value!r} targets a local or metadata endpoint, which Kaito refuses")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return value
    if address.is_loopback or address.is_private or address.is_link_local or address.is_multicast:
        raise SpecError(field, f"{value!r} targets a loopback, private, link-local or multicast address")
    return value


def _volume(field: str, value: str | Mapping[str, Any]) -> dict[str, Any]:
    """A Kubernetes VolumeSource; a plain string is the name of a PersistentVolumeClaim."""
    if isinstance(value, str):
        return {"persistentVolumeClaim": {"claimName": _dns_subdomain(field, value)}}
    if len(value) != 1 or not isinstance(next(iter(value.values())), Mapping):
        raise SpecError(
            field,
            "give a PersistentVolumeClaim name or one Kubernetes volume source, e.g. "
            "{'persistentVolumeClaim': {'claimName': 'training-data'}}",
        )
    return {key: dict(source) for key, source in value.items()}


def _secrets(field: str, values: Sequence[str]) -> list[str]:
    if isinstance(values, str):
        raise SpecError(field, "give a list of secret names, not a single string")
    return [_dns_subdomain(field, v) for v in values]


def _resource(instance_type: str, label_selector: Mapping[str, str] | None, name: str) -> dict[str, Any]:
    if not instance_type or any(c.isspace() for c in instance_type):
        raise SpecError("instance_type", "Kaito needs the GPU node SKU to provision, e.g. 'Standard_NC24ads_A100_v4'")
    labels = dict(label_selector) if label_selector is not None else {"app": name}
    if not labels:
        raise SpecError("label_selector", "give at least one label; an empty selector matches every node")
    for key, value in labels.items():
        prefix, _, label_name = key.rpartition("/")
        if (
            (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)))
            or len(label_name) > 63
            or not _LABEL_NAME.match(label_name)
            or len(value) > 63
            or not _LABEL_VALUE.match(value)
        ):
            raise SpecError("label_selector", f"{key}={value!r} is not a valid Kubernetes label")
    return {"instanceType": instance_type, "labelSelector": {"matchLabels": labels}}


def _metadata(name: str, namespace: str | None, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = _dns_label("namespace", namespace)
    metadata["labels"] = dict(_MANAGED_BY)
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


def preset(model: str) -> str:
    """The Kaito preset name of a catalog model, e.g. ``"phi-3-mini-4k-instruct"`` for ``"Phi-3-mini-4k-instruct"``.

    Raises :class:`~phitune.errors.UnsupportedOptionError` (field ``model``) for models Kaito has no preset for.
    """
    entry = catalog.find(model)
    if entry is None or entry.kaito_preset is None:
        known = ", ".join(m.name for m in catalog.MODELS if m.kaito_preset)
        why = entry.note if entry is not None and entry.note else "Kaito tunes and serves its own presets only"
        raise UnsupportedOptionError("model", _BACKEND, f"{model!r} has no Kaito preset ({why}); use one of {known}")
    return entry.kaito_preset


def _check_spec(spec: JobSpec) -> tuple[str, LoRA | QLoRA]:
    """Refuse what Kaito cannot run; return the preset name and the (Q)LoRA method."""
    if spec.compute is not None:
        raise UnsupportedOptionError(
            "compute", _BACKEND, "spec.compute selects Azure managed compute; on Kaito give instance_type instead"
        )
    if spec.integrations:
        raise UnsupportedOptionError(
            "integrations", _BACKEND, "Kaito's tuning image runs its own trainer, which phitune's trackers cannot join"
        )
    kaito_preset = preset(spec.model)
    if not isinstance(spec.method, (LoRA, QLoRA)):
        raise UnsupportedOptionError(
            "method", _BACKEND, f"Kaito's tuning methods are lora and qlora, not {spec.method.type}"
        )
    if spec.method.target_parameters:
        raise UnsupportedOptionError(
            "method.target_parameters", _BACKEND, "Kaito's presets are dense models, without expert tensors to adapt"
        )
    if spec.distributed.strategy != "none":
        raise UnsupportedOptionError(
            "distributed.strategy",
            _BACKEND,
            f"Kaito tunes on one node with its own launcher; {spec.distributed.strategy} (and DeepSpeed/ZeRO, "
            "nproc) cannot be set",
        )
    if spec.validation_file is not None:
        raise UnsupportedOptionError(
            "validation_file", _BACKEND, "a Kaito tuning Workspace takes one dataset input and no validation file"
        )
    if spec.hyperparameters.max_seq_length != _KAITO_MAX_SEQ_LENGTH:
        raise UnsupportedOptionError(
            "hyperparameters.max_seq_length",
            _BACKEND,
            f"Kaito's training_config.yaml has no sequence-length parameter; its trainer truncates at "
            f"{_KAITO_MAX_SEQ_LENGTH} tokens, so leave max_seq_length at {_KAITO_MAX_SEQ_LENGTH}",
        )
    if spec.hyperparameters.drop_untrainable_examples:
        raise UnsupportedOptionError(
            "hyperparameters.drop_untrainable_examples",
            _BACKEND,
            "Kaito's trainer takes every example of its dataset; leave out those with no token with loss before "
            "publishing the data",
        )
    return kaito_preset, spec.method


# ---------------------------------------------------------------------------------------------- training config
def _training_arguments(hp: Hyperparameters) -> dict[str, Any]:
    args: dict[str, Any] = {
        "output_dir": OUTPUT_DIR,
        "num_train_epochs": hp.epochs,
        "learning_rate": hp.learning_rate,
        "per_device_train_batch_size": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "warmup_ratio": hp.warmup_ratio,
        "lr_scheduler_type": hp.lr_scheduler,
        "weight_decay": hp.weight_decay,
        # transformers clips only when max_grad_norm > 0, so 0 is "no clipping".
        "max_grad_norm": hp.max_grad_norm if hp.max_grad_norm is not None else 0.0,
        "seed": hp.seed,
        "gradient_checkpointing": hp.gradient_checkpointing,
        "ddp_find_unused_parameters": False,
    }
    if hp.max_steps is not None:
        args["max_steps"] = hp.max_steps
    if hp.checkpoint_every is not None:
        args.update(save_strategy="steps", save_steps=hp.checkpoint_every)
    else:
        args["save_strategy"] = "epoch"
    if hp.precision != "auto":
        args["bf16"] = hp.precision == "bf16"
    return args


def _training_config(spec: JobSpec, method: LoRA | QLoRA) -> dict[str, Any]:
    hp = spec.hyperparameters
    dtype = "float32" if hp.precision == "fp32" else "bfloat16"
    quantization: dict[str, Any] = {"load_in_4bit": False}
    if isinstance(method, QLoRA):
        quantization = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": method.quant_type,
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_use_double_quant": method.double_quant,
        }
    dataset: dict[str, Any] = {"shuffle_dataset": True, "shuffle_seed": hp.seed, "train_test_split": 1}
    if spec.task == "chat_completion":
        dataset["messages_column"] = "messages"
    return {
        "training_config": {
            "ModelConfig": {"torch_dtype": dtype, "local_files_only": True, "device_map": "auto"},
            "QuantizationConfig": quantization,
            "LoraConfig": {
                "r": method.r,
                "lora_alpha": method.alpha,
                "lora_dropout": method.dropout,
                "target_modules": list(method.targets()),  # every preset is a Phi3ForCausalLM
            },
            "TrainingArguments": _training_arguments(hp),
            "DatasetConfig": dataset,
            "DataCollator": {"mlm": False},
        }
    }


def training_config(spec: JobSpec) -> dict[str, Any]:
    """The ``training_config.yaml`` document Kaito's tuning container reads, as a dict.

    Its six sections are ``ModelConfig, QuantizationConfig, LoraConfig, TrainingArguments, DatasetConfig,
    DataCollator``; ``LoraConfig.target_modules`` always lists real module names (Phi-3's fused ``qkv_proj``,
    ``o_proj``, ``gate_up_proj``, ``down_proj`` unless the spec names others).
    """
    _, method = _check_spec(spec)
    return _training_config(spec, method)


# -------------------------------------------------------------------------------------------------- workspaces
def _tuning_input(
    spec: JobSpec,
    urls: Sequence[str] | None,
    volume: str | Mapping[str, Any] | None,
    image: str | None,
    pull_secrets: Sequence[str],
) -> dict[str, Any]:
    given = [kind for kind, value in (("input_urls", urls), ("input_volume", volume), ("input_image", image)) if value]
    if len(given) > 1:
        raise SpecError("input", f"Kaito takes exactly one input kind; got {' and '.join(given)}")
    if pull_secrets and not image:
        raise SpecError("input_pull_secrets", "pull secrets apply to input_image only")
    if image:
        source: dict[str, Any] = {"image": _image("input_image", image)}
        if pull_secrets:
            source["imagePullSecrets"] = _secrets("input_pull_secrets", pull_secrets)
        return source
    if volume:
        return {"volumeSource": _volume("input_volume", volume)}
    if not urls and _is_http(spec.training_file):
        urls = [spec.training_file]
    if not urls:
        raise SpecError(
            "input",
            f"Kaito downloads the data itself and spec.training_file {spec.training_file!r} is not a URL: "
            "give input_urls=[...] (public http/https), input_volume or input_image",
        )
    if isinstance(urls, str):
        raise SpecError("input_urls", "give a list of URLs, not a single string")
    return {"urls": [_url("input_urls", u) for u in urls]}


def _tuning_output(
    image: str | None, push_secret: str | None, volume: str | Mapping[str, Any] | None
) -> dict[str, Any]:
    if image and volume:
        raise SpecError("output", "Kaito takes exactly one output: output_image or output_volume, not both")
    if image:
        if not push_secret:
            raise SpecError("push_secret", "an output_image needs push_secret, the Secret that lets Kaito push to it")
        return {"image": _image("output_image", image), "imagePushSecret": _dns_subdomain("push_secret", push_secret)}
    if push_secret:
        raise SpecError("push_secret", "push_secret applies to output_image only")
    if volume:
        return {"volumeSource": _volume("output_volume", volume)}
    raise SpecError("output", "give output_image (with push_secret) or output_volume for the adapter")


def tuning_workspace(
    spec: JobSpec,
    *,
    name: str,
    instance_type: str,
    input_urls: Sequence[str] | None = None,
    input_volume: str | Mapping[str, Any] | None = None,
    input_image: str | None = None,
    input_pull_secrets: Sequence[str] = (),
    output_image: str | None = None,
    push_secret: str | None = None,
    output_volume: str | Mapping[str, Any] | None = None,
    namespace: str | None = None,
    label_selector: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """A Kaito tuning job for ``spec``: ``[ConfigMap, Workspace]``, in the order ``kubectl apply`` needs.

    Input: ``input_urls`` (public http/https; defaults to ``spec.training_file`` when that is a URL),
    ``input_volume`` (a PVC name or a Kubernetes volume source) or ``input_image`` (data under ``/data``).
    Output: ``output_image`` with ``push_secret``, or ``output_volume``. ``label_selector`` defaults to
    ``{"app": name}``. Raises :class:`~phitune.errors.SpecError` naming the field Kaito would reject.
    """
    _dns_label("name", name)
    kaito_preset, method = _check_spec(spec)
    resource = _resource(instance_type, label_selector, name)
    source = _tuning_input(spec, input_urls, input_volume, input_image, input_pull_secrets)
    destination = _tuning_output(output_image, push_secret, output_volume)
    config_name = f"{name}-training-config"
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config_name, namespace),
        "data": {"training_config.yaml": _render([_training_config(spec, method)], explicit_start=False)},
    }
    workspace = {
        "apiVersion": API_VERSION,
        "kind": "Workspace",
        "metadata": _metadata(name, namespace),
        "resource": resource,
        "tuning": {
            "preset": {"name": kaito_preset},
            "method": method.type,
            "config": config_name,
            "input": source,
            "output": destination,
        },
    }
    return [config_map, workspace]


def inference_workspace(
    model: str,
    *,
    name: str,
    adapter_image: str,
    instance_type: str,
    adapter_strength: float | None = None,
    adapter_name: str | None = None,
    adapter_pull_secrets: Sequence[str] = (),
    namespace: str | None = None,
    label_selector: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A Kaito inference Workspace serving ``model``'s preset with the tuned adapter image attached.

    ``adapter_strength`` (0-1) is honoured by Kaito's transformers runtime only (vLLM rejects it), so setting it
    also sets the ``kaito.sh/runtime: transformers`` annotation. ``adapter_name`` defaults to the last path part
    of the image's repository.
    """
    _dns_label("name", name)
    kaito_preset = preset(model)
    resource = _resource(instance_type, label_selector, name)
    _image("adapter_image", adapter_image)
    if adapter_name is None:
        adapter_name = adapter_image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    source: dict[str, Any] = {"name": _dns_subdomain("adapter_name", adapter_name), "image": adapter_image}
    if adapter_pull_secrets:
        source["imagePullSecrets"] = _secrets("adapter_pull_secrets", adapter_pull_secrets)
    adapter: dict[str, Any] = {"source": source}
    annotations: dict[str, str] = {}
    if adapter_strength is not None:
        if not 0.0 <= adapter_strength <= 1.0:
            raise SpecError("adapter_strength", f"must be between 0 and 1, got {adapter_strength}")
        adapter["strength"] = str(float(adapter_strength))
        annotations[_RUNTIME_ANNOTATION] = "transformers"
    return {
        "apiVersion": API_VERSION,
        "kind": "Workspace",
        "metadata": _metadata(name, namespace, annotations),
        "resource": resource,
        "inference": {"preset": {"name": kaito_preset}, "adapters": [adapter]},
    }


# --------------------------------------------------------------------------------------------------------- yaml
def _render(documents: list[Any], *, explicit_start: bool) -> str:
    try:
        import yaml
    except ImportError:
        raise MissingDependencyError("pyyaml", "kaito") from None

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    _Dumper.add_representer(str, _str)
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, explicit_start=explicit_start)


def to_yaml(docs: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """Kubernetes manifests as multi-document YAML (multi-line strings as ``|`` blocks), for ``kubectl apply -f``."""
    items = [docs] if isinstance(docs, Mapping) else list(docs)
    return _render([dict(d) for d in items], explicit_start=True)


# ---------------------------------------------------------------------------------------------------------- cli
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phitune kaito", description="Write Kaito manifests that fine-tune or serve a Phi model."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="Phi-3-mini-4k-instruct", help="catalog model with a Kaito preset")
    common.add_argument("--name", required=True, help="Workspace name (a DNS-1123 label)")
    common.add_argument("--instance-type", default="", help="GPU node SKU, e.g. Standard_NC24ads_A100_v4")
    common.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's current one)")
    common.add_argument("-o", "--output", type=Path, help="write the YAML to this file instead of stdout")

    tuning = commands.add_parser("tuning", parents=[common], help="a tuning Workspace and its ConfigMap")
    tuning.add_argument("--method", default="lora", choices=[m for m in METHOD_NAMES if m != "peft"])
    tuning.add_argument("--epochs", type=int)
    tuning.add_argument("--learning-rate", type=float)
    tuning.add_argument("--batch-size", type=int)
    tuning.add_argument("--input-url", action="append", default=[], help="dataset URL (repeatable)")
    tuning.add_argument("--input-pvc", help="PersistentVolumeClaim holding the dataset")
    tuning.add_argument("--output-image", help="image the adapter is pushed to")
    tuning.add_argument("--push-secret", help="Secret with the registry credentials for --output-image")
    tuning.add_argument("--output-pvc", help="PersistentVolumeClaim the adapter is written to")

    inference = commands.add_parser("inference", parents=[common], help="an inference Workspace with an adapter")
    inference.add_argument("--adapter-image", required=True, help="the image a tuning Workspace pushed")
    inference.add_argument("--adapter-name", help="adapter name (default: the image's repository name)")
    inference.add_argument("--adapter-strength", type=float, help="0-1; selects Kaito's transformers runtime")
    return parser


def _documents(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.command == "inference":
        return [
            inference_workspace(
                args.model,
                name=args.name,
                adapter_image=args.adapter_image,
                instance_type=args.instance_type,
                adapter_strength=args.adapter_strength,
                adapter_name=args.adapter_name,
                namespace=args.namespace,
            )
        ]
    given = {"epochs": args.epochs, "learning_rate": args.learning_rate, "batch_size": args.batch_size}
    # The data reach Kaito through the Workspace input; training_file only names them in the spec.
    spec = JobSpec.model_validate(
        {
            "model": args.model,
            "training_file": args.input_url[0] if args.input_url else args.input_pvc or "none",
            "method": args.method,
            "hyperparameters": {k: v for k, v in given.items() if v is not None},
        }
    )
    return tuning_workspace(
        spec,
        name=args.name,
        instance_type=args.instance_type,
        input_urls=args.input_url or None,
        input_volume=args.input_pvc,
        output_image=args.output_image,
        push_secret=args.push_secret,
        output_volume=args.output_pvc,
        namespace=args.namespace,
    )


def cli(argv: list[str]) -> int:
    """``phitune kaito {tuning,inference} ...``: print the manifests, or write them with ``-o FILE``.

    Returns the exit status: 0 on success, 2 for invalid arguments (the message names the option to change).
    """
    from pydantic import ValidationError

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        text = to_yaml(_documents(args))
    except (PhituneError, ValidationError) as exc:
        print(f"phitune kaito: error: {exc}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}; apply it with: kubectl apply -f {args.output}", file=sys.stderr)
    return 0
