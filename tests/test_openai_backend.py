"""The OpenAI backend against OpenAI-shaped services simulated with ``httpx.MockTransport``, under the real ``openai``
client: JobSpec translation, refusals before anything is sent, Retry-After, idempotency, paging and errors."""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from azure.core.credentials import AccessToken

import phitune
from phitune.backends.openai import OpenAIBackend
from phitune.errors import (
    APIConnectionError,
    AuthenticationError,
    InternalServerError,
    RemoteNotFoundError,
    UnsupportedOptionError,
)

KEY = "test-key-abcdefghijklmnop"


def _job(**fields: Any) -> dict[str, Any]:
    hyperparameters = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2.0}
    return {
        "id": "ftjob-1",
        "object": "fine_tuning.job",
        "created_at": 1700000000,
        "error": None,
        "fine_tuned_model": None,
        "finished_at": None,
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "model": "gpt-4o-mini",
        "organization_id": "org-1",
        "result_files": [],
        "seed": 7,
        "status": "running",
        "trained_tokens": None,
        "training_file": "file-abc",
        "validation_file": None,
        **fields,
    }


def _error(status: int, message: str, **headers: str) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return httpx.Response(status, json=body, headers=headers)


class Service:
    """A plain OpenAI-shaped fine-tuning service. ``fail[path]`` queues answers for the next requests to a path (after
    ``/v1``); events are served
    newest first, two per page whatever the limit asked, so clients must follow the cursor."""

    def __init__(self, *, phitune: bool = False) -> None:
        self.phitune = phitune
        self.requests: list[httpx.Request] = []
        self.fail: dict[str, list[httpx.Response]] = {}
        self.events = [
            {"id": f"ftevent-{i}", "object": "fine_tuning.job.event", "created_at": i, "level": "info",
             "message": f"event {i}", "type": "metrics" if i > 1 else None,
             "data": {"step": i - 1, "train_loss": 1.0 / i} if i > 1 else None}
            for i in range(1, 6)
        ]  # fmt: skip

    def posted(self, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST" and r.url.path.endswith(path)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix("/v1").removeprefix("/openai")
        if self.fail.get(path):
            return self.fail[path].pop(0)
        query = dict(request.url.params)
        if path == "/phitune":
            return httpx.Response(200, json={"object": "phitune.server"}) if self.phitune else _error(404, "no")
        if path == "/files" and request.method == "POST":
            assert b'filename="train.jsonl"' in request.content
            return httpx.Response(200, json={"id": "file-abc", "object": "file", "bytes": 10, "created_at": 1,
                                             "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed",
                                             "expires_at": None, "status_details": None})  # fmt: skip
        if path == "/fine_tuning/jobs" and request.method == "POST":
            return httpx.Response(200, json=_job(status="validating_files"))
        if path == "/fine_tuning/jobs/ftjob-1":
            return httpx.Response(200, json=_job(error={}))
        if path == "/fine_tuning/jobs/ftjob-1/events":
            newest = self.events[::-1]
            ids = [e["id"] for e in newest]
            if query.get("order") == "asc":
                start = int(query["after"].split("-")[1]) if "after" in query else 0
                return httpx.Response(200, json={"object": "list", "data": self.events[start:], "has_more": False})
            start = ids.index(query["after"]) + 1 if "after" in query else 0
            page = newest[start : start + 2]
            return httpx.Response(200, json={"object": "list", "data": page, "has_more": start + 2 < len(newest)})
        if path == "/fine_tuning/jobs/ftjob-1/checkpoints":
            checkpoint = {"id": "ftckpt-1", "object": "fine_tuning.job.checkpoint", "created_at": 5,
                          "fine_tuned_model_checkpoint": "ft:gpt-4o-mini:org::abc:ckpt-step-4",
                          "fine_tuning_job_id": "ftjob-1", "step_number": 4,
                          "metrics": {"step": 4, "train_loss": 0.5, "valid_loss": None}}  # fmt: skip
            return httpx.Response(200, json={"object": "list", "data": [checkpoint], "has_more": False})
        models = [
            {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "openai"},
            {"id": "ft:gpt-4o-mini:org::abc", "object": "model", "created": 2, "owned_by": "org-1"},
        ]
        if path == "/models":
            return httpx.Response(200, json={"object": "list", "data": models})
        if path.startswith("/models/"):
            found = [m for m in models if m["id"] == urllib.parse.unquote(path.removeprefix("/models/"))]
            return httpx.Response(200, json=found[0]) if found else _error(404, "The model does not exist")
        if path == "/chat/completions" or path.endswith("/chat/completions"):
            return httpx.Response(200, json={
                "id": "chatcmpl-1", "object": "chat.completion", "created": 3, "model": "ft:gpt-4o-mini:org::abc",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": "Paris.", "refusal": None}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
            })  # fmt: skip
        return _error(404, f"no route {request.method} {path}")


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The openai client's retry waits, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(openai._base_client.time, "sleep", waits.append)
    return waits


def _client(service: Callable[[httpx.Request], httpx.Response], **options: Any) -> phitune.Client:
    http = httpx.Client(transport=httpx.MockTransport(service))
    return phitune.Client.openai(base_url="https://ft.example/v1", api_key=KEY, http_client=http, **options)


def test_a_job_spec_becomes_an_openai_request_retried_after_429(sleeps: list[float]) -> None:
    service = Service()
    service.fail["/fine_tuning/jobs"] = [_error(429, "slow down", **{"Retry-After": "1.5"})]
    client = _client(service)
    job = client.finetune.create(
        model="gpt-4o-mini",
        training_file="file-abc",
        validation_file="file-val",
        hyperparameters={"epochs": 3, "batch_size": 8, "learning_rate": 4e-4, "seed": 7},
        suffix="mine",
    )
    posts = service.posted("/fine_tuning/jobs")
    assert len(posts) == 2 and sleeps == [1.5]
    keys = {p.headers["idempotency-key"] for p in posts}
    assert len(keys) == 1 and keys.pop()  # one key, reused by the retry
    assert posts[0].headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(posts[-1].content) == {
        "model": "gpt-4o-mini",
        "training_file": "file-abc",
        "validation_file": "file-val",
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2.0}},
        },
        "seed": 7,
        "suffix": "mine",
    }
    assert job.backend == "openai" and job.status == "validating_files" and job.spec is None
    assert job.model_extra is not None and job.model_extra["hyperparameters"]["n_epochs"] == 3


