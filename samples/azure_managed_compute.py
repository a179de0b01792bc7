"""Fine-tune Phi-4-mini-instruct on Azure ML managed compute (Models as a Platform), deploy it to a managed online
endpoint, and chat with it.

The flow of Microsoft's notebook azureml-examples/sdk/python/jobs/finetuning/standalone/model-as-a-platform/
chat-completion/chat_completion_with_model_as_platform.ipynb, through phitune: upload → job on serverless GPU instances
→ wait → managed online endpoint + deployment (all traffic) → chat on ``{scoring_uri}/v1/chat/completions``.

It needs any Azure ML workspace (no hub project required), quota for the GPU instance type, and credentials (``az
login`` or any ``DefaultAzureCredential`` source); it cannot run offline and was not run in phitune's test environment
(the same calls are exercised offline by tests/test_azure.py against a fake Azure). It creates billable resources: a
fine-tuning job and a managed online deployment on a GPU VM (deleted at the end unless ``KEEP_DEPLOYMENT=1``). Usage::

    export AZURE_SUBSCRIPTION_ID=... AZURE_RESOURCE_GROUP=... AZURE_WORKSPACE=...   # the workspace
    python samples/azure_managed_compute.py TRAIN.jsonl [VALIDATION.jsonl]

``INSTANCE_TYPE`` (default Standard_NC24ads_A100_v4, one A100) trains and serves; ``batch_size`` is the global batch,
split evenly over that VM's GPUs.
"""

from __future__ import annotations

import os
import sys

from _azure_workspace import client_from_environment, wait_deploy_chat

import phitune

MODEL = "Phi-4-mini-instruct"


def main(train: str, validation: str | None) -> None:
    instance_type = os.environ.get("INSTANCE_TYPE", "Standard_NC24ads_A100_v4")
    with client_from_environment("an Azure ML workspace") as client:
        train_file = client.files.upload(train, model=MODEL)
        valid_file = client.files.upload(validation, model=MODEL) if validation else None
        print(f"training data {train_file.id}: {train_file.examples} examples")

        job = client.finetune.create(
            model=MODEL,
            training_file=train_file.id,
            validation_file=valid_file.id if valid_file else None,
            method=phitune.LoRA(r=16, alpha=32, dropout=0.05),
            hyperparameters={"epochs": 1, "batch_size": 1, "learning_rate": 2e-5, "warmup_ratio": 0.05},
            compute=phitune.AzureCompute(instance_types=(instance_type,)),
            suffix="samsum",
        )
        print(f"job {job.id}: {job.status}")
        # a managed online endpoint on the same VM size, all traffic to its one deployment
        wait_deploy_chat(client, job.id, f"phi4-maap-{job.id[-8:]}", instance_type=instance_type)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)
