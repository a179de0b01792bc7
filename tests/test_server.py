"""``phitune serve`` end to end: the real server (uvicorn on a free loopback port, a real worker and trainer) driven by
the official ``openai`` client, then by ``phitune.Client.openai``. One trained job is shared by the module's tests."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import psutil
import pytest
from fastapi import FastAPI

import phitune
from conftest import running, write_chat, write_chat_with_long_prompts
from phitune.errors import DatasetError, NotFoundError, RemoteNotFoundError, SpecError
from phitune.server import StripQueryStrings, check_bind, cli, is_loopback, serve
from phitune.server.app import create_app

KEY = "sk-phitune-test-0123456789abcdef"
MAX_UPLOAD = 64 * 1024
FAST = {"n_epochs": 50, "batch_size": 4, "learning_rate_multiplier": 15}  # 15 x 2e-4 = 3e-3
T = TypeVar("T")


def _wait_for(
    predicate: Callable[[], T | None], timeout: float = 1800.0, interval: float = 0.1, state: Callable[[], object] = str
) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout} s; state: {state()}")


@pytest.fixture(scope="module")
def app(server_home: Path) -> FastAPI:
    return create_app(server_home, api_key=KEY, max_upload_bytes=MAX_UPLOAD)


@pytest.fixture(scope="module")
def base_url(app: FastAPI) -> Iterator[str]:
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def trained(oai: openai.OpenAI, dataset: Path) -> Any:
    """One LoRA job on tiny-phi3: 4 steps, a checkpoint at step 2."""
    with open(dataset, "rb") as fh:
        uploaded = oai.files.create(file=fh, purpose="fine-tune")
    job = oai.fine_tuning.jobs.create(
        model="tiny-phi3",
        training_file=uploaded.id,
        method={"type": "supervised", "supervised": {"hyperparameters": FAST}},  # type: ignore[typeddict-item]
        seed=0,
        suffix="srv",
        extra_body={"phitune": {"hyperparameters": {"max_steps": 4, "checkpoint_every": 2, "max_seq_length": 128}}},
    )
    assert job.status == "queued"
    done = ("succeeded", "failed")
    return _wait_for(
        lambda: (j := oai.fine_tuning.jobs.retrieve(job.id)).status in done and j,
        timeout=1800,
        state=_job_state(oai, job.id),
    )


@pytest.fixture(scope="module")
def resumed(oai: openai.OpenAI, trained: Any) -> dict[str, Any]:
    """A job created twice with one Idempotency-Key, paused mid-run, then resumed to the end."""
    key = {"Idempotency-Key": f"test-{uuid.uuid4().hex}"}
    options: dict[str, Any] = {
        "model": "tiny-phi3",
        "training_file": trained.training_file,
        "method": {"type": "supervised", "supervised": {"hyperparameters": FAST}},
        "suffix": "paused",
        "extra_body": {"phitune": {"hyperparameters": {"max_steps": 40, "max_seq_length": 128}}},
    }
    first = oai.fine_tuning.jobs.create(**options, extra_headers=key)
    again = oai.fine_tuning.jobs.create(**options, extra_headers=key)
    with pytest.raises(openai.ConflictError):  # the same key with other options
        oai.fine_tuning.jobs.create(**{**options, "suffix": "other"}, extra_headers=key)
    state = _job_state(oai, first.id)
    _wait_for(lambda: _step(oai, first.id) >= 2, interval=0.05, state=state)
    paused = oai.fine_tuning.jobs.pause(first.id)
    stopped = _wait_for(lambda: _event_with(oai, first.id, "job paused at step"), state=state)
    resumed = oai.fine_tuning.jobs.resume(first.id)
    final = _wait_for(
        lambda: (j := oai.fine_tuning.jobs.retrieve(first.id)).status in ("succeeded", "failed") and j,
        timeout=1800,
        state=state,
    )
    return {"first": first, "again": again, "paused": paused, "stopped": stopped, "resumed": resumed, "final": final}


def _job_state(oai: openai.OpenAI, job_id: str) -> Callable[[], object]:
    def state() -> object:
        job = oai.fine_tuning.jobs.retrieve(job_id)
        return job.status, job.model_extra, [e.message for e in oai.fine_tuning.jobs.list_events(job_id, limit=8).data]

    return state


def _step(oai: openai.OpenAI, job_id: str) -> int:
    return int(oai.fine_tuning.jobs.retrieve(job_id).model_extra["step"])  # type: ignore[index]


def _event_with(oai: openai.OpenAI, job_id: str, text: str) -> Any:
    return next((e for e in oai.fine_tuning.jobs.list_events(job_id, limit=1000).data if text in e.message), None)


# -------------------------------------------------------------------------------------------------- the flow
def test_fine_tune_through_the_official_openai_client(oai: openai.OpenAI, trained: Any, dataset: Path) -> None:
    job = trained
    assert job.status == "succeeded", job.error
    assert job.object == "fine_tuning.job" and job.organization_id == "phitune" and job.result_files == []
    assert job.fine_tuned_model.startswith("ft:tiny-phi3:srv:") and job.trained_tokens > 0 and job.seed == 0
    assert job.hyperparameters.n_epochs == "auto" and job.hyperparameters.batch_size == 4  # max_steps decides
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(15)
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == "auto"
    extra = job.model_extra
    assert extra["step"] == 4 and extra["total_steps"] == 4
    assert extra["spec"]["method"]["type"] == "lora" and extra["spec"]["hyperparameters"]["learning_rate"] == 3e-3
    assert job.id in {j.id for j in oai.fine_tuning.jobs.list(limit=100)}

    # events: newest first, cursor pagination, has_more
    first = oai.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(first.data) == 3 and first.has_more
    ids = [int(e.id.split("-")[1]) for e in oai.fine_tuning.jobs.list_events(job.id, limit=3)]  # auto-paginates
    assert ids == sorted(ids, reverse=True) and len(ids) > 6
    second = oai.fine_tuning.jobs.list_events(job.id, limit=3, after=first.data[-1].id)
    assert [int(e.id.split("-")[1]) for e in first.data + second.data] == ids[:6]
    steps = [e.data["step"] for e in oai.fine_tuning.jobs.list_events(job.id) if e.type == "metrics"]  # type: ignore[index]
    assert steps == [4, 3, 2, 1]
    assert "job succeeded" in first.data[0].message

    checkpoints = oai.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints.data] == [2] and not checkpoints.has_more
    assert checkpoints.data[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-2")
    assert checkpoints.data[0].metrics.train_loss is not None and "location" not in checkpoints.data[0].model_extra

    file = oai.files.retrieve(job.training_file)
    assert file.filename == "train.jsonl" and file.model_extra["examples"] == 8
    assert oai.files.content(job.training_file).content == dataset.read_bytes()
    assert job.training_file in {f.id for f in oai.files.list()}

    models = {m.id: m for m in oai.models.list()}
    assert {"tiny-phi3", job.fine_tuned_model} <= models.keys()
    model = oai.models.retrieve(job.fine_tuned_model)
    assert model.model_extra["kind"] == "adapter" and model.model_extra["base_model"] == "tiny-phi3"
    assert "path" not in model.model_extra


def test_chat_plain_and_streamed(oai: openai.OpenAI, trained: Any) -> None:
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    plain = oai.chat.completions.create(model=trained.fine_tuned_model, messages=messages, max_tokens=8, temperature=0)
    assert plain.object == "chat.completion" and plain.model == trained.fine_tuned_model
    assert plain.usage is not None and 0 < plain.usage.completion_tokens <= 8 and plain.usage.prompt_tokens > 0
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.choices[0].message.role == "assistant"

    chunks = list(
        oai.chat.completions.create(
            model=trained.fine_tuned_model,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content  # greedy: the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage

    without_usage = oai.chat.completions.create(
        model=trained.fine_tuned_model, messages=messages, max_tokens=2, stream=True
    )
    assert all(c.usage is None and c.choices for c in without_usage)


def test_pause_resume_and_idempotent_create(oai: openai.OpenAI, resumed: dict[str, Any]) -> None:
    assert resumed["again"].id == resumed["first"].id
    assert [j.id for j in oai.fine_tuning.jobs.list(limit=100)].count(resumed["first"].id) == 1
    assert resumed["paused"].status == "paused" and resumed["resumed"].status == "queued"
    stopped_at = resumed["stopped"].data["step"]
    assert 2 <= stopped_at < 40
    final = resumed["final"]
    assert final.status == "succeeded", final.error
    assert final.model_extra["step"] == 40 and final.model_extra["total_steps"] == 40
    assert _event_with(oai, final.id, f"resumed from checkpoint at step {stopped_at}")
    steps = [e.data["step"] for e in oai.fine_tuning.jobs.list_events(final.id) if e.type == "metrics"]  # type: ignore[index]
    assert set(steps) == set(range(1, 41))


def test_adapters_on_one_base_share_one_loaded_model(
    oai: openai.OpenAI, app: FastAPI, trained: Any, resumed: dict[str, Any]
) -> None:
    for model in (trained.fine_tuned_model, resumed["final"].fine_tuned_model, "tiny-phi3"):
        reply = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert reply.model == model
    pool = app.state.phitune.backend._pool
    assert len(pool._bases) == 1
    (adapters,) = pool._adapters.values()
    assert len(adapters) >= 2


def test_chat_requests_beyond_the_limit_get_a_429(server_home: Path) -> None:
    app = create_app(server_home, max_pending_chats=1)
    entered, release = threading.Event(), threading.Event()

    def slow_lookup(name: str) -> Any:
        entered.set()
        release.wait(30)
        raise NotFoundError("model", name)

    app.state.phitune.backend.served_model = slow_lookup
    with running(app) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)

        def ask() -> Any:
            return client.chat.completions.create(model="tiny-phi3", messages=[{"role": "user", "content": "hi"}])

        first = concurrent.futures.ThreadPoolExecutor(1).submit(ask)
        assert entered.wait(30)
        with pytest.raises(openai.RateLimitError) as info:
            ask()
        assert info.value.response.headers["retry-after"] == "1"
        release.set()
        with pytest.raises(openai.NotFoundError):
            first.result(timeout=30)
        with pytest.raises(openai.NotFoundError):  # the slot was given back
            ask()


# ------------------------------------------------------------------------------------------------- refusals
def test_a_bad_upload_is_a_400_naming_its_lines(oai: openai.OpenAI, server_home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        "not json\n"
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    before = len(oai.files.list().data)
    with pytest.raises(openai.BadRequestError) as info:
        oai.files.create(file=bad.open("rb"), purpose="fine-tune")
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "file" and error["code"] == "invalid_file"
    assert "bad.jsonl:2: [invalid_json]" in error["message"] and "bad.jsonl:3: [no_assistant]" in error["message"]
    assert str(server_home) not in error["message"] and str(tmp_path) not in error["message"]
    assert len(oai.files.list().data) == before
    assert not any((server_home / "tmp").iterdir())  # the streamed temporary copy is gone

    with pytest.raises(openai.BadRequestError) as info:
        oai.files.create(file=("x.jsonl", b"{}\n"), purpose="assistants")
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "purpose"


def test_a_job_that_cannot_train_is_a_400_and_never_stored(
    oai: openai.OpenAI, server_home: Path, tmp_path: Path
) -> None:
    with open(write_chat_with_long_prompts(tmp_path / "long.jsonl"), "rb") as fh:
        uploaded = oai.files.create(file=fh, purpose="fine-tune")
    hyperparameters = {"max_seq_length": 64, "max_steps": 2}
    with pytest.raises(DatasetError) as local:  # what the SDK says to a local user of the same home
        phitune.Client(home=server_home).finetune.create(
            model="tiny-phi3", training_file=uploaded.id, hyperparameters=hyperparameters
        )
    jobs_before = len(oai.fine_tuning.jobs.list(limit=1000).data)
    with pytest.raises(openai.BadRequestError) as info:
        oai.fine_tuning.jobs.create(
            model="tiny-phi3", training_file=uploaded.id, extra_body={"phitune": {"hyperparameters": hyperparameters}}
        )
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_file" and error["message"] == str(local.value)
    assert (
        f"{uploaded.id} (long.jsonl):3: [too_long]" in error["message"]
        and "drop_untrainable_examples" in error["message"]
    )
    assert str(server_home) not in error["message"]

    with pytest.raises(openai.BadRequestError) as info:
        oai.fine_tuning.jobs.create(model="someone/not-downloaded", training_file=uploaded.id)
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "model" and "someone/not-downloaded" in error["message"]
    assert len(oai.fine_tuning.jobs.list(limit=1000).data) == jobs_before


def test_uploads_over_the_limit_are_a_413(oai: openai.OpenAI, base_url: str) -> None:
    big = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n' * 2000
    with pytest.raises(openai.APIStatusError) as info:
        oai.files.create(file=("big.jsonl", big), purpose="fine-tune")
    assert info.value.status_code == 413 and "limit" in info.value.message

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(20):
            yield big[:8192]
        yield b"\r\n--b--\r\n"

    response = httpx.post(
        f"{base_url}/files",
        content=chunked(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"


def test_auth_is_required_and_checked(base_url: str, server_home: Path) -> None:
    for key in ("wrong", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=base_url, api_key=key, max_retries=0).models.list()
        assert KEY not in str(info.value.body) and key not in str(info.value.body)
    response = httpx.get(f"{base_url}/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base_url}/models", headers={"api-key": KEY}).status_code == 200

    with running(create_app(server_home)) as open_url:  # no key: anyone on loopback may call
        assert httpx.get(f"{open_url}/models").status_code == 200
        assert any(m.id == "tiny-phi3" for m in openai.OpenAI(base_url=open_url, api_key="anything").models.list())


def test_errors_have_openai_shape_and_status(oai: openai.OpenAI, app: FastAPI, trained: Any, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.fine_tuning.jobs.retrieve("ftjob-missing")
    assert missing.value.body == {
        "message": "no fine-tuning job with id 'ftjob-missing'",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    unknown = httpx.get(f"{base_url}/nowhere", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"

    retrying = oai.with_options(max_retries=2)
    started = time.monotonic()
    with pytest.raises(openai.ConflictError):
        retrying.fine_tuning.jobs.cancel(trained.id)  # already succeeded: 409, and not retried
    assert time.monotonic() - started < 0.4

    method: Any = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"method": method}, "method.supervised.hyperparameters.n_epochs"),
        ({"method": {"type": "dpo"}}, "method.type"),
        ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised"}}, "hyperparameters"),
        ({"extra_body": {"phitune": {"hyperparameters": {"lr": 1}}}}, "phitune.hyperparameters.lr"),
        ({"extra_body": {"phitune": {"method": "sgd"}}}, "phitune.method"),
        ({"extra_body": {"phitune": {"distributed": {"nproc": 2}}}}, "phitune.distributed"),
        ({"extra_body": {"bogus": 1}}, "bogus"),
        ({"model": "/etc"}, "model"),
        ({"model": "Phi-3-small-128k-instruct"}, "model"),
        ({"training_file": "file-missing"}, ""),
    ]
    jobs_before = len(oai.fine_tuning.jobs.list(limit=1000).data)
    for options, param in cases:
        request: dict[str, Any] = {"model": "tiny-phi3", "training_file": trained.training_file, **options}
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as info:
            oai.fine_tuning.jobs.create(**request)
        body = info.value.body
        assert isinstance(body, dict) and (body["param"] or "") == param, (options, body)
    assert len(oai.fine_tuning.jobs.list(limit=1000).data) == jobs_before

    def boom() -> None:
        raise RuntimeError(f"disk on fire; key {KEY}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app.state.phitune.backend, "list_models", boom)
        with pytest.raises(openai.InternalServerError) as crashed:
            oai.models.list()
    assert crashed.value.status_code == 500 and crashed.value.body == {
        "message": "The server had an error while processing your request.",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_binding_beyond_loopback_needs_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", KEY)
    with pytest.raises(SpecError) as info:
        serve(host="0.0.0.0", port=1, api_key=None)  # refused before anything listens
    assert info.value.field == "host" and "needs an API key (set $PHITUNE_API_KEY, or pass --api-key)" in str(
        info.value
    )
    with pytest.raises(SystemExit) as exited:
        cli(["--host", "0.0.0.0", "--port", "1"])
    assert exited.value.code == 2 and "needs an API key" in capsys.readouterr().err


def test_access_log_lines_carry_no_query_string() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/models?api_key=sk-secret", "1.1", 200), None,
    )  # fmt: skip
    assert StripQueryStrings().filter(record)
    assert "sk-secret" not in record.getMessage() and "/v1/models" in record.getMessage()


# ----------------------------------------------------------------------------------- phitune.Client.openai
def test_the_same_flow_through_phitune_client_openai(base_url: str, trained: Any, chat_file: Path) -> None:
    client = phitune.Client.openai(base_url=base_url, api_key=KEY)
    assert client.backend.name == "openai" and client.backend.phitune_server  # type: ignore[attr-defined]

    uploaded = client.files.upload(chat_file, model="tiny-phi3")
    assert uploaded.examples == 8 and client.files.get(uploaded.id).filename == "train.jsonl"
    job = client.finetune.create(
        model="tiny-phi3",
        training_file=uploaded.id,
        method=phitune.LoRA(r=8, alpha=16),
        hyperparameters={"epochs": 50, "batch_size": 4, "learning_rate": 3e-3, "max_steps": 3, "max_seq_length": 128},
        suffix="sdk",
    )
    assert job.backend == "openai" and job.spec is not None and job.spec.hyperparameters.max_steps == 3
    job = client.finetune.wait(job.id, timeout=1800, poll_interval=0.2, progress=False)
    assert job.status == "succeeded", job.error
    assert job.step == 3 and job.fine_tuned_model is not None and job.fine_tuned_model.startswith("ft:tiny-phi3:sdk:")
    assert job.spec is not None and job.spec.method == phitune.LoRA(r=8, alpha=16)
    assert job.spec.hyperparameters.learning_rate == 3e-3

    events = client.finetune.events(job.id)
    assert [e.data["step"] for e in events if e.type == "metrics" and e.data] == [1, 2, 3]  # oldest first
    assert client.finetune.events(job.id, after=events[-3].id) == events[-2:]
    assert client.finetune.checkpoints(trained.id)[0].step_number == 2
    assert job.id in {j.id for j in client.finetune.list()}
    model = client.models.get(job.fine_tuned_model)
    assert model.kind == "adapter" and model.base_model == "tiny-phi3"
    assert job.fine_tuned_model in {m.id for m in client.models.list()}

    deployment = client.deployments.create(model=job.fine_tuned_model, name="sdk-phi")
    assert deployment.endpoint == base_url and deployment.backend == "openai"
    completion = deployment.chat([{"role": "user", "content": "What do bees make?"}], max_tokens=4)
    assert completion.model == job.fine_tuned_model and completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 4
    assert [d.name for d in client.deployments.list()] == ["sdk-phi"]
    assert deployment.openai_client().models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
    client.deployments.delete("sdk-phi")
    with pytest.raises(RemoteNotFoundError) as info:
        client.deployments.get("sdk-phi")
    assert info.value.status_code == 404 and "sdk-phi" in info.value.message
    client.close()


def test_client_openai_without_a_key_on_an_open_server(server_home: Path, tmp_path: Path) -> None:
    with running(create_app(server_home)) as open_url:
        client = phitune.Client.openai(base_url=open_url)
        assert "tiny-phi3" in {m.id for m in client.models.list()}
        bad = write_chat(tmp_path / "one.jsonl", [("q", "a")])
        assert client.files.upload(bad).filename == "one.jsonl"


# ------------------------------------------------------------------------------------------- faults and abuse
def test_no_answer_carries_a_path_of_the_server(oai: openai.OpenAI, trained: Any, server_home: Path) -> None:
    """Events (checkpoints, the base model's load), jobs, checkpoints and models name steps and ids, never a folder."""
    answers = [
        oai.fine_tuning.jobs.list_events(trained.id, limit=1000).model_dump_json(),
        oai.fine_tuning.jobs.retrieve(trained.id).model_dump_json(),
        oai.fine_tuning.jobs.checkpoints.list(trained.id).model_dump_json(),
        oai.models.list().model_dump_json(),
    ]
    assert "checkpoint saved at step 2" in answers[0]
    for answer in answers:
        assert str(server_home) not in answer and "site-packages" not in answer and "/tmp/" not in answer, answer


def _multipart(filename: str, content: bytes, *, closed: bool = True) -> bytes:
    head = f'--b\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n'.encode()
    return head + content + (b"\r\n--b--\r\n" if closed else b"\r\n")


def test_hostile_uploads_are_refused_or_stored_safely(base_url: str, server_home: Path) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=b"}
    line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'

    def upload(body: bytes) -> httpx.Response:
        return httpx.post(f"{base_url}/files", content=body, headers=headers, timeout=600)

    deep = upload(_multipart("deep.jsonl", line + b"[" * 1000 + b"]" * 1000 + b"\n"))
    assert deep.status_code == 400 and "deep.jsonl:2: [invalid_json]" in deep.json()["error"]["message"]

    long_name = "é" * 150 + ".jsonl"  # 306 bytes of UTF-8: more than a file system takes in one name
    stored = upload(_multipart(long_name, line))
    assert stored.status_code == 200, stored.text
    kept = stored.json()["filename"]
    assert long_name.startswith(kept) and len(kept.encode()) <= 200

    before = len(httpx.get(f"{base_url}/files", headers=headers).json()["data"])
    cut = upload(_multipart("cut.jsonl", line, closed=False))
    assert cut.status_code == 400 and "closing boundary" in cut.json()["error"]["message"]
    assert len(httpx.get(f"{base_url}/files", headers=headers).json()["data"]) == before
    assert list((server_home / "tmp").glob("upload-*")) == []


def test_without_a_key_only_requests_naming_this_machine_are_served(server_home: Path) -> None:
    """A web page of another origin whose name rebinds to 127.0.0.1 (DNS rebinding) sends its own Host and Origin."""
    with running(create_app(server_home)) as url:
        port = url.split(":")[2].split("/")[0]
        assert httpx.get(f"{url}/models").status_code == 200
        assert httpx.get(f"{url}/models", headers={"Host": f"localhost:{port}"}).status_code == 200
        for headers in ({"Host": f"evil.example:{port}"}, {"Origin": "http://evil.example"}):
            refused = httpx.get(f"{url}/models", headers=headers)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "invalid_host", headers
    with running(create_app(server_home, api_key=KEY)) as url:  # a key is the guard: any name may carry it
        answer = httpx.get(f"{url}/models", headers={"Host": "phitune.example", "Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200


def test_chat_is_bounded_by_the_models_context(oai: openai.OpenAI) -> None:
    """A prompt longer than tiny-phi3's 2048-token context, or a max_tokens past what it leaves, is a 400 naming the
    limit."""
    question = [{"role": "user", "content": "What do bees make?"}]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tiny-phi3", messages=question, max_tokens=10**9)  # type: ignore[arg-type]
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "max_tokens" and "2048-token context" in body["message"]
    long = [{"role": "user", "content": "bees " * 9000}]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tiny-phi3", messages=long, max_tokens=10)  # type: ignore[arg-type]
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "messages" and "2048 tokens" in body["message"]


def test_a_generation_stops_when_its_client_goes_away(server_home: Path) -> None:
    """A non-streamed request whose client disconnects stops generating and gives its slot back."""
    app = create_app(server_home, max_pending_chats=1)
    closed = threading.Event()
    options: list[dict[str, Any]] = []

    def endless(name: str, messages: Any, **given: Any) -> Iterator[str]:
        options.append(given)
        try:
            while True:
                time.sleep(0.01)
                yield "bee "
        finally:
            closed.set()

    app.state.phitune.backend.stream_chat = endless
    with running(app) as url:
        request = {"model": "tiny-phi3", "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/chat/completions", json=request, timeout=2)
        assert closed.wait(600), "the generation kept running after its client left"
        assert options[0]["max_tokens"] is None and options[0]["deadline"] > 0
        app.state.phitune.backend.stream_chat = lambda *args, **kwargs: iter(["hi", _generation()])
        answer = httpx.post(f"{url}/chat/completions", json=request, timeout=600)  # the slot is free again
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "hi"


def _generation() -> Any:
    from phitune.engines.torch_engine import Generation

    return Generation("hi", 3, 1, "stop")


def test_no_child_process_gets_the_api_key(home: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``phitune serve`` reads its key from $PHITUNE_API_KEY: the worker and trainer it starts never see it."""
    monkeypatch.setenv("PHITUNE_API_KEY", KEY)
    client = phitune.Client(home=home)
    job = client.finetune.create(model="tiny-phi3", training_file=chat_file, hyperparameters={"max_steps": 5000})
    _wait_for(lambda: client.finetune.get(job.id).step >= 1)
    worker = psutil.Process(_wait_for(lambda: _worker_pid(home)))
    processes = [worker, *worker.children(recursive=True)]
    assert any("phitune.local.attempt" in process.cmdline() for process in processes)
    for process in processes:
        assert "PHITUNE_API_KEY" not in process.environ()
    client.finetune.cancel(job.id)


def _worker_pid(home: Path) -> int | None:
    with contextlib.closing(sqlite3.connect(home / "phitune.db")) as db:
        row = db.execute("SELECT pid FROM worker").fetchone()
    return int(row[0]) if row else None


def test_a_relative_model_name_is_never_a_folder_of_the_working_directory(
    home: Path, tiny_model_dir: Path, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name like ``acme/phi`` is a Hugging Face id wherever the worker and trainer run; where the working
    directory holds a folder of that name, the name is refused rather than read as that folder. A local client
    gives a relative folder to the job as an absolute path."""
    from phitune.trainer.model import resolve_base

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "acme" / "phi")
    with pytest.raises(SpecError, match="working directory holds a file or folder of that name"):
        resolve_base("acme/phi", home)
    assert resolve_base("acme/other", home) == "acme/other"
    job = phitune.Client(home=home).finetune.create(
        model="acme/phi", training_file=chat_file, hyperparameters={"max_steps": 1}
    )
    assert job.spec is not None and job.spec.model == str(tmp_path / "acme" / "phi")


def test_routes_take_the_backend_through_depends(tmp_path: Path, dataset: Path) -> None:
    """Every route gets the backend from the app's dependencies: overriding one serves another home's files."""
    from phitune.backends.local import LocalBackend
    from phitune.server import deps

    app = create_app(tmp_path / "served", api_key=KEY)
    other = LocalBackend(tmp_path / "other")
    stored = phitune.Client(backend=other).files.upload(dataset)
    headers = {"Authorization": f"Bearer {KEY}"}
    with running(app) as url:
        assert httpx.get(f"{url}/files", headers=headers).json()["data"] == []
        app.dependency_overrides[deps.backend] = lambda: other
        listed = httpx.get(f"{url}/files", headers=headers).json()["data"]
        assert [f["id"] for f in listed] == [stored.id]
        assert httpx.get(f"{url}/files/{stored.id}", headers=headers).json()["filename"] == dataset.name
    other.close()
