"""``phitune.AsyncClient`` on every backend: the local one (real store, worker and trainer on tiny-phi3), an
OpenAI-compatible service (the real ``phitune serve`` app) and Azure (azure-ai-ml over the fake azure-core
transport). The same lifecycle as ``Client``, awaited; the event loop runs on while blocking work happens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

import phitune
from conftest import running, write_chat
from phitune.errors import ConflictError, NotFoundError, RemoteNotFoundError, UnsupportedOptionError

FAST = {"batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128, "seed": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "sk-phitune-async-0123456789abcdef"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Ticker:
    """Counts the event loop's turns while ``busy`` is set: a call that blocked the loop would leave it at 0."""

    def __init__(self) -> None:
        self.busy = False
        self.ticks = 0

    async def run(self) -> None:
        while True:
            await anyio.sleep(0.005)
            if self.busy:
                self.ticks += 1


def _steps(events: list[phitune.JobEvent]) -> list[int]:
    return [int(e.data["step"]) for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]


# ------------------------------------------------------------------------------------------------------- local
@pytest.mark.anyio
async def test_the_local_lifecycle_awaited(home: Path, chat_file: Path) -> None:
    async with phitune.AsyncClient(home=home) as client, anyio.create_task_group() as tasks:
        assert client.threaded  # the local backend is synchronous: its calls run on worker threads
        ticker = Ticker()
        tasks.start_soon(ticker.run)

        report = await client.files.validate(chat_file, model="tiny-phi3")
        assert report.ok and report.examples == 8 and report.tokens.exact
        uploaded = await client.files.upload(chat_file, model="tiny-phi3")
        assert (await client.files.get(uploaded.id)).examples == 8
        estimate = await client.finetune.estimate(model="tiny-phi3", training_file=uploaded.id, hyperparameters=FAST)
        assert isinstance(estimate, phitune.Estimate) and estimate.fits and estimate.examples == 8

        ticker.busy = True  # the fit check and the data preparation run while the loop turns
        job = await client.finetune.create(
            model="tiny-phi3",
            training_file=uploaded.id,
            hyperparameters={**FAST, "max_steps": 4, "checkpoint_every": 2},
            suffix="aio",
        )
        ticker.busy = False
        assert ticker.ticks > 0
        assert job.status == "queued" and job.total_steps == 4

        streamed = [event async for event in client.finetune.stream_events(job.id, poll_interval=0.2)]
        job = await client.finetune.wait(job.id, timeout=1800, progress=False)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model is not None and job.fine_tuned_model.startswith("ft:tiny-phi3:aio:")
        events = await client.finetune.events(job.id)
        assert streamed == events[: len(streamed)] and _steps(streamed) == [1, 2, 3, 4]
        assert [e.id async for e in client.finetune.stream_events(job.id, after=events[-3].id, poll_interval=0.1)] == [
            e.id for e in events[-2:]
        ]
        assert [c.step_number for c in await client.finetune.checkpoints(job.id)] == [2]
        assert job.id in {j.id for j in await client.finetune.list()}
        model = await client.models.get(job.fine_tuned_model)
        assert model.kind == "adapter" and model.id in {m.id for m in await client.models.list()}

        deployment = await client.deployments.create(model=job.fine_tuned_model, name="aio-phi")
        with pytest.raises(ConflictError, match=r"client\.deployments\.chat"):  # no blocking chat from the loop
            deployment.chat(QUESTION)
        completion = await client.deployments.chat("aio-phi", QUESTION, max_tokens=8)
        assert completion.model == job.fine_tuned_model and completion.usage is not None
        assert 0 < completion.usage.completion_tokens <= 8
        pieces = [piece async for piece in client.deployments.stream_chat("aio-phi", QUESTION, max_tokens=8)]
        assert pieces and "".join(pieces) == completion.text  # greedy: the same answer, in pieces
        assert [d.name for d in await client.deployments.list()] == ["aio-phi"]
        await client.deployments.delete("aio-phi")
        with pytest.raises(NotFoundError):
            await client.deployments.get("aio-phi")
        tasks.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_blocking_stream_is_pulled_on_one_thread_of_its_own() -> None:
    """A synchronous backend's stream may hold a lock of its thread from one piece to the next (the ONNX model pool
    does): AsyncClient opens, pulls and closes it on one thread, never the event loop's."""
    from contextlib import aclosing

    from phitune.resources._base import _pulled_on_one_thread

    lock, threads = threading.RLock(), set()

    def pieces() -> Iterator[str]:
        with lock:
            for piece in ("Pa", "ri", "s."):
                threads.add(threading.get_ident())
                yield piece

    assert [piece async for piece in _pulled_on_one_thread(pieces)] == ["Pa", "ri", "s."]
    assert len(threads) == 1 and threading.get_ident() not in threads
    async with aclosing(_pulled_on_one_thread(pieces)) as stream:
        async for _ in stream:
            break  # the reader stops early: the stream is closed on its own thread, which releases the lock
    assert lock.acquire(blocking=False)
    lock.release()


