"""The Azure backend, offline, under the real azure-ai-ml code: azure_fake.FakeAzure plays the REST services as an
azure-core transport and azure_fake.ChatServer is a loopback serverless endpoint. Nothing of phitune is mocked."""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import phitune
from azure_fake import (
    AAD_TOKEN,
    ENDPOINT_KEY,
    RESOURCE_GROUP,
    STORAGE_ACCOUNT,
    STORAGE_KEY,
    SUBSCRIPTION,
    WORKSPACE,
    WORKSPACE_GUID,
    ChatServer,
    FakeAzure,
    FakeCredential,
)
from phitune._retry import RetryPolicy, retry_after
from phitune.backends.azure import AzureBackend
from phitune.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    OfferLifecycleWarning,
    OfferRetiredError,
    RateLimitError,
    SpecError,
    UnsupportedOptionError,
)
from phitune.types import PEFT, AzureCompute, DatasetReport, DoRA, Full, Hyperparameters, JobSpec, LoRA, QLoRA

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # azure-ai-ml's marshmallow schemas warn by the hundred at import
    from azure.ai.ml import MLClient

JOB_PUT = r"/workspaces/proj-phitune/jobs/phitune-"
MODEL = "Phi-4-mini-instruct"
RETIRED = "Phi-3-mini-4k-instruct"


