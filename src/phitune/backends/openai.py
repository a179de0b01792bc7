"""Any OpenAI-compatible fine-tuning service: ``phitune serve``, Azure OpenAI, or OpenAI itself.

Calls go through the official ``openai`` client, which retries throttling (429), 408, 409 and 5xx answers and
connection failures ``max_retries`` times, waiting what ``Retry-After`` / ``retry-after-ms`` asks (up to two
minutes) or backing off exponentially. A job is created with an ``Idempotency-Key`` header, the same on every retry.
:class:`OpenAIBackend` drives ``openai.OpenAI``; its async twin :class:`AsyncOpenAIBackend` (for
``phitune.AsyncClient``) drives the same operations over ``openai.AsyncOpenAI``, httpx's ``AsyncClient`` underneath.

What a service honours depends on what it is. A **phitune server** (found by ``GET /v1/phitune``, or declared with
``phitune_server=True``) takes the whole :class:`~phitune.types.JobSpec`: the phitune-only parts travel in the request
body's ``phitune`` object. **Other services** take supervised fine-tuning with ``n_epochs``, ``batch_size``,
``learning_rate_multiplier`` (``learning_rate`` / the method's base learning rate, see
:data:`phitune.openai_shapes.BASE_LEARNING_RATE`) and ``seed``; every other option is refused by name
(:class:`~phitune.errors.UnsupportedOptionError`) before anything is sent. There, a deployment is the fine-tuned
model itself: the service serves it under its own id.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import openai
from openai import Omit, omit

from .. import catalog
from .._ops import Op, adrive, drive
from ..errors import (
    APIConnectionError,
    APIStatusError,
    MissingDependencyError,
    UnsupportedOptionError,
    redact,
    status_error,
)
from ..openai_shapes import openai_hyperparameters
from ..types import (
    ChatCompletion,
    Checkpoint,
    DatasetReport,
    Deployment,
    Distributed,
    FileObject,
    FineTuneJob,
    Hyperparameters,
    JobEvent,
    JobSpec,
    LoRA,
    ModelObject,
)
from .base import Capabilities

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam
    from openai.types.fine_tuning.job_create_params import Method as OpenAIMethod

T = TypeVar("T")

COGNITIVE_SERVICES_SCOPE = "https://cognitiveservices.azure.com/.default"
_OPENAI_HYPERPARAMETERS = frozenset({"epochs", "batch_size", "learning_rate", "seed"})
_NO_KEY = "phitune-no-key"
"""Sent when no API key is configured: the openai client needs one; an open ``phitune serve`` ignores it."""


@dataclass(frozen=True)
class _Request:
    """One call of the ``openai`` client: ``send(client)`` gives the answer (a coroutine of it on
    ``openai.AsyncOpenAI``). With ``pages``, the answer is every item of every page, up to the first item for which
    ``until`` holds."""

    send: Callable[[Any], Any]
    pages: bool = False
    until: Callable[[Any], bool] | None = None


class _OpenAIService:
    """What :class:`OpenAIBackend` and :class:`AsyncOpenAIBackend` share: the client's construction, and each call's
    requests and the translation of their answers, written once as operations (:mod:`phitune._ops`) that the sync
    backend performs in place and the async one awaits."""

    name = "openai"
    home: Path | None = None
    _plain: type[Any]
    _azure: type[Any]

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        azure_endpoint: str | None = None,
        api_version: str | None = None,
        credential: Any = None,
        azure_ad_token_provider: Callable[[], str] | None = None,
        phitune_server: bool | None = None,
        max_retries: int = 3,
        timeout: float = 120.0,
        http_client: Any = None,  # an httpx.Client (httpx.AsyncClient for the async twin): proxies, custom transports
        client: Any = None,
    ) -> None:
        if client is not None:
            self._client = client
        elif azure_endpoint is not None:
            if credential is not None:
                if azure_ad_token_provider is not None:
                    raise ValueError("give credential or azure_ad_token_provider, not both")
                azure_ad_token_provider = _token_provider(credential)
            self._client = self._azure(
                azure_endpoint=azure_endpoint,
                api_version=api_version,
                api_key=api_key if azure_ad_token_provider is None else None,
                azure_ad_token_provider=azure_ad_token_provider,
                max_retries=max_retries,
                timeout=timeout,
                http_client=http_client,
            )
            phitune_server = False if phitune_server is None else phitune_server
        else:
            self._client = self._plain(
                base_url=base_url,
                api_key=api_key or os.environ.get("OPENAI_API_KEY") or _NO_KEY,
                max_retries=max_retries,
                timeout=timeout,
                http_client=http_client,
            )
        self._phitune_server = phitune_server
        self._secrets = tuple(k for k in {api_key, self._client.api_key} if k)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """The client's errors (already retried by the client) as phitune's."""
        try:
            yield
        except openai.APIStatusError as exc:
            message = redact(_message(exc), self._secrets)
            raise status_error(
                exc.status_code, message, body=exc.body, request_id=exc.request_id, ident=exc.request.url.path
            ) from None
        except openai.APIConnectionError as exc:
            raise APIConnectionError(f"cannot reach {self._client.base_url}: {type(exc).__name__}") from None

    # ------------------------------------------------------------------------------------------------ operations
    def _is_phitune_server(self) -> Op[bool]:
        """True if the service is ``phitune serve`` (asked once with ``GET /phitune``)."""
        if self._phitune_server is None:
            try:
                info = yield _Request(lambda c: c.get("/phitune", cast_to=object))
            except APIStatusError as exc:
                if exc.status_code not in (400, 404, 405):
                    raise
                info = None
            self._phitune_server = isinstance(info, dict) and info.get("object") == "phitune.server"
        return self._phitune_server

    def _upload_file(self, path: str) -> Op[FileObject]:
        with open(path, "rb") as fh:
            created = yield _Request(lambda c: c.files.create(file=(Path(path).name, fh), purpose="fine-tune"))
        return FileObject.model_validate(_plain(created))

    def _get_file(self, file_id: str) -> Op[FileObject]:
        return FileObject.model_validate(_plain((yield _Request(lambda c: c.files.retrieve(file_id)))))

    def _list_files(self) -> Op[list[FileObject]]:
        files = yield _Request(lambda c: c.files.list(purpose="fine-tune"), pages=True)
        return [FileObject.model_validate(_plain(f)) for f in files]

    def _delete_file(self, file_id: str) -> Op[None]:
        yield _Request(lambda c: c.files.delete(file_id))

    def _check_spec(self, spec: JobSpec) -> Op[None]:
        """Refuse, by name, every option the service cannot honour (see the module docstring)."""
        if spec.compute is not None:
            raise UnsupportedOptionError("compute", self.name, "AzureCompute applies to the Azure backend only")
        if spec.integrations:
            raise UnsupportedOptionError(
                "integrations",
                self.name,
                f"{spec.integrations[0].type} logs where the job trains, on the service's machines; read the metrics "
                "back with finetune.events() instead",
            )
        entry = catalog.find(spec.model)
        if entry is not None and "openai" not in entry.backends:
            raise UnsupportedOptionError("model", self.name, entry.note or f"{entry.name} is not offered there")
        if (yield from self._is_phitune_server()):
            return
        why = "this service runs supervised fine-tuning with n_epochs, batch_size, learning_rate and seed only"
        if not isinstance(spec.method, LoRA):
            raise UnsupportedOptionError("method", self.name, f"{spec.method.type!r}: use 'lora' ({why})")
        for field in LoRA.model_fields:
            if getattr(spec.method, field) != getattr(LoRA(), field):
                raise UnsupportedOptionError(f"method.{field}", self.name, f"the service chooses its adapter ({why})")
        defaults = Hyperparameters()
        for field in Hyperparameters.model_fields:
            if field not in _OPENAI_HYPERPARAMETERS and getattr(spec.hyperparameters, field) != getattr(
                defaults, field
            ):
                raise UnsupportedOptionError(f"hyperparameters.{field}", self.name, why)
        if spec.distributed != Distributed():
            raise UnsupportedOptionError("distributed", self.name, "the service decides how training is distributed")
        if spec.task == "text_completion":
            raise UnsupportedOptionError("task", self.name, "the service infers the task from the training file")

    def _create_job(self, spec: JobSpec, idempotency_key: str) -> Op[FineTuneJob]:
        hyperparameters = openai_hyperparameters(spec)
        extra_body: dict[str, Any] | None = None
        if (yield from self._is_phitune_server()):  # the exact spec travels in the phitune object; no multiplier
            del hyperparameters["learning_rate_multiplier"]
            extra_body = {
                "phitune": {
                    "method": spec.method.model_dump(mode="json"),
                    "hyperparameters": spec.hyperparameters.model_dump(mode="json"),
                    "distributed": spec.distributed.model_dump(mode="json"),
                    "task": spec.task,
                }
            }
        method = cast("OpenAIMethod", {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}})
        job = yield _Request(
            lambda c: c.fine_tuning.jobs.create(
                model=spec.model,
                training_file=spec.training_file,
                validation_file=_given(spec.validation_file),
                method=method,
                seed=spec.hyperparameters.seed,
                suffix=_given(spec.suffix),
                extra_headers={"Idempotency-Key": idempotency_key},
                extra_body=extra_body,
            )
        )
        return self._job(job)

    def _get_job(self, job_id: str) -> Op[FineTuneJob]:
        return self._job((yield _Request(lambda c: c.fine_tuning.jobs.retrieve(job_id))))

    def _list_jobs(self, limit: int, after: str | None) -> Op[list[FineTuneJob]]:
        page = yield _Request(lambda c: c.fine_tuning.jobs.list(limit=limit, after=_given(after)))
        return [self._job(j) for j in page.data]

    def _cancel_job(self, job_id: str) -> Op[FineTuneJob]:
        return self._job((yield _Request(lambda c: c.fine_tuning.jobs.cancel(job_id))))

    def _pause_job(self, job_id: str) -> Op[FineTuneJob]:
        return self._job((yield _Request(lambda c: c.fine_tuning.jobs.pause(job_id))))

    def _resume_job(self, job_id: str) -> Op[FineTuneJob]:
        return self._job((yield _Request(lambda c: c.fine_tuning.jobs.resume(job_id))))

    def _list_events(self, job_id: str, after: str | None, limit: int) -> Op[list[JobEvent]]:
        """Oldest first from ``after``. A phitune server pages that way itself (``order=asc``); elsewhere events
        come newest first and are read back to ``after``, then reversed."""
        if (yield from self._is_phitune_server()):
            page = yield _Request(
                lambda c: c.fine_tuning.jobs.list_events(
                    job_id, after=_given(after), limit=limit, extra_query={"order": "asc"}
                )
            )
            return [_event(e) for e in page.data]
        newer = yield _Request(
            lambda c: c.fine_tuning.jobs.list_events(job_id, limit=100), pages=True, until=lambda e: e.id == after
        )
        return [_event(e) for e in reversed(newer)][:limit]

    def _list_checkpoints(self, job_id: str) -> Op[list[Checkpoint]]:
        checkpoints = yield _Request(lambda c: c.fine_tuning.jobs.checkpoints.list(job_id, limit=100), pages=True)
        return [_checkpoint(c) for c in checkpoints]

    def _job(self, job: Any) -> FineTuneJob:
        data = _plain(job)
        error = data.get("error")
        if not (isinstance(error, dict) and error.get("code") and error.get("message")):
            data.pop("error", None)
        data["backend"] = self.name
        return FineTuneJob.model_validate(data)

    def _get_model(self, model_id: str) -> Op[ModelObject]:
        return _model((yield _Request(lambda c: c.models.retrieve(model_id))))

    def _list_models(self) -> Op[list[ModelObject]]:
        return [_model(m) for m in (yield _Request(lambda c: c.models.list(), pages=True))]

    def _create_deployment(self, model: str, name: str, options: dict[str, Any]) -> Op[Deployment]:
        """On a phitune server, a named deployment; elsewhere the fine-tuned model serves as itself, so ``name``
        must be the model id."""
        if (yield from self._is_phitune_server()):
            body = {"model": model, "name": name, **options}
            created = yield _Request(lambda c: c.post("/phitune/deployments", body=body, cast_to=object))
            return self._deployment(created)
        if options:
            raise UnsupportedOptionError(f"deployments.create({next(iter(options))}=...)", self.name, "unknown option")
        if name != model:
            raise UnsupportedOptionError(
                "name", self.name, f"the service serves a fine-tuned model under its own id: use name={model!r}"
            )
        return (yield from self._get_deployment(model))

    def _get_deployment(self, name: str) -> Op[Deployment]:
        if (yield from self._is_phitune_server()):
            return self._deployment((yield _Request(lambda c: c.get(_deployment_path(name), cast_to=object))))
        model = yield from self._get_model(name)
        return self._model_deployment(model)

    def _list_deployments(self) -> Op[list[Deployment]]:
        """A phitune server's deployments; elsewhere the fine-tuned models (ids starting ``ft:``)."""
        if (yield from self._is_phitune_server()):
            listing = yield _Request(lambda c: c.get("/phitune/deployments", cast_to=object))
            return [self._deployment(d) for d in _data(listing)]
        models = yield from self._list_models()
        return [self._model_deployment(m) for m in models if m.id.startswith("ft:")]

    def _delete_deployment(self, name: str) -> Op[None]:
        if not (yield from self._is_phitune_server()):
            raise UnsupportedOptionError(
                "deployments.delete", self.name, "a fine-tuned model is its own deployment; delete it with the service"
            )
        yield _Request(lambda c: c.delete(_deployment_path(name), cast_to=object))

    def _deployment(self, data: object) -> Deployment:
        fields = dict(data) if isinstance(data, dict) else {}
        fields.pop("object", None)
        fields["backend"] = self.name
        return Deployment.model_validate(fields)

    def _model_deployment(self, model: ModelObject) -> Deployment:
        endpoint = str(self._client.base_url)
        return Deployment(name=model.id, model=model.id, created_at=model.created, endpoint=endpoint, backend=self.name)

    def _chat(self, deployment: str, messages: list[dict[str, str]], stream: bool, options: dict[str, Any]) -> _Request:
        """The chat completion request (a stream of chunks with ``stream``)."""
        return _Request(
            lambda c: c.chat.completions.create(
                model=deployment,
                messages=cast("list[ChatCompletionMessageParam]", messages),
                max_tokens=options["max_tokens"],
                temperature=options["temperature"],
                top_p=options["top_p"],
                seed=_given(options["seed"]),
                stream=True if stream else omit,
            )
        )


