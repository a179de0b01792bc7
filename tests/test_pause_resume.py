"""``client.finetune.pause`` and ``resume``: sent to the backends that can pause a job, refused by name elsewhere.
The local backend's pause and resume run through the CLI in ``test_cli.py``."""

from __future__ import annotations

import warnings
from typing import Any

import httpx
import pytest

import phitune
from azure_fake import RESOURCE_GROUP, SUBSCRIPTION, WORKSPACE, FakeAzure, FakeCredential
from phitune.backends.azure import AzureBackend
from phitune.errors import UnsupportedOptionError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # azure-ai-ml's marshmallow schemas warn by the hundred at import
    from azure.ai.ml import MLClient


def _openai_job(status: str) -> dict[str, Any]:
    hyperparameters = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}
    return {"id": "ftjob-1", "object": "fine_tuning.job", "created_at": 1700000000, "error": None,
            "fine_tuned_model": None, "finished_at": None, "hyperparameters": hyperparameters, "model": "gpt-4o-mini",
            "organization_id": "org-1", "result_files": [], "seed": 0, "status": status, "trained_tokens": None,
            "training_file": "file-abc", "validation_file": None}  # fmt: skip


def test_an_openai_compatible_service_pauses_and_resumes_the_job() -> None:
    requests: list[str] = []

    def service(request: httpx.Request) -> httpx.Response:
        requests.append(f"{request.method} {request.url.path}")
        if request.url.path.endswith("/fine_tuning/jobs/ftjob-1/pause"):
            return httpx.Response(200, json=_openai_job("paused"))
        if request.url.path.endswith("/fine_tuning/jobs/ftjob-1/resume"):
            return httpx.Response(200, json=_openai_job("running"))
        return httpx.Response(404, json={"error": {"message": "no route", "type": "invalid_request_error"}})

    http = httpx.Client(transport=httpx.MockTransport(service))
    client = phitune.Client.openai(base_url="https://ft.example/v1", api_key="test-key", http_client=http)
    assert client.finetune.pause("ftjob-1").status == "paused"
    assert client.finetune.resume("ftjob-1").status == "running"
    assert requests[-2:] == ["POST /v1/fine_tuning/jobs/ftjob-1/pause", "POST /v1/fine_tuning/jobs/ftjob-1/resume"]


def test_a_backend_without_pausing_refuses_by_name_before_sending() -> None:
    fake = FakeAzure()
    ml_client = MLClient(FakeCredential(), subscription_id=SUBSCRIPTION, resource_group_name=RESOURCE_GROUP,
                         workspace_name=WORKSPACE, transport=fake, retry_total=0)  # fmt: skip
    client = phitune.Client(backend=AzureBackend(ml_client=ml_client))
    for operation in (client.finetune.pause, client.finetune.resume):
        with pytest.raises(UnsupportedOptionError) as refused:
            operation("phitune-job-1")
        assert refused.value.backend == "azure" and refused.value.field == operation.__name__
    assert fake.requests == []