@pytest.mark.anyio
async def test_a_refused_job_deletes_the_files_its_create_uploaded(home: Path, chat_file: Path) -> None:
    async with phitune.AsyncClient(home=home) as client:
        with pytest.raises(UnsupportedOptionError) as refused:
            await client.finetune.create(model="tiny-phi3", training_file=chat_file, compute={"compute": "gpu-cluster"})
        assert refused.value.field == "compute" and refused.value.backend == "local"
        assert await client.files.list() == []


# ------------------------------------------------------------------------------------------ OpenAI-compatible
@pytest.fixture(scope="module")
def served(server_home: Path) -> Iterator[str]:
    from phitune.server.app import create_app

    with running(create_app(server_home, api_key=KEY)) as url:
        yield url


@pytest.mark.anyio
async def test_the_lifecycle_on_phitune_serve_awaited(served: str, chat_file: Path) -> None:
    async with phitune.AsyncClient.openai(base_url=served, api_key=KEY) as client:
        assert not client.threaded  # httpx's AsyncClient under openai.AsyncOpenAI, awaited all the way down
        uploaded = await client.files.upload(chat_file, model="tiny-phi3")
        assert uploaded.examples == 8 and (await client.files.get(uploaded.id)).filename == "train.jsonl"
        job = await client.finetune.create(
            model="tiny-phi3",
            training_file=uploaded.id,
            method=phitune.LoRA(r=8, alpha=16),
            hyperparameters={**FAST, "epochs": 50, "max_steps": 3, "checkpoint_every": 2},
            suffix="aio",
        )
        assert job.backend == "openai" and job.spec is not None and job.spec.method == phitune.LoRA(r=8, alpha=16)
        streamed = [event async for event in client.finetune.stream_events(job.id, poll_interval=0.2)]
        job = await client.finetune.wait(job.id, timeout=1800, poll_interval=0.2, progress=False)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model is not None
        events = await client.finetune.events(job.id)
        assert streamed == events[: len(streamed)] and _steps(streamed) == [1, 2, 3]
        assert [c.step_number for c in await client.finetune.checkpoints(job.id)] == [2]
        assert (await client.models.get(job.fine_tuned_model)).kind == "adapter"

        deployment = await client.deployments.create(model=job.fine_tuned_model, name="aio-sdk")
        assert deployment.backend == "openai"
        completion = await client.deployments.chat("aio-sdk", QUESTION, max_tokens=4)
        assert completion.model == job.fine_tuned_model and completion.usage is not None
        pieces = [piece async for piece in client.deployments.stream_chat("aio-sdk", QUESTION, max_tokens=4)]
        assert "".join(pieces) == completion.text

        # the sync twin runs the same operations
        with phitune.Client.openai(base_url=served, api_key=KEY) as twin:
            assert list(twin.finetune.stream_events(job.id, poll_interval=0.1)) == events
            assert "".join(twin.deployments.stream_chat("aio-sdk", QUESTION, max_tokens=4)) == completion.text

        await client.deployments.delete("aio-sdk")
        with pytest.raises(NotFoundError) as missing:  # one except covers local and remote
            await client.deployments.get("aio-sdk")
        assert isinstance(missing.value, RemoteNotFoundError) and missing.value.status_code == 404
        assert missing.value.ident.endswith("/phitune/deployments/aio-sdk") and missing.value.kind == "resource"