class OpenAIBackend(_OpenAIService):
    """Fine-tuning jobs on an OpenAI-compatible service, through the official ``openai`` client.

    ``OpenAIBackend(base_url="http://127.0.0.1:8000/v1", api_key=...)`` for ``phitune serve`` or another
    OpenAI-compatible service (``base_url`` None means OpenAI; ``api_key`` None reads ``$OPENAI_API_KEY``);
    ``OpenAIBackend(azure_endpoint=..., api_version=..., api_key=... | credential=... |
    azure_ad_token_provider=...)`` for Azure OpenAI (``credential``, an azure-identity credential, is turned into a
    token provider for the Cognitive Services scope). ``client=`` takes a ready ``openai.OpenAI``.
    """

    capabilities = Capabilities(pause=True, chat_streaming=True, openai_endpoint=True)
    _plain = openai.OpenAI
    _azure = openai.AzureOpenAI
    _client: openai.OpenAI

    def _run(self, op: Op[T]) -> T:
        return drive(op, self._perform)

    def _perform(self, request: _Request) -> Any:
        with self._translated():
            answer = request.send(self._client)
            if not request.pages:
                return answer
            items: list[Any] = []
            for item in answer:
                if request.until is not None and request.until(item):
                    break
                items.append(item)
            return items

    @property
    def phitune_server(self) -> bool:
        """True if the service is ``phitune serve`` (asked once with ``GET /phitune``)."""
        return self._run(self._is_phitune_server())

    def openai_client(self, deployment: str) -> openai.OpenAI:
        """The ``openai.OpenAI`` client this backend uses (a deployment answers under its own name as ``model``)."""
        return self._client

    def upload_file(self, path: str, *, report: DatasetReport) -> FileObject:
        return self._run(self._upload_file(path))

    def get_file(self, file_id: str) -> FileObject:
        return self._run(self._get_file(file_id))

    def list_files(self) -> list[FileObject]:
        return self._run(self._list_files())

    def delete_file(self, file_id: str) -> None:
        self._run(self._delete_file(file_id))

    def check_spec(self, spec: JobSpec) -> None:
        """Refuse, by name, every option the service cannot honour (see the module docstring)."""
        self._run(self._check_spec(spec))

    def create_job(self, spec: JobSpec, *, idempotency_key: str) -> FineTuneJob:
        return self._run(self._create_job(spec, idempotency_key))

    def get_job(self, job_id: str) -> FineTuneJob:
        return self._run(self._get_job(job_id))

    def list_jobs(self, *, limit: int = 20, after: str | None = None) -> list[FineTuneJob]:
        return self._run(self._list_jobs(limit, after))

    def cancel_job(self, job_id: str) -> FineTuneJob:
        return self._run(self._cancel_job(job_id))

    def pause_job(self, job_id: str) -> FineTuneJob:
        """Pause a running job (where the service supports it); ``resume_job`` continues it."""
        return self._run(self._pause_job(job_id))

    def resume_job(self, job_id: str) -> FineTuneJob:
        return self._run(self._resume_job(job_id))

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> list[JobEvent]:
        return self._run(self._list_events(job_id, after, limit))

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        return self._run(self._list_checkpoints(job_id))

    def get_model(self, model_id: str) -> ModelObject:
        return self._run(self._get_model(model_id))

    def list_models(self) -> list[ModelObject]:
        return self._run(self._list_models())

    def create_deployment(self, model: str, name: str, **options: Any) -> Deployment:
        """On a phitune server, a named deployment; elsewhere the fine-tuned model serves as itself, so ``name``
        must be the model id."""
        return self._run(self._create_deployment(model, name, options))

    def get_deployment(self, name: str) -> Deployment:
        return self._run(self._get_deployment(name))

    def list_deployments(self) -> list[Deployment]:
        return self._run(self._list_deployments())

    def delete_deployment(self, name: str) -> None:
        self._run(self._delete_deployment(name))

    def chat(
        self,
        deployment: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> ChatCompletion:
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        return ChatCompletion.from_openai(self._perform(self._chat(deployment, messages, False, options)))

    def stream_chat(
        self,
        deployment: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> Iterator[str]:
        """The answer's text pieces as the service streams them."""
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        chunks = self._perform(self._chat(deployment, messages, True, options))
        with self._translated(), chunks:
            for chunk in chunks:
                if text := _delta(chunk):
                    yield text

    def close(self) -> None:
        self._client.close()


class AsyncOpenAIBackend(_OpenAIService):
    """:class:`OpenAIBackend` for ``phitune.AsyncClient``: the same operations over ``openai.AsyncOpenAI`` (httpx's
    ``AsyncClient`` underneath, retries as the client does them), every call a coroutine. ``http_client=`` takes an
    ``httpx.AsyncClient``, ``client=`` a ready ``openai.AsyncOpenAI``."""

    capabilities = Capabilities(pause=True, chat_streaming=True)
    _plain = openai.AsyncOpenAI
    _azure = openai.AsyncAzureOpenAI
    _client: openai.AsyncOpenAI

    async def _run(self, op: Op[T]) -> T:
        return await adrive(op, self._perform)

    async def _perform(self, request: _Request) -> Any:
        with self._translated():
            answer = request.send(self._client)
            if not request.pages:
                return await answer
            items: list[Any] = []
            async for item in answer:
                if request.until is not None and request.until(item):
                    break
                items.append(item)
            return items

    async def upload_file(self, path: str, *, report: DatasetReport) -> FileObject:
        return await self._run(self._upload_file(path))

    async def get_file(self, file_id: str) -> FileObject:
        return await self._run(self._get_file(file_id))

    async def list_files(self) -> list[FileObject]:
        return await self._run(self._list_files())

    async def delete_file(self, file_id: str) -> None:
        await self._run(self._delete_file(file_id))

    async def check_spec(self, spec: JobSpec) -> None:
        await self._run(self._check_spec(spec))

    async def create_job(self, spec: JobSpec, *, idempotency_key: str) -> FineTuneJob:
        return await self._run(self._create_job(spec, idempotency_key))

    async def get_job(self, job_id: str) -> FineTuneJob:
        return await self._run(self._get_job(job_id))

    async def list_jobs(self, *, limit: int = 20, after: str | None = None) -> list[FineTuneJob]:
        return await self._run(self._list_jobs(limit, after))

    async def cancel_job(self, job_id: str) -> FineTuneJob:
        return await self._run(self._cancel_job(job_id))

    async def pause_job(self, job_id: str) -> FineTuneJob:
        return await self._run(self._pause_job(job_id))

    async def resume_job(self, job_id: str) -> FineTuneJob:
        return await self._run(self._resume_job(job_id))

    async def list_events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> list[JobEvent]:
        return await self._run(self._list_events(job_id, after, limit))

    async def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        return await self._run(self._list_checkpoints(job_id))

    async def get_model(self, model_id: str) -> ModelObject:
        return await self._run(self._get_model(model_id))

    async def list_models(self) -> list[ModelObject]:
        return await self._run(self._list_models())

    async def create_deployment(self, model: str, name: str, **options: Any) -> Deployment:
        return await self._run(self._create_deployment(model, name, options))

    async def get_deployment(self, name: str) -> Deployment:
        return await self._run(self._get_deployment(name))

    async def list_deployments(self) -> list[Deployment]:
        return await self._run(self._list_deployments())

    async def delete_deployment(self, name: str) -> None:
        await self._run(self._delete_deployment(name))

    async def chat(
        self,
        deployment: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> ChatCompletion:
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        return ChatCompletion.from_openai(await self._perform(self._chat(deployment, messages, False, options)))

    async def stream_chat(
        self,
        deployment: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> AsyncIterator[str]:
        """The answer's text pieces as the service streams them."""
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        chunks = await self._perform(self._chat(deployment, messages, True, options))
        with self._translated():
            async with chunks:
                async for chunk in chunks:
                    if text := _delta(chunk):
                        yield text

    async def close(self) -> None:
        await self._client.close()


# ------------------------------------------------------------------------------------------------------ helpers
def _token_provider(credential: Any) -> Callable[[], str]:
    try:
        from azure.identity import get_bearer_token_provider
    except ImportError:
        raise MissingDependencyError("azure-identity", "azure") from None
    provider: Callable[[], str] = get_bearer_token_provider(credential, COGNITIVE_SERVICES_SCOPE)
    return provider


def _given(value: T | None) -> T | Omit:
    """``value``, or openai's marker for a parameter left out."""
    return omit if value is None else value


def _deployment_path(name: str) -> str:
    return f"/phitune/deployments/{urllib.parse.quote(name, safe='')}"


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return exc.message


def _plain(obj: Any) -> dict[str, Any]:
    """An openai response object as a dict without null fields (our defaults apply instead)."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return {k: v for k, v in data.items() if v is not None}


def _data(listing: object) -> list[Any]:
    data = listing.get("data") if isinstance(listing, dict) else None
    return data if isinstance(data, list) else []


def _delta(chunk: Any) -> str:
    """The text a streamed chat chunk adds."""
    return "".join(choice.delta.content or "" for choice in chunk.choices)


def _event(event: Any) -> JobEvent:
    return JobEvent.model_validate(_plain(event))


def _checkpoint(checkpoint: Any) -> Checkpoint:
    data = _plain(checkpoint)
    metrics = data.get("metrics") or {}
    data["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return Checkpoint.model_validate(data)


def _model(model: Any) -> ModelObject:
    """A service's model; one without phitune's ``kind`` is ``full`` if fine-tuned (``ft:...``), else ``base``."""
    data = _plain(model)
    data.setdefault("kind", "full" if str(data.get("id", "")).startswith("ft:") else "base")
    return ModelObject.model_validate(data)
