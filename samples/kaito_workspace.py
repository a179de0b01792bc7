"""Fine-tune Phi-3-mini on a Kubernetes cluster with Kaito, then serve the adapter — from one phitune JobSpec.

Runs offline: it only writes manifests. Usage::

    python samples/kaito_workspace.py [OUTPUT_DIR]       # default: ./kaito-manifests
    kubectl apply -f OUTPUT_DIR/phi3-mini-qlora-tuning.yaml
    # ... when `kubectl get workspace phi3-mini-qlora` shows WORKSPACESUCCEEDED True:
    kubectl apply -f OUTPUT_DIR/phi3-mini-qlora-inference.yaml

Replace the registry, the push secret and the dataset URL with yours (see docs/kaito.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import phitune
from phitune import kaito

NAME = "phi3-mini-qlora"
REGISTRY = "myacr.azurecr.io"  # your container registry
ADAPTER_IMAGE = f"{REGISTRY}/adapters/{NAME}:0.1.0"
DATASET_URL = (
    "https://huggingface.co/datasets/philschmid/dolly-15k-oai-style/resolve/main/data/"
    "train-00000-of-00001-54e3756291ca09c6.parquet?download=true"
)
INSTANCE_TYPE = "Standard_NC24ads_A100_v4"  # one A100 80 GB


def main(out_dir: Path) -> None:
    spec = phitune.JobSpec(
        model="Phi-3-mini-4k-instruct",
        training_file=DATASET_URL,  # an http(s) training_file is the Workspace's input URL
        method=phitune.QLoRA(r=16, alpha=32, dropout=0.05),  # targets Phi-3's fused qkv_proj/gate_up_proj layers
        hyperparameters=phitune.Hyperparameters(
            epochs=1, learning_rate=2e-4, batch_size=4, gradient_accumulation_steps=4, lr_scheduler="cosine"
        ),
        task="chat_completion",
    )
    tuning = kaito.tuning_workspace(
        spec,
        name=NAME,
        instance_type=INSTANCE_TYPE,
        output_image=ADAPTER_IMAGE,
        push_secret="acr-push",  # kubectl create secret docker-registry acr-push ...
    )
    serving = kaito.inference_workspace(
        spec.model, name=f"{NAME}-serve", adapter_image=ADAPTER_IMAGE, instance_type=INSTANCE_TYPE
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, docs in ((out_dir / f"{NAME}-tuning.yaml", tuning), (out_dir / f"{NAME}-inference.yaml", [serving])):
        path.write_text(kaito.to_yaml(docs), encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kaito-manifests"))
