"""The Azure workspace the Azure samples use, from environment variables, with a clear message when any is missing."""

from __future__ import annotations

import os
import sys
from typing import Any

import phitune

VARIABLES = {
    "AZURE_SUBSCRIPTION_ID": "the subscription id",
    "AZURE_RESOURCE_GROUP": "the resource group of the workspace",
    "AZURE_WORKSPACE": "the workspace or Azure AI Foundry project name",
}


def client_from_environment(what: str) -> phitune.Client:
    """A ``Client.azure`` for the workspace the environment names, or exit 2 saying what is missing."""
    missing = [name for name in VARIABLES if not os.environ.get(name)]
    if missing:
        lines = "\n".join(f"  export {name}=...   # {VARIABLES[name]}" for name in missing)
        sys.stderr.write(
            f"This sample needs {what}. Set:\n{lines}\nand sign in (az login or any DefaultAzureCredential source).\n"
        )
        raise SystemExit(2)
    return phitune.Client.azure(
        subscription_id=os.environ["AZURE_SUBSCRIPTION_ID"],
        resource_group=os.environ["AZURE_RESOURCE_GROUP"],
        workspace=os.environ["AZURE_WORKSPACE"],
    )


def wait_deploy_chat(client: phitune.Client, job_id: str, name: str, **deploy_options: Any) -> None:
    """Wait for the job, print its events, deploy its model, ask the model a question, then delete the deployment
    (unless ``KEEP_DEPLOYMENT=1``)."""
    job = client.finetune.wait(job_id, poll_interval=60)  # tens of minutes to hours
    for event in client.finetune.events(job.id):
        print(f"  [{event.level}] {event.message}")
    if job.status != "succeeded" or job.fine_tuned_model is None:
        sys.exit(f"job {job.id} ended {job.status}: {job.error.message if job.error else ''}")
    print(f"fine-tuned model: {job.fine_tuned_model}")

    deployment = client.deployments.create(model=job.fine_tuned_model, name=name, **deploy_options)
    print(f"deployment {deployment.name}: {deployment.status} at {deployment.endpoint}")
    reply = deployment.chat(  # through the endpoint's OpenAI-compatible route
        [{"role": "user", "content": "Summarize: Amanda baked cookies and will bring Jerry some tomorrow."}],
        max_tokens=128,
    )
    print(reply.text)

    if os.environ.get("KEEP_DEPLOYMENT") != "1":
        client.deployments.delete(deployment.name)
        print(f"deleted {deployment.name} (the fine-tuned model stays registered)")
