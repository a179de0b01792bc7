"""Fine-tune Phi-4-mini-instruct with Azure serverless fine-tuning (Models as a Service), deploy it, and chat.

The flow of Microsoft's notebook azureml-examples/sdk/python/jobs/finetuning/standalone/model-as-a-service/
chat-completion/chat_completion_with_model_as_service.ipynb, through phitune: upload → job → wait → deploy → chat.

It needs a real Azure AI Foundry hub-based project in a region that fine-tunes Phi-4-mini-instruct serverless (East US
2, East US, North Central US, South Central US, West US, West US 3) and credentials (``az login`` or any
``DefaultAzureCredential`` source); it cannot run offline and was not run in phitune's test environment (the same
calls are exercised offline by tests/test_azure.py against a fake Azure). It creates billable resources: a
fine-tuning job and a serverless endpoint (deleted at the end unless ``KEEP_DEPLOYMENT=1``). Usage::

    export AZURE_SUBSCRIPTION_ID=... AZURE_RESOURCE_GROUP=... AZURE_WORKSPACE=...   # the project
    python samples/azure_maas.py TRAIN.jsonl [VALIDATION.jsonl]

TRAIN/VALIDATION are chat JSONL files (``{"messages": [...]}`` per line), e.g. the notebook's train.jsonl and
validation.jsonl.
"""

from __future__ import annotations

import sys

from _azure_workspace import client_from_environment, wait_deploy_chat

MODEL = "Phi-4-mini-instruct"


def main(train: str, validation: str | None) -> None:
    with client_from_environment("an Azure AI Foundry hub-based project") as client:
        # 1. Data: validated locally (every problem with its line number), then registered as uri_file assets.
        train_file = client.files.upload(train, model=MODEL)
        valid_file = client.files.upload(validation, model=MODEL) if validation else None
        print(f"training data {train_file.id}: {train_file.examples} examples")

        # 2. The job: the notebook's hyperparameters; region and options are checked before it is submitted.
        job = client.finetune.create(
            model=MODEL,
            training_file=train_file.id,
            validation_file=valid_file.id if valid_file else None,
            hyperparameters={"epochs": 1, "batch_size": 1, "learning_rate": 2e-5},
            suffix="samsum",
        )
        print(f"job {job.id}: {job.status}")

        # 3-5. Wait (serverless fine-tuning takes tens of minutes to hours), deploy the registered model as a
        # serverless endpoint, and chat through its OpenAI-compatible route.
        wait_deploy_chat(client, job.id, f"phi4-ft-{job.id[-8:]}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)