class Uploads:
    """The upload seam: records each file and hands back a datastore URI, as the blob upload would."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def __call__(self, path: str, name: str) -> str:
        self.files[name] = Path(path).read_bytes()
        return f"azureml://datastores/workspaceblobstore/paths/phitune/{name}/{Path(path).name}"


@pytest.fixture
def fake() -> FakeAzure:
    return FakeAzure()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def uploads() -> Uploads:
    return Uploads()


def ml_client(fake: FakeAzure) -> MLClient:
    return MLClient(
        FakeCredential(),
        subscription_id=SUBSCRIPTION,
        resource_group_name=RESOURCE_GROUP,
        workspace_name=WORKSPACE,
        transport=fake,
        retry_total=0,
    )


@pytest.fixture
def backend(fake: FakeAzure, sleeps: list[float], uploads: Uploads) -> Iterator[AzureBackend]:
    azure = AzureBackend(
        ml_client=ml_client(fake),
        uploader=uploads,
        retry=RetryPolicy(sleep=sleeps.append, backoff=0.001),
        poll_interval=0.0,
    )
    yield azure
    azure.close()


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    server = ChatServer()
    yield server
    server.close()


def upload(backend: AzureBackend, folder: Path, fmt: str = "chat", name: str = "train.jsonl") -> str:
    path = folder / name
    line: dict[str, Any] = {"prompt": "2+2=", "completion": "4"}
    if fmt == "chat":
        line = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    path.write_text(json.dumps(line) + "\n")
    report = DatasetReport(path=str(path), ok=True, format=fmt, examples=1)
    return backend.upload_file(str(path), report=report).id


def submit(backend: AzureBackend, folder: Path, key: str = "key-1", **fields: Any) -> str:
    spec = JobSpec(model=fields.pop("model", MODEL), training_file=upload(backend, folder), **fields)
    return backend.create_job(spec, idempotency_key=key).id


# ------------------------------------------------------------------------------------------------------- import
def test_import_phitune_never_imports_azure() -> None:
    code = "import sys, phitune, phitune.backends.azure; print(sorted(m for m in sys.modules if m.startswith('azure')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -------------------------------------------------------------------------------------------------------- files
def test_upload_registers_a_uri_file_asset_once(
    backend: AzureBackend, fake: FakeAzure, uploads: Uploads, tmp_path: Path
) -> None:
    file_id = upload(backend, tmp_path)
    (put,) = fake.sent("PUT", r"/data/phitune-train-[0-9a-f]{12}/versions/1$")
    assert put.query["api-version"] == "2023-04-01-preview"
    name = put.path.split("/data/")[1].split("/")[0]
    props = put.body["properties"]
    assert props["dataType"] == "uri_file"
    assert props["dataUri"] == f"azureml://datastores/workspaceblobstore/paths/phitune/{name}/train.jsonl"
    assert props["tags"]["phitune.format"] == "chat" and props["tags"]["phitune.examples"] == "1"
    assert uploads.files[name] == (tmp_path / "train.jsonl").read_bytes()
    assert file_id == f"azureml:{name}:1"

    assert upload(backend, tmp_path) == file_id  # same content: the existing asset, no second PUT
    assert len(fake.sent("PUT", r"/data/")) == 1
    got = backend.get_file(file_id)
    assert (got.filename, got.format, got.examples, got.bytes) == ("train.jsonl", "chat", 1, len(uploads.files[name]))
    assert [f.id for f in backend.list_files()] == [file_id]

    backend.delete_file(file_id)
    assert fake.sent("PUT", r"/data/")[-1].body["properties"]["isArchived"] is True
    assert backend.list_files() == []
    with pytest.raises(NotFoundError):
        backend.get_file("azureml:phitune-nothing:1")
    with pytest.raises(SpecError) as err:
        backend.get_file("train.jsonl")
    assert err.value.field == "file_id"


# --------------------------------------------------------------------------------------------------------- jobs
def test_create_job_puts_a_finetuning_job(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    hp = Hyperparameters(epochs=3, learning_rate=2e-5, batch_size=2)
    job_id = submit(backend, tmp_path, hyperparameters=hp, suffix="support")
    # the registry model is resolved to its latest version before anything is submitted
    assert fake.sent("GET", r"/registries/azureml/models/Phi-4-mini-instruct/versions$")
    (put,) = fake.sent("PUT", JOB_PUT)
    assert put.query["api-version"] == "2024-10-01-preview"
    props = put.body["properties"]
    assert props["jobType"] == "FineTuning"
    assert props["experimentName"] == "phitune"
    details = props["fineTuningDetails"]
    assert details["taskType"] == "chatCompletion"
    assert details["modelProvider"] == "Custom"
    assert details["model"] == {
        "uri": "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/4",
        "jobInputType": "mlflow_model",
    }
    assert details["trainingData"]["jobInputType"] == "uri_file"
    assert "/data/phitune-train-" in details["trainingData"]["uri"]
    assert "validationData" not in details
    # serverless takes only the names of Microsoft's MaaS notebook
    assert details["hyperParameters"] == {
        "num_train_epochs": "3",
        "learning_rate": "0.00002",
        "per_device_train_batch_size": "2",
    }
    output = props["outputs"]["registered_model"]
    assert output["jobOutputType"] == "mlflow_model"
    assert output["assetName"].startswith("Phi-4-mini-instruct-ft-support-")
    assert "computeId" not in props and "resources" not in props  # serverless

    job = backend.get_job(job_id)
    assert (job.status, job.backend, job.model, job.suffix) == ("queued", "azure", MODEL, "support")
    assert job.spec is not None and job.spec.hyperparameters == hp
    # the job's first events say how the batch maps and which of Azure's own defaults apply
    notes = [e.message for e in backend.list_events(job_id) if ":note:" in e.id]
    assert notes == [
        "batch_size 2 is sent as per_device_train_batch_size=2; Azure does not disclose how many devices a "
        "serverless job uses, so its global batch is 2 x that count",
        "Azure applies the model's own defaults for what this offer does not take: lr_scheduler_type=cosine "
        "(phitune's lr_scheduler: linear)",
    ]


def test_text_data_validation_file_and_task_checks(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    train = upload(backend, tmp_path, fmt="prompt_completion")
    valid = upload(backend, tmp_path, fmt="prompt_completion", name="valid.jsonl")
    backend.create_job(JobSpec(model=MODEL, training_file=train, validation_file=valid), idempotency_key="k")
    details = fake.sent("PUT", JOB_PUT)[0].body["properties"]["fineTuningDetails"]
    assert details["taskType"] == "textCompletion"
    assert "/data/phitune-valid-" in details["validationData"]["uri"]

    with pytest.raises(SpecError) as err:
        backend.create_job(JobSpec(model=MODEL, training_file=train, task="chat_completion"), idempotency_key="k2")
    assert err.value.field == "task"
    with pytest.raises(SpecError) as err:
        backend.create_job(JobSpec(model=MODEL, training_file=str(tmp_path / "train.jsonl")), idempotency_key="k3")
    assert err.value.field == "training_file"
    assert len(fake.sent("PUT", JOB_PUT)) == 1


def test_managed_compute_sends_compute_and_lora(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    fake.location = "westeurope"  # no serverless region check on managed compute
    compute = AzureCompute(instance_types=("Standard_NC24ads_A100_v4",), job_tier="Standard")
    job_id = submit(backend, tmp_path, compute=compute, method=LoRA(r=8, alpha=16, dropout=0.1))
    props = fake.sent("PUT", JOB_PUT)[0].body["properties"]
    assert props["resources"]["instanceTypes"] == ["Standard_NC24ads_A100_v4"]
    assert props["queueSettings"]["jobTier"] == "Standard"
    assert props["fineTuningDetails"]["hyperParameters"] == {
        "num_train_epochs": "1",
        "learning_rate": "0.0002",
        "per_device_train_batch_size": "4",  # the global batch of 4 on the one GPU of an NC24ads_A100_v4
        "gradient_accumulation_steps": "1",
        "lr_scheduler_type": "linear",
        "weight_decay": "0",
        "seed": "0",
        "max_grad_norm": "1",
        "apply_lora": "true",
        "lora_r": "8",
        "lora_alpha": "16",
        "lora_dropout": "0.1",
    }  # no max_seq_length: the pipeline pads to it rather than truncating
    notes = [e.message for e in backend.list_events(job_id) if ":note:" in e.id]
    assert notes[0] == (
        "batch_size 4 is the global batch: per_device_train_batch_size=4 on 1 GPU(s) "
        "of one Standard_NC24ads_A100_v4 node"
    )

    # a cluster's VM size is read from the workspace: 4 GPUs, so a global batch of 8 is 2 per device
    hp = Hyperparameters(batch_size=8, max_steps=50, warmup_ratio=0.1, lr_scheduler="constant")
    submit(backend, tmp_path, key="key-2", compute=AzureCompute(compute="gpu-cluster"), hyperparameters=hp)
    props = fake.sent("PUT", JOB_PUT)[1].body["properties"]
    assert props["computeId"].endswith("gpu-cluster")
    sent = props["fineTuningDetails"]["hyperParameters"]
    assert (sent["per_device_train_batch_size"], sent["max_steps"], sent["warmup_steps"]) == ("2", "50", "5")
    assert sent["lr_scheduler_type"] == "constant_with_warmup"  # phitune's constant schedule warms up first

    # the notebook's pair of instance types: the allowed one trains (8 GPUs), the other runs the pipeline's CPU steps
    pair = AzureCompute(instance_types=("Standard_ND96amsr_A100_v4", "Standard_E4s_v3"))
    submit(backend, tmp_path, key="key-3", compute=pair, hyperparameters=Hyperparameters(batch_size=16))
    assert (
        fake.sent("PUT", JOB_PUT)[2].body["properties"]["fineTuningDetails"]["hyperParameters"][
            "per_device_train_batch_size"
        ]
        == "2"
    )


def test_managed_compute_refuses_what_it_cannot_map(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    cluster = AzureCompute(compute="gpu-cluster")  # 4 GPUs
    with pytest.raises(SpecError) as err:
        submit(backend, tmp_path, compute=cluster, hyperparameters=Hyperparameters(batch_size=6))
    assert err.value.field == "hyperparameters.batch_size" and "multiple of 4" in str(err.value)
    with pytest.raises(UnsupportedOptionError) as err:  # not on the registry's finetune_compute_allow_list
        submit(backend, tmp_path, key="k2", compute=AzureCompute(instance_types=("Standard_NC6s_v3",)))
    assert err.value.field == "compute" and "Standard_NC96ads_A100_v4" in str(err.value)
    with pytest.raises(SpecError) as err:  # the registry's learning_rate_max for this model is 2e-4
        submit(backend, tmp_path, key="k3", compute=cluster, hyperparameters=Hyperparameters(learning_rate=1e-3))
    assert err.value.field == "hyperparameters.learning_rate"
    assert fake.sent("PUT", JOB_PUT) == []


def test_same_idempotency_key_starts_one_job(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    # the first PUT lands but its answer is lost: the retry finds the job instead of starting a second one
    fake.fail("PUT", JOB_PUT, status=0, after_processing=True)
    first = submit(backend, tmp_path, key="same")
    second = submit(backend, tmp_path, key="same")
    assert first == second
    assert len(fake.sent("PUT", JOB_PUT)) == 1 and len(fake.jobs) == 1
    assert submit(backend, tmp_path, key="other") != first


def test_throttling_is_retried_after_retry_after(
    backend: AzureBackend, fake: FakeAzure, sleeps: list[float], tmp_path: Path
) -> None:
    job_id = submit(backend, tmp_path)
    fake.fail("GET", rf"/jobs/{job_id}$", status=429, headers={"Retry-After": "0.01"})
    fake.fail("GET", rf"/jobs/{job_id}$", status=503, headers={"x-ms-retry-after-ms": "20"})
    fake.fail("GET", rf"/jobs/{job_id}$", status=0)  # connection reset: exponential backoff
    assert backend.get_job(job_id).id == job_id
    assert sleeps[:2] == [0.01, 0.02] and len(sleeps) == 3 and 0 < sleeps[2] <= 0.004

    fake.fail("GET", rf"/jobs/{job_id}$", status=429, headers={"Retry-After": "0.01"}, times=5)
    with pytest.raises(RateLimitError) as err:
        backend.get_job(job_id)
    assert err.value.status_code == 429 and err.value.request_id == "req-0001"
    assert len(sleeps) == 3 + 4  # five attempts, then the 429 surfaces

    fake.fail("GET", rf"/jobs/{job_id}$", status=400, message="bad request")
    with pytest.raises(BadRequestError):
        backend.get_job(job_id)
    assert len(sleeps) == 7  # a 400 is not retried


def test_retry_after_forms() -> None:
    assert retry_after({"Retry-After": "2.5"}) == 2.5
    assert retry_after({"retry-after-ms": "150"}) == 0.15
    assert retry_after({"x-ms-retry-after-ms": "40", "Retry-After": "9"}) == 0.04
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert retry_after({"Retry-After": date}, now=1_000_000.0) == 30.0
    assert retry_after({"Retry-After": "soon"}) is None and retry_after({}) is None
    # the same policy serves an httpx-based backend
    waits: list[float] = []
    policy = RetryPolicy(sleep=waits.append, transient=(httpx.TransportError,))
    answers = iter([httpx.Response(503, headers={"Retry-After": "0.01"}), httpx.Response(200)])

    def call() -> int:
        response = next(answers)
        response.request = httpx.Request("GET", "https://example.invalid")
        return response.raise_for_status().status_code

    assert policy.call(call) == 200 and waits == [0.01]
    # a hint beyond max_retry_after is not waited out
    slow = RetryPolicy(sleep=waits.append, max_retry_after=1.0)
    too_long = httpx.Response(429, headers={"Retry-After": "60"}, request=httpx.Request("GET", "https://x.invalid"))
    with pytest.raises(httpx.HTTPStatusError):
        slow.call(too_long.raise_for_status)
    assert waits == [0.01]


def test_states_map_and_the_output_model_is_reported(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    job_id = submit(backend, tmp_path)
    expected = {
        "NotStarted": "queued",
        "Queued": "queued",
        "Preparing": "queued",
        "Starting": "queued",
        "Provisioning": "queued",
        "Running": "running",
        "NotResponding": "running",  # Azure lost contact; the job can recover
        "Finalizing": "running",
        "Paused": "paused",
        "Completed": "succeeded",
    }
    for azure_status, status in expected.items():
        fake.set_job_status(job_id, azure_status)
        job = backend.get_job(job_id)
        assert (job.status, job.done) == (status, status == "succeeded"), azure_status
        assert job.fine_tuned_model is None or status == "succeeded"
    output = fake.jobs[job_id]["properties"]["outputs"]["registered_model"]["assetName"]
    assert job.fine_tuned_model == output
    assert job.started_at is not None and job.finished_at is not None and job.finished_at >= job.started_at
    assert job.trained_tokens is None  # Azure does not report it
    assert backend.list_checkpoints(job_id) == []

    events = backend.list_events(job_id)
    expected_ids = ["created", "note:0", "note:1", "started", "metrics-none", "ended"]
    assert [e.id.split(":", 1)[1] for e in events] == expected_ids
    assert all(e.type == "message" for e in events)  # no invented metrics
    assert "no training metrics" in events[4].message
    assert [e.id for e in backend.list_events(job_id, after=events[3].id)] == [events[4].id, events[5].id]


def test_training_metrics_are_read_back_from_the_workspace_mlflow(
    backend: AzureBackend, fake: FakeAzure, tmp_path: Path
) -> None:
    job_id = submit(backend, tmp_path)
    assert [e for e in backend.list_events(job_id) if e.type == "metrics"] == []  # nothing logged yet: no event
    fake.set_job_status(job_id, "Running")
    # Hugging Face Trainer's names, logged by the pipeline's finetune step (a child run) over more than one page
    for step, loss in ((10, 2.5), (20, 2.25), (30, 2.0)):
        fake.log_metrics(job_id, step, {"loss": loss, "learning_rate": 1e-4 / step}, step_run="finetune")
    fake.log_metrics(job_id, 20, {"eval_loss": 2.4}, step_run="finetune")
    fake.log_metrics(job_id, 30, {"train_loss": 2.3}, step_run="finetune")
    fake.log_metrics(job_id, 30, {"epoch": 1.0})  # on the job's own run
    metrics = [e for e in backend.list_events(job_id) if e.type == "metrics"]
    assert [e.data for e in metrics] == [
        {"step": 10, "learning_rate": 1e-5, "train_loss": 2.5},
        {"step": 20, "learning_rate": 5e-6, "train_loss": 2.25, "valid_loss": 2.4},
        {"step": 30, "epoch": 1.0, "learning_rate": 1e-4 / 30, "train_loss": 2.0, "mean_train_loss": 2.3},
    ]
    assert metrics[0].message.startswith("metrics: step=10") and metrics[0].id == f"{job_id}:metrics:10"
    # every MLflow call carried the workspace's AAD token and went through the given transport
    sent = fake.sent("GET", r"/api/2\.0/mlflow/metrics/get-history") + fake.sent("POST", r"/mlflow/runs/search")
    assert sent and all(r.headers["Authorization"] == f"Bearer {AAD_TOKEN}" for r in sent)
    fake.set_job_status(job_id, "Completed")
    assert not [e for e in backend.list_events(job_id) if e.id.endswith(":metrics-none")]

    # the same curves reach phitune's loss plot
    from phitune.plot import loss_curves

    curves = loss_curves(job_id, backend.list_events(job_id))
    assert (curves.train, curves.valid) == ([(10, 2.5), (20, 2.25), (30, 2.0)], [(20, 2.4)])


def test_unreadable_metrics_are_a_warning_not_a_failed_call(
    backend: AzureBackend, fake: FakeAzure, tmp_path: Path
) -> None:
    job_id = submit(backend, tmp_path)
    fake.log_metrics(job_id, 1, {"loss": 3.0})
    fake.fail("POST", r"/mlflow/runs/search", status=403, times=10, message="caller lacks read on runs")
    (warning,) = [e for e in backend.list_events(job_id) if e.id.endswith(":metrics-unreadable")]
    assert warning.level == "warn" and "403" in warning.message
    assert AAD_TOKEN not in warning.message


def test_failed_job_surfaces_azure_error_redacted(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    job_id = submit(backend, tmp_path)
    fake.set_job_status(job_id, "Running")
    message = "cannot read https://acct.blob.core.windows.net/d/train.jsonl?sv=2022-11-02&sig=S3CRETsasSIG: bad row 7"
    fake.set_job_status(
        job_id,
        "Failed",
        error={"code": "UserError", "message": message, "target": "training_data"},
        warnings=[{"source": "preprocess", "message": "row 3 is long"}],
    )
    job = backend.get_job(job_id)
    assert job.status == "failed" and job.error is not None
    assert (job.error.code, job.error.param) == ("UserError", "training_data")
    assert "bad row 7" in job.error.message and "S3CRETsasSIG" not in job.error.message
    events = [e for e in backend.list_events(job_id) if ":metrics" not in e.id]
    assert [e.level for e in events][-3:] == ["warn", "error", "error"]
    assert "bad row 7" in events[-1].message and "S3CRETsasSIG" not in events[-1].message


def test_not_responding_is_reported_as_such(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    job_id = submit(backend, tmp_path)
    fake.set_job_status(job_id, "Running")
    fake.set_job_status(job_id, "NotResponding")
    job = backend.get_job(job_id)
    assert (job.status, job.azure_status, job.error) == ("running", "NotResponding", None)
    (warning,) = [e for e in backend.list_events(job_id) if e.id.endswith(":not-responding")]
    assert warning.level == "warn" and "can recover" in warning.message
    fake.set_job_status(job_id, "Running")
    assert [e for e in backend.list_events(job_id) if e.id.endswith(":not-responding")] == []


def test_wait_returns_on_paused(fake: FakeAzure, sleeps: list[float], uploads: Uploads, tmp_path: Path) -> None:
    from conftest import write_chat

    client = phitune.Client.azure(ml_client=ml_client(fake), uploader=uploads, retry=RetryPolicy(sleep=sleeps.append))
    job = client.finetune.create(model=MODEL, training_file=write_chat(tmp_path / "chat.jsonl"))
    fake.set_job_status(job.id, "Paused")
    paused = client.finetune.wait(job.id, poll_interval=0, timeout=30, progress=False)
    assert (paused.status, paused.done) == ("paused", False)


def test_cancel(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    job_id = submit(backend, tmp_path)
    fake.set_job_status(job_id, "Running")
    job = backend.cancel_job(job_id)
    (post,) = fake.sent("POST", rf"/jobs/{job_id}/cancel$")
    assert post.query["api-version"] == "2023-04-01-preview"
    assert job.status == "running"  # CancelRequested: still running until Azure says Canceled
    fake.set_job_status(job_id, "Canceled")
    assert backend.get_job(job_id).status == "cancelled"
    with pytest.raises(ConflictError):
        backend.cancel_job(job_id)
    with pytest.raises(NotFoundError):
        backend.cancel_job("phitune-nope")


def test_list_jobs_pages(backend: AzureBackend, tmp_path: Path) -> None:
    ids = [submit(backend, tmp_path, key=f"k{i}") for i in range(3)]
    newest_first = list(reversed(ids))
    assert [j.id for j in backend.list_jobs()] == newest_first
    page = backend.list_jobs(limit=2)
    assert [j.id for j in page] == newest_first[:2]
    assert [j.id for j in backend.list_jobs(limit=2, after=page[-1].id)] == newest_first[2:]


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"method": QLoRA()}, "method"),
        ({"method": DoRA()}, "method"),
        ({"method": Full()}, "method"),
        ({"method": PEFT(config={"peft_type": "IA3"})}, "method"),
        ({"method": LoRA(target_modules=("qkv_proj",))}, "method.target_modules"),
        ({"method": LoRA(r=8)}, "method.r"),
        ({"method": LoRA(dropout=0.2)}, "method.dropout"),
        ({"distributed": {"strategy": "ddp", "nproc": 2}}, "distributed"),
        ({"integrations": [phitune.MLflow(experiment="x")]}, "integrations"),
        ({"hyperparameters": Hyperparameters(gradient_checkpointing=True)}, "hyperparameters.gradient_checkpointing"),
        ({"hyperparameters": Hyperparameters(precision="bf16")}, "hyperparameters.precision"),
        ({"hyperparameters": Hyperparameters(max_seq_length=2048)}, "hyperparameters.max_seq_length"),
        ({"hyperparameters": Hyperparameters(checkpoint_every=10)}, "hyperparameters.checkpoint_every"),
        # serverless takes only epochs, learning_rate and batch_size
        ({"hyperparameters": Hyperparameters(max_steps=30)}, "hyperparameters.max_steps"),
        ({"hyperparameters": Hyperparameters(warmup_ratio=0.1)}, "hyperparameters.warmup_ratio"),
        ({"hyperparameters": Hyperparameters(lr_scheduler="cosine")}, "hyperparameters.lr_scheduler"),
        (
            {"hyperparameters": Hyperparameters(gradient_accumulation_steps=2)},
            "hyperparameters.gradient_accumulation_steps",
        ),
        ({"hyperparameters": Hyperparameters(weight_decay=0.1)}, "hyperparameters.weight_decay"),
        ({"hyperparameters": Hyperparameters(seed=3)}, "hyperparameters.seed"),
        ({"hyperparameters": Hyperparameters(max_grad_norm=None)}, "hyperparameters.max_grad_norm"),
        ({"model": RETIRED}, "model"),  # serverless fine-tuning of Phi-3 retired on 2025-08-30
        ({"model": "Phi-3.5-mini-instruct"}, "model"),
        ({"model": "Phi-3-small-8k-instruct"}, "model"),  # never offered serverless
        ({"model": "tiny-phi3"}, "model"),
        ({"model": "gpt2"}, "model"),
        ({"model": "azureml://registries/azureml-meta/models/Llama-2-7b"}, "model"),
    ],
)
def test_unsupported_options_are_refused_before_any_request(
    backend: AzureBackend, fake: FakeAzure, fields: dict[str, Any], field: str
) -> None:
    spec = JobSpec.model_validate({"model": MODEL, "training_file": "azureml:phitune-train-0:1", **fields})
    with pytest.raises(UnsupportedOptionError) as err:
        backend.create_job(spec, idempotency_key="k")
    assert err.value.field == field and err.value.backend == "azure"
    assert fake.requests == []


def test_managed_compute_allows_what_serverless_refuses(backend: AzureBackend, fake: FakeAzure) -> None:
    compute = AzureCompute(compute="gpu-cluster")
    for fields in (
        {"method": LoRA(r=8)},
        {"hyperparameters": Hyperparameters(max_steps=30, warmup_ratio=0.1, lr_scheduler="cosine", seed=3)},
    ):
        backend.check_spec(JobSpec.model_validate({"model": MODEL, "training_file": "f", "compute": compute, **fields}))
    for fields, field in (
        ({"method": QLoRA()}, "method"),
        ({"hyperparameters": Hyperparameters(max_seq_length=2048)}, "hyperparameters.max_seq_length"),
    ):
        with pytest.raises(UnsupportedOptionError) as err:
            backend.check_spec(
                JobSpec.model_validate({"model": MODEL, "training_file": "f", "compute": compute, **fields})
            )
        assert err.value.field == field
    assert "pads every example" in str(err.value)
    assert fake.requests == []


# ------------------------------------------------------------------------------------------------ lifecycle
def test_a_retired_offer_is_refused_before_any_request_with_what_is_still_open(
    backend: AzureBackend, fake: FakeAzure
) -> None:
    spec = JobSpec(model=RETIRED, training_file="azureml:phitune-train-0:1")
    with pytest.raises(OfferRetiredError) as err:
        backend.create_job(spec, idempotency_key="k")
    refusal = err.value
    assert (refusal.field, str(refusal.retired_on), refusal.replacement) == (
        "model",
        "2025-08-30",
        "Phi-4-mini-instruct",
    )
    assert refusal.alternatives == [
        "on managed compute (compute=phitune.AzureCompute(...), deprecated)",
        "locally (phitune.Client())",
    ]
    assert "retired serverless fine-tuning (MaaS) of Phi-3-mini-4k-instruct on 2025-08-30" in str(refusal)
    assert "use Phi-4-mini-instruct instead" in str(refusal)
    assert fake.requests == []


def test_the_registry_tags_override_the_packaged_lifecycle(
    backend: AzureBackend, fake: FakeAzure, tmp_path: Path
) -> None:
    for tags in fake.registry_models[MODEL].values():
        tags["FinetuneRetirementDate"] = "2026-01-01T00:00:00.000000Z"
    with pytest.raises(OfferRetiredError) as err:
        submit(backend, tmp_path)
    assert str(err.value.retired_on) == "2026-01-01"
    assert fake.sent("GET", r"/registries/azureml/models/Phi-4-mini-instruct/") and fake.sent("PUT", JOB_PUT) == []


def test_a_deprecated_offer_warns_and_says_so_in_the_job_events(
    backend: AzureBackend, fake: FakeAzure, tmp_path: Path
) -> None:
    compute = AzureCompute(instance_types=("Standard_NC24ads_A100_v4",))
    hp = Hyperparameters(learning_rate=2e-5)  # within the registry's range for Phi-3 (5e-7 .. 5e-5)
    with pytest.warns(OfferLifecycleWarning, match="managed-compute fine-tuning .* of Phi-3-mini-4k-instruct is dep"):
        job_id = submit(backend, tmp_path, model=RETIRED, compute=compute, hyperparameters=hp)
    assert fake.sent("PUT", JOB_PUT)
    (warning,) = [e for e in backend.list_events(job_id) if e.level == "warn"]
    assert warning.message == (
        "managed-compute fine-tuning (MaaP) of Phi-3-mini-4k-instruct is deprecated; Azure suggests Phi-4-mini-instruct"
    )


def test_the_catalog_knows_each_offer_and_its_stage() -> None:
    from datetime import date

    from phitune import catalog

    day = date(2026, 12, 5)
    stages = {(m.name, o.kind): o.lifecycle.stage(day) for m in catalog.MODELS for o in m.offers}
    assert stages[("Phi-4-mini-instruct", "serverless_finetune")] == "ga"
    assert stages[("Phi-4", "serverless_finetune")] == "preview"
    for model in (
        "Phi-3-mini-4k-instruct",
        "Phi-3-medium-128k-instruct",
        "Phi-3.5-mini-instruct",
        "Phi-3.5-MoE-instruct",
    ):
        assert stages[(model, "serverless_finetune")] == "retired"
        assert stages[(model, "serverless_deploy")] == "retired"
        assert stages[(model, "managed_finetune")] == "deprecated"
    assert ("Phi-3-small-8k-instruct", "serverless_finetune") not in stages
    assert catalog.find("Phi-3-mini-4k-instruct").offer("serverless_finetune").lifecycle.stage(date(2025, 6, 1)) == "ga"  # type: ignore[union-attr]
    assert catalog.offering("serverless_finetune", day) == ["Phi-4-mini-instruct", "Phi-4"]
    assert all(source in catalog.SOURCES for m in catalog.MODELS for o in m.offers for source in o.sources)


def test_region_is_checked_before_the_job_is_sent(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    fake.location = "westeurope"
    with pytest.raises(UnsupportedOptionError) as err:
        submit(backend, tmp_path)
    assert "westeurope" in str(err.value) and "eastus2" in str(err.value) and "westus3" in str(err.value)
    assert fake.sent("PUT", JOB_PUT) == []


def test_region_falls_back_to_the_catalog(
    fake: FakeAzure, sleeps: list[float], uploads: Uploads, tmp_path: Path
) -> None:
    fake.registry_models[MODEL] = {"5": {}}  # no maas-finetuning-deploy-regions tag
    fake.location = "swedencentral"
    policy = RetryPolicy(sleep=sleeps.append)
    azure = AzureBackend(ml_client=ml_client(fake), uploader=uploads, retry=policy)
    with pytest.raises(UnsupportedOptionError) as err:
        submit(azure, tmp_path)
    assert "swedencentral" in str(err.value) and "northcentralus" in str(err.value)
    fake.location = "eastus2"  # a workspace in a supported region (its location is read once per backend)
    submit(AzureBackend(ml_client=ml_client(fake), uploader=uploads, retry=policy), tmp_path)
    uri = fake.sent("PUT", JOB_PUT)[0].body["properties"]["fineTuningDetails"]["model"]["uri"]
    assert uri.endswith("/Phi-4-mini-instruct/versions/5")


def test_serverless_needs_a_project(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    fake.kind = "Default"
    with pytest.raises(ConflictError, match="hub-based project"):
        submit(backend, tmp_path)
    assert fake.sent("PUT", JOB_PUT) == []


# ------------------------------------------------------------------------------------- models, deployments, chat
def finished_model(backend: AzureBackend, fake: FakeAzure, folder: Path, **fields: Any) -> str:
    job_id = submit(backend, folder, **fields)
    fake.set_job_status(job_id, "Running")
    fake.set_job_status(job_id, "Completed")
    model = backend.get_job(job_id).fine_tuned_model
    assert model is not None
    return model


def test_deploy_and_chat(backend: AzureBackend, fake: FakeAzure, chat_server: ChatServer, tmp_path: Path) -> None:
    fake.scoring_uri = chat_server.url
    fake.endpoint_polls = 2
    model = finished_model(backend, fake, tmp_path)
    info = backend.get_model(model)
    assert (info.id, info.owned_by, info.job_id) == (model, "azure", fake.jobs[next(iter(fake.jobs))]["name"])
    assert info.base_model == "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/4"
    assert info.deploy_id == f"azureml://locations/eastus2/workspaces/{WORKSPACE_GUID}/models/{model}/versions/1"
    assert [m.id for m in backend.list_models()] == [model]

    deployment = backend.create_deployment(model, "phi3-support")
    (put,) = fake.sent("PUT", r"/serverlessEndpoints/phi3-support$")
    assert put.query["api-version"] == "2024-01-01-preview"
    assert put.body == {
        "properties": {
            "modelSettings": {
                "modelId": f"azureml://locations/eastus2/workspaces/{WORKSPACE_GUID}/models/{model}/versions/1"
            }
        },
        "sku": {"name": "Consumption"},
        "location": "eastus2",
    }
    assert len(fake.sent("GET", r"/serverlessEndpoints/phi3-support$")) == 3  # polled until Succeeded
    assert (deployment.name, deployment.model, deployment.status) == ("phi3-support", model, "succeeded")
    assert (deployment.endpoint, deployment.backend) == (chat_server.url, "azure")
    assert [d.name for d in backend.list_deployments()] == ["phi3-support"]

    chat_server.throttle = 1
    reply = backend.chat(
        "phi3-support", [{"role": "user", "content": "hello"}], max_tokens=16, temperature=0.0, top_p=1.0, seed=7
    )
    assert reply.text == "echo: hello" and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens == 12
    sent = chat_server.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {ENDPOINT_KEY}"
    assert {k: sent["body"][k] for k in ("max_tokens", "temperature", "top_p", "seed")} == {
        "max_tokens": 16,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 7,
    }
    assert len(chat_server.requests) == 2  # the 429 was retried
    assert len(fake.sent("POST", r"/serverlessEndpoints/phi3-support/listKeys$")) == 1

    client = backend.openai_client("phi3-support")
    assert str(client.base_url).rstrip("/") == f"{chat_server.url}/v1"

    with pytest.raises(ConflictError, match="one per model"):  # Azure refuses a second serverless deployment
        backend.create_deployment(model, "phi3-second")
    assert len(fake.sent("PUT", r"/serverlessEndpoints/")) == 1

    backend.delete_deployment("phi3-support")
    assert fake.sent("DELETE", r"/serverlessEndpoints/phi3-support$") and fake.endpoints == {}
    with pytest.raises(NotFoundError):
        backend.get_deployment("phi3-support")


def test_managed_compute_create_wait_deploy_chat(
    backend: AzureBackend, fake: FakeAzure, chat_server: ChatServer, tmp_path: Path
) -> None:
    fake.scoring_uri = chat_server.url
    fake.location = "westeurope"  # managed compute needs no hub project nor a serverless region
    fake.kind = "Default"
    compute = AzureCompute(instance_types=("Standard_NC24ads_A100_v4",))
    model = finished_model(backend, fake, tmp_path, compute=compute)
    with pytest.raises(SpecError) as err:
        backend.create_deployment(model, "phi4-maap")
    assert err.value.field == "options.instance_type" and "managed online endpoint" in str(err.value)

    deployment = backend.create_deployment(model, "phi4-maap", instance_type="Standard_NC24ads_A100_v4")
    assert fake.sent("PUT", r"/serverlessEndpoints/") == []
    puts = fake.sent("PUT", r"/onlineEndpoints/phi4-maap")
    assert [p.path.split("/onlineEndpoints/")[1] for p in puts] == [
        "phi4-maap",
        "phi4-maap/deployments/default",
        "phi4-maap",
    ]
    assert puts[0].body["properties"]["authMode"] == "Key"
    assert puts[1].body["sku"] == {"name": "Default", "capacity": 1}
    assert puts[1].body["properties"]["instanceType"] == "Standard_NC24ads_A100_v4"
    assert puts[1].body["properties"]["model"].endswith(f"/models/{model}/versions/1")
    assert puts[2].body["properties"]["traffic"] == {"default": 100}
    assert (deployment.name, deployment.model, deployment.status) == ("phi4-maap", model, "succeeded")
    assert deployment.engine == "azure-managed-online" and deployment.endpoint == chat_server.url
    assert [d.name for d in backend.list_deployments()] == ["phi4-maap"]

    reply = backend.chat(
        "phi4-maap", [{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, top_p=1, seed=None
    )
    assert reply.text == "echo: hi"
    assert chat_server.requests[-1]["path"] == "/v1/chat/completions"
    assert chat_server.requests[-1]["headers"]["authorization"] == f"Bearer {ENDPOINT_KEY}"
    assert fake.sent("POST", r"/onlineEndpoints/phi4-maap/listKeys$")

    backend.delete_deployment("phi4-maap")
    assert fake.sent("DELETE", r"/onlineEndpoints/phi4-maap$") and fake.online_endpoints == {}


def test_a_model_of_another_project_deploys_across_regions(
    backend: AzureBackend, fake: FakeAzure, chat_server: ChatServer, sleeps: list[float], tmp_path: Path
) -> None:
    model = finished_model(backend, fake, tmp_path)
    source_id = backend.get_model(model).deploy_id
    target_fake = FakeAzure(location="westus3", workspace_guid="0d9e8c7b-0000-4000-8000-0000000beef0")
    target_fake.scoring_uri = chat_server.url
    target = AzureBackend(ml_client=ml_client(target_fake), retry=RetryPolicy(sleep=sleeps.append), poll_interval=0)
    deployment = target.create_deployment(source_id, "phi4-westus3", base_model=MODEL)
    (put,) = target_fake.sent("PUT", r"/serverlessEndpoints/phi4-westus3$")
    assert put.body["properties"]["modelSettings"]["modelId"] == source_id  # the model stays where it was trained
    assert put.body["location"] == "westus3" and deployment.status == "succeeded"
    reply = target.chat(
        "phi4-westus3", [{"role": "user", "content": "x"}], max_tokens=4, temperature=0, top_p=1, seed=None
    )
    assert reply.text == "echo: x"

    elsewhere = FakeAzure(location="swedencentral", workspace_guid="0d9e8c7b-0000-4000-8000-0000000beef1")
    far = AzureBackend(ml_client=ml_client(elsewhere), retry=RetryPolicy(sleep=sleeps.append), poll_interval=0)
    with pytest.raises(UnsupportedOptionError) as err:
        far.create_deployment(source_id, "phi4-sweden", base_model=MODEL)
    assert "swedencentral" in str(err.value) and "westus3" in str(err.value)
    assert elsewhere.sent("PUT", r"/serverlessEndpoints/") == []
    target.close()
    far.close()


def test_deploy_checks_the_region_first(backend: AzureBackend, fake: FakeAzure, tmp_path: Path) -> None:
    model = finished_model(backend, fake, tmp_path)
    fake.registry_models[MODEL]["4"]["maas-finetuning-deploy-regions"] = "eastus,westus3"
    with pytest.raises(UnsupportedOptionError) as err:
        backend.create_deployment(model, "phi3-support")
    assert "eastus2" in str(err.value) and "westus3" in str(err.value)
    assert fake.sent("PUT", r"/serverlessEndpoints/") == []
    with pytest.raises(UnsupportedOptionError) as err:
        backend.create_deployment(model, "phi3-support", instance_type="x")
    assert err.value.field == "options.instance_type"
    with pytest.raises(NotFoundError):
        backend.create_deployment("no-such-model", "phi3-support")


def test_no_secret_in_reprs_logs_or_errors(
    backend: AzureBackend, fake: FakeAzure, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    wrong_key = ChatServer(key="another-key")
    try:
        fake.scoring_uri = wrong_key.url
        model = finished_model(backend, fake, tmp_path)
        deployment = backend.create_deployment(model, "phi3-support")
        with pytest.raises(AuthenticationError) as err:
            backend.chat(
                "phi3-support", [{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, top_p=1, seed=None
            )
        assert "bad key" in str(err.value)
    finally:
        wrong_key.close()
    fake.fail("GET", r"/serverlessEndpoints/phi3-support$", status=403, message=f"Authorization: Bearer {AAD_TOKEN}")
    with pytest.raises(phitune.errors.PermissionDeniedError) as denied:
        backend.get_deployment("phi3-support")
    shown = " ".join(
        [repr(backend), repr(deployment), deployment.model_dump_json(), str(err.value), repr(err.value)]
        + [str(denied.value)]
        + [r.getMessage() for r in caplog.records if r.name.startswith("phitune")]
    )
    assert ENDPOINT_KEY not in shown and AAD_TOKEN not in shown


# --------------------------------------------------------------------------------------------- through Client
def test_end_to_end_through_the_client(
    fake: FakeAzure, sleeps: list[float], uploads: Uploads, chat_server: ChatServer, tmp_path: Path
) -> None:
    from conftest import write_chat

    fake.scoring_uri = chat_server.url
    with phitune.Client.azure(
        ml_client=ml_client(fake), uploader=uploads, retry=RetryPolicy(sleep=sleeps.append), poll_interval=0.0
    ) as client:
        assert client.backend.name == "azure"
        job = client.finetune.create(model=MODEL, training_file=write_chat(tmp_path / "chat.jsonl"), suffix="e2e")
        assert job.status == "queued" and job.training_file.startswith("azureml:phitune-chat-")
        assert fake.sent("PUT", JOB_PUT)[0].body["properties"]["fineTuningDetails"]["taskType"] == "chatCompletion"
        fake.set_job_status(job.id, "Running")
        fake.set_job_status(job.id, "Completed")
        done = client.finetune.wait(job.id, poll_interval=0, progress=False)
        assert done.status == "succeeded" and done.fine_tuned_model is not None
        deployment = client.deployments.create(model=done.fine_tuned_model, name="e2e")
        assert deployment.chat([{"role": "user", "content": "ping"}]).text == "echo: ping"
        assert (
            deployment.openai_client()
            .chat.completions.create(model="e2e", messages=[{"role": "user", "content": "pong"}])
            .choices[0]
            .message.content
            == "echo: pong"
        )


def test_the_documented_constructor_and_the_default_upload(fake: FakeAzure, tmp_path: Path) -> None:
    from conftest import write_chat

    client = phitune.Client.azure(
        subscription_id=SUBSCRIPTION,
        resource_group=RESOURCE_GROUP,
        workspace=WORKSPACE,
        credential=FakeCredential(),
        transport=fake,
        retry=RetryPolicy(sleep=lambda _: None),
    )
    path = write_chat(tmp_path / "chat.jsonl")
    uploaded = client.files.upload(path)
    (blob,) = fake.blobs.items()
    asset = uploaded.id.split(":")[1]
    assert blob == (f"/azureml-blobstore-0000/phitune/{asset}/chat.jsonl", path.read_bytes())
    (put,) = fake.sent("PUT", r"/data/phitune-chat-[0-9a-f]{12}/versions/1$")
    assert (
        put.body["properties"]["dataUri"] == f"azureml://datastores/workspaceblobstore/paths/phitune/{asset}/chat.jsonl"
    )
    (upload,) = [r for r in fake.requests if STORAGE_ACCOUNT in r.url]
    assert upload.headers["Authorization"].startswith(f"SharedKey {STORAGE_ACCOUNT}:")  # signed with the store's key
    assert all(r.headers.get("Authorization") == f"Bearer {AAD_TOKEN}" for r in fake.requests if "management" in r.url)
    job = client.finetune.create(model=MODEL, training_file=uploaded.id)
    assert job.status == "queued"
    assert STORAGE_KEY not in repr(client.backend) and STORAGE_KEY not in uploaded.model_dump_json()


def test_client_constructors_are_typed() -> None:
    import inspect

    for factory, names in (
        (phitune.Client.azure, {"subscription_id", "resource_group", "workspace", "credential", "transport"}),
        (phitune.Client.openai, {"base_url", "api_key"}),
    ):
        parameters = inspect.signature(factory).parameters
        assert names <= set(parameters)
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())
        assert all(p.annotation is not inspect.Parameter.empty for p in parameters.values())


MAAS_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "azureml-examples-maas"


@pytest.mark.skipif(not MAAS_DATA.is_dir(), reason="the azureml-examples MaaS sample data is not on this machine")
@pytest.mark.parametrize(
    ("stem", "task"), [("chat-completion", "chatCompletion"), ("text-generation", "textCompletion")]
)
def test_official_maas_sample_data(
    fake: FakeAzure, sleeps: list[float], uploads: Uploads, stem: str, task: str
) -> None:
    client = phitune.Client.azure(ml_client=ml_client(fake), uploader=uploads, retry=RetryPolicy(sleep=sleeps.append))
    job = client.finetune.create(
        model=MODEL,
        training_file=MAAS_DATA / f"{stem}_train.jsonl",
        validation_file=MAAS_DATA / f"{stem}_validation.jsonl",
        hyperparameters={"epochs": 1, "batch_size": 1, "learning_rate": 2e-5},
    )
    details = fake.sent("PUT", JOB_PUT)[0].body["properties"]["fineTuningDetails"]
    assert details["taskType"] == task
    assert "/data/phitune-" in details["validationData"]["uri"]
    assert details["hyperParameters"]["per_device_train_batch_size"] == "1"
    assert client.files.get(job.training_file).examples == len(
        (MAAS_DATA / f"{stem}_train.jsonl").read_text().splitlines()
    )


@pytest.mark.parametrize("sample", ["azure_maas.py", "azure_managed_compute.py"])
def test_azure_samples_say_what_they_need(sample: str, tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[1] / "samples" / sample
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    done = subprocess.run(
        [sys.executable, str(path), str(tmp_path / "train.jsonl")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "KeyError" not in done.stderr
    assert "export AZURE_SUBSCRIPTION_ID=" in done.stderr and "export AZURE_WORKSPACE=" in done.stderr


def test_docs_show_the_catalog_as_it_is() -> None:
    import re
    from datetime import date

    from phitune import catalog

    page = (Path(__file__).resolve().parents[1] / "docs" / "azure.md").read_text()
    checked = re.search(r"checked on (\d{4}-\d{2}-\d{2})", page)
    assert checked is not None
    assert catalog.offers_table(date.fromisoformat(checked[1])) in page