def test_options_the_service_cannot_honour_are_refused_by_name_before_sending() -> None:
    service = Service()
    client = _client(service)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"method": "qlora"}, "method"),
        ({"method": "full"}, "method"),
        ({"method": phitune.LoRA(r=8)}, "method.r"),
        ({"method": phitune.LoRA(target_modules=("o_proj",))}, "method.target_modules"),
        ({"hyperparameters": {"max_steps": 10}}, "hyperparameters.max_steps"),
        ({"hyperparameters": {"max_seq_length": 512}}, "hyperparameters.max_seq_length"),
        ({"hyperparameters": {"checkpoint_every": 5}}, "hyperparameters.checkpoint_every"),
        ({"hyperparameters": {"lr_scheduler": "cosine"}}, "hyperparameters.lr_scheduler"),
        ({"distributed": {"strategy": "ddp", "nproc": 2}}, "distributed"),
        ({"compute": {"compute": "gpu-cluster"}}, "compute"),
        ({"task": "text_completion"}, "task"),
        ({"model": "Phi-3-small-128k-instruct"}, "model"),
    ]
    for options, field in cases:
        with pytest.raises(UnsupportedOptionError) as info:
            client.finetune.create(**{"model": "gpt-4o-mini", "training_file": "file-abc", **options})
        assert info.value.field == field and info.value.backend == "openai", options
    assert service.posted("/fine_tuning/jobs") == []


def test_files_events_checkpoints_models_and_chat(chat_file: Path) -> None:
    service = Service()
    client = _client(service)
    uploaded = client.files.upload(chat_file)  # validated here first, then sent
    assert uploaded.id == "file-abc" and uploaded.filename == "train.jsonl" and uploaded.status == "processed"

    job = client.finetune.get("ftjob-1")
    assert job.status == "running" and job.error is None  # an empty error object is no error

    events = client.finetune.events("ftjob-1")
    assert [e.id for e in events] == [f"ftevent-{i}" for i in range(1, 6)]  # oldest first, across pages
    assert events[0].type == "message" and events[1].data == {"step": 1, "train_loss": 0.5}
    assert [e.id for e in client.finetune.events("ftjob-1", after="ftevent-2")] == [
        "ftevent-3",
        "ftevent-4",
        "ftevent-5",
    ]
    assert [e.id for e in client.finetune.events("ftjob-1", after="ftevent-5")] == []
    assert [e.id for e in client.finetune.events("ftjob-1", after="ftevent-1", limit=2)] == ["ftevent-2", "ftevent-3"]

    (checkpoint,) = client.finetune.checkpoints("ftjob-1")
    assert checkpoint.step_number == 4 and checkpoint.metrics == {"step": 4.0, "train_loss": 0.5}

    models = {m.id: m for m in client.models.list()}
    assert models["gpt-4o-mini"].kind == "base" and models["ft:gpt-4o-mini:org::abc"].kind == "full"
    assert client.models.get("ft:gpt-4o-mini:org::abc").owned_by == "org-1"

    deployment = client.deployments.create(model="ft:gpt-4o-mini:org::abc", name="ft:gpt-4o-mini:org::abc")
    assert deployment.endpoint == "https://ft.example/v1/"
    assert [d.name for d in client.deployments.list()] == ["ft:gpt-4o-mini:org::abc"]
    with pytest.raises(UnsupportedOptionError) as info:
        client.deployments.create(model="ft:gpt-4o-mini:org::abc", name="my-phi")
    assert info.value.field == "name"
    with pytest.raises(UnsupportedOptionError):
        client.deployments.delete("ft:gpt-4o-mini:org::abc")

    completion = deployment.chat([{"role": "user", "content": "Capital of France?"}], max_tokens=5)
    assert completion.text == "Paris." and completion.usage is not None and completion.usage.total_tokens == 11
    sent = json.loads(service.posted("/chat/completions")[-1].content)
    assert sent == {
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "model": "ft:gpt-4o-mini:org::abc",
        "max_tokens": 5,
        "temperature": 0.0,
        "top_p": 1.0,
    }