@pytest.mark.anyio
async def test_the_async_twin_waits_what_retry_after_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(openai._base_client.anyio, "sleep", sleep)
    answers = [httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "7"})]

    def service(request: httpx.Request) -> httpx.Response:
        if answers:
            return answers.pop(0)
        return httpx.Response(200, json={"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "openai"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(service))
    async with phitune.AsyncClient.openai(base_url="https://ft.example/v1", api_key=KEY, http_client=http) as client:
        assert (await client.models.get("gpt-4o-mini")).id == "gpt-4o-mini"
    assert waits == [7.0]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("auth", "header"),
    [
        ({"api_key": KEY}, ("api-key", KEY)),
        ({"azure_ad_token_provider": lambda: "t0k"}, ("authorization", "Bearer t0k")),
    ],
)
async def test_azure_openai_awaited(auth: dict[str, Any], header: tuple[str, str]) -> None:
    from test_openai_backend import Service

    service = Service()  # a plain OpenAI-shaped service: events newest first, two a page
    http = httpx.AsyncClient(transport=httpx.MockTransport(service))
    options: dict[str, Any] = {"azure_endpoint": "https://res.openai.azure.com", "api_version": "2024-10-21"}
    async with phitune.AsyncClient.openai(**options, http_client=http, **auth) as client:
        await client.finetune.create(model="gpt-4o-mini", training_file="file-abc", idempotency_key="key-1")
        (post,) = service.posted("/fine_tuning/jobs")
        assert post.url.path == "/openai/fine_tuning/jobs" and post.url.params["api-version"] == "2024-10-21"
        assert post.headers[header[0]] == header[1] and post.headers["idempotency-key"] == "key-1"
        events = await client.finetune.events("ftjob-1")
        assert [e.id for e in events] == [f"ftevent-{i}" for i in range(1, 6)]  # every page, oldest first
        assert [e.id for e in await client.finetune.events("ftjob-1", after="ftevent-3")] == ["ftevent-4", "ftevent-5"]
        answer = await client.deployments.chat("ft:gpt-4o-mini:org::abc", [{"role": "user", "content": "hi"}])
        assert answer.text == "Paris."
        assert service.requests[-1].url.path == "/openai/deployments/ft:gpt-4o-mini:org::abc/chat/completions"
        with pytest.raises(UnsupportedOptionError):  # refused before anything is sent, as by the sync twin
            await client.finetune.create(model="gpt-4o-mini", training_file="file-abc", method="full")
        assert len(service.posted("/fine_tuning/jobs")) == 1


# ------------------------------------------------------------------------------------------------------- Azure
@pytest.mark.anyio
async def test_azure_through_the_async_client_on_worker_threads(tmp_path: Path) -> None:
    from azure_fake import ChatServer, FakeAzure
    from phitune._retry import RetryPolicy
    from test_azure import MODEL, Uploads, ml_client

    class Fake(FakeAzure):
        """The fake Azure services, noting the thread each request is sent on."""

        def send(self, request: Any, **kwargs: Any) -> Any:
            threads.add(threading.get_ident())
            return super().send(request, **kwargs)

    threads: set[int] = set()
    fake, chat = Fake(), ChatServer()
    fake.scoring_uri = chat.url
    sleeps: list[float] = []
    try:
        client = phitune.AsyncClient.azure(
            ml_client=ml_client(fake), uploader=Uploads(), retry=RetryPolicy(sleep=sleeps.append), poll_interval=0.0
        )
        async with client:
            assert client.threaded  # azure-ai-ml is synchronous
            job = await client.finetune.create(model=MODEL, training_file=write_chat(tmp_path / "chat.jsonl"))
            assert job.status == "queued" and job.backend == "azure"
            fake.set_job_status(job.id, "Running")
            fake.set_job_status(job.id, "Completed")
            done = await client.finetune.wait(job.id, poll_interval=0, progress=False)
            assert done.status == "succeeded" and done.fine_tuned_model is not None
            assert [e.message async for e in client.finetune.stream_events(job.id, poll_interval=0)] == [
                e.message for e in await client.finetune.events(job.id)
            ]
            await client.deployments.create(model=done.fine_tuned_model, name="aio-e2e")
            assert (await client.deployments.chat("aio-e2e", [{"role": "user", "content": "ping"}])).text == (
                "echo: ping"
            )
            sent = len(fake.requests)
            refusals = [
                lambda: client.finetune.pause(job.id),
                lambda: client.models.export(done.fine_tuned_model or "", format="adapter", dest=tmp_path / "x"),
            ]
            for refused_call in refusals:
                with pytest.raises(UnsupportedOptionError) as refused:
                    await refused_call()
                assert refused.value.backend == "azure" and refused.value.field in ("pause", "models.export")
            with pytest.raises(UnsupportedOptionError) as no_stream:
                _ = [piece async for piece in client.deployments.stream_chat("aio-e2e", [])]
            assert no_stream.value.field == "deployments.stream_chat" and "deployments.chat()" in str(no_stream.value)
            assert len(fake.requests) == sent  # refused before anything was sent
        assert threads and threading.get_ident() not in threads  # no request was sent from the event loop's thread
    finally:
        chat.close()
