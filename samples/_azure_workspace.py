"""The Azure workspace the Azure samples use, from environment variables, with a clear message when any is missing."""

from __future__ import annotations

import os
import sys

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