def test_service_errors_become_phitune_errors(sleeps: list[float]) -> None:
    service = Service()
    client = _client(service, max_retries=2)
    with pytest.raises(RemoteNotFoundError) as missing:
        client.models.get("gpt-9")
    assert missing.value.status_code == 404 and "The model does not exist" in missing.value.message

    service.fail["/fine_tuning/jobs"] = [_error(401, f"Incorrect API key provided: {KEY}")]
    with pytest.raises(AuthenticationError) as denied:
        client.finetune.list()
    assert KEY not in str(denied.value)

    service.fail["/fine_tuning/jobs/ftjob-1"] = [_error(500, "oops")] * 3
    with pytest.raises(InternalServerError):
        client.finetune.get("ftjob-1")
    assert len(sleeps) == 2  # two retries with backoff, then the error

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(APIConnectionError):
        _client(unreachable, max_retries=0).finetune.get("ftjob-1")


def test_a_phitune_server_gets_the_whole_spec() -> None:
    service = Service(phitune=True)
    client = _client(service)
    client.finetune.create(
        model="tiny-phi3",
        training_file="file-abc",
        method=phitune.DoRA(r=4),
        hyperparameters={"max_steps": 10, "learning_rate": 1e-3},
    )
    body = json.loads(service.posted("/fine_tuning/jobs")[-1].content)
    assert body["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": "auto", "batch_size": 4}},
    }
    options = body["phitune"]
    assert options["method"]["type"] == "dora" and options["method"]["r"] == 4
    assert options["hyperparameters"]["max_steps"] == 10 and options["hyperparameters"]["learning_rate"] == 1e-3
    assert options["distributed"]["strategy"] == "none"

    assert [e.id for e in client.finetune.events("ftjob-1", after="ftevent-3")] == ["ftevent-4", "ftevent-5"]
    assert dict(service.requests[-1].url.params) == {"after": "ftevent-3", "limit": "1000", "order": "asc"}
    assert sum(r.url.path.endswith("/phitune") for r in service.requests) == 1  # asked once


class _Credential:
    def get_token(self, *scopes: str, **options: Any) -> AccessToken:
        assert scopes == ("https://cognitiveservices.azure.com/.default",)
        return AccessToken("entra-token", int(time.time()) + 3600)


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"api_key": KEY}, ("api-key", KEY)),
        ({"azure_ad_token_provider": lambda: "provided-token"}, ("authorization", "Bearer provided-token")),
        ({"credential": _Credential()}, ("authorization", "Bearer entra-token")),
    ],
)
def test_azure_openai(auth: dict[str, Any], expected: tuple[str, str]) -> None:
    service = Service()
    backend = OpenAIBackend(
        azure_endpoint="https://res.openai.azure.com",
        api_version="2024-10-21",
        http_client=httpx.Client(transport=httpx.MockTransport(service)),
        **auth,
    )
    client = phitune.Client(backend=backend)
    client.finetune.create(model="gpt-4o-mini", training_file="file-abc")
    (post,) = service.posted("/fine_tuning/jobs")
    assert post.url.path == "/openai/fine_tuning/jobs" and post.url.params["api-version"] == "2024-10-21"
    assert post.headers[expected[0]] == expected[1]
    assert not any(r.url.path.endswith("/phitune") for r in service.requests)  # Azure is never a phitune server
    client.deployments.get("ft:gpt-4o-mini:org::abc").chat([{"role": "user", "content": "hi"}])
    assert service.requests[-1].url.path == "/openai/deployments/ft:gpt-4o-mini:org::abc/chat/completions"
