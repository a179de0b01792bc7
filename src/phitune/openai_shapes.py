"""OpenAI's fine-tuning wire shapes and how they map onto phitune's :class:`~phitune.types.JobSpec`.

Used in both directions: ``phitune serve`` turns an OpenAI job request into a ``JobSpec`` and a ``FineTuneJob`` into
an OpenAI ``fine_tuning.job``; the OpenAI backend turns a ``JobSpec`` into a request. Only pydantic is imported here.

The mapping (OpenAI name → phitune name):

==================================================  =======================================================
``method.supervised.hyperparameters.n_epochs``      ``hyperparameters.epochs``; a job whose length
                                                    ``hyperparameters.max_steps`` sets shows ``"auto"``
``method.supervised.hyperparameters.batch_size``    ``hyperparameters.batch_size``
``...learning_rate_multiplier``                     ``hyperparameters.learning_rate`` = multiplier * the method's
                                                    base learning rate (:data:`BASE_LEARNING_RATE`: 2e-4 for LoRA,
                                                    QLoRA, DoRA and other PEFT tuners, 2e-5 for full fine-tuning)
``seed``                                            ``hyperparameters.seed``
``suffix``, ``validation_file``                     the same names
``"auto"`` or absent                                phitune's default (the base learning rate for the multiplier)
``extra_body={"phitune": {...}}``                   ``method``, ``hyperparameters``, ``distributed``, ``task``
==================================================  =======================================================
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._specs import build_spec
from .errors import SpecError, UnsupportedOptionError
from .types import Checkpoint, FileObject, FineTuneJob, JobEvent, JobSpec, ModelObject, Task

SERVER_NAME = "phitune serve"
ORGANIZATION_ID = "phitune"

BASE_LEARNING_RATE: dict[str, float] = {"lora": 2e-4, "qlora": 2e-4, "dora": 2e-4, "peft": 2e-4, "full": 2e-5}
"""The learning rate that ``learning_rate_multiplier`` 1.0 (or ``"auto"``) stands for, by method."""


def base_learning_rate(method: str) -> float:
    return BASE_LEARNING_RATE.get(method, BASE_LEARNING_RATE["lora"])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAIHyperparameters(_Strict):
    """``method.supervised.hyperparameters`` (or the legacy top-level ``hyperparameters``)."""

    n_epochs: int | Literal["auto"] | None = None
    batch_size: int | Literal["auto"] | None = None
    learning_rate_multiplier: float | Literal["auto"] | None = None


class _Supervised(_Strict):
    hyperparameters: OpenAIHyperparameters = Field(default_factory=OpenAIHyperparameters)


class OpenAIMethod(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: _Supervised | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class PhituneOptions(_Strict):
    """The ``phitune`` object of a job request (``extra_body={"phitune": {...}}`` in the openai client).

    ``method`` is a method name (``"lora"``, ``"qlora"``, ``"dora"``, ``"full"``) or a method object
    (``{"type": "lora", "r": 8, "alpha": 16}``, ``{"type": "peft", "config": {...}}``); ``hyperparameters`` takes
    :class:`~phitune.types.Hyperparameters` names (``max_steps``, ``max_seq_length``, ``checkpoint_every``, ...);
    ``distributed`` a :class:`~phitune.types.Distributed` object; ``task`` ``chat_completion`` or ``text_completion``.
    """

    method: str | dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    distributed: dict[str, Any] | None = None
    task: Task | None = None


class JobCreateRequest(_Strict):
    """The body of ``POST /v1/fine_tuning/jobs``. Unknown fields are refused, naming the field."""

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: OpenAIHyperparameters | None = None
    method: OpenAIMethod | None = None
    seed: int | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    phitune: PhituneOptions | None = None


def _method_type(method: str | dict[str, Any] | None) -> str:
    if method is None:
        return "lora"
    return method if isinstance(method, str) else str(method.get("type", "lora"))


def spec_from_request(request: JobCreateRequest) -> tuple[JobSpec, dict[str, str]]:
    """The :class:`JobSpec` an OpenAI job request asks for, and where each hyperparameter came from (for
    :func:`request_param`). A :class:`SpecError`'s ``field`` is the request parameter to change
    (``method.supervised.hyperparameters.n_epochs``, ``phitune.hyperparameters.max_steps``, ...)."""
    if request.method is not None and request.hyperparameters is not None:
        raise SpecError("hyperparameters", "give method.supervised.hyperparameters or the legacy hyperparameters")
    if request.method is not None and request.method.type != "supervised":
        raise UnsupportedOptionError("method.type", SERVER_NAME, f"{request.method.type!r}; use 'supervised'")
    if request.metadata:
        raise UnsupportedOptionError("metadata", SERVER_NAME, "job metadata is not stored")
    if request.integrations:
        raise UnsupportedOptionError("integrations", SERVER_NAME, "no integrations are available")
    if request.method is not None:
        source = "method.supervised.hyperparameters"
        openai_hp = (request.method.supervised or _Supervised()).hyperparameters
    else:
        source, openai_hp = "hyperparameters", request.hyperparameters or OpenAIHyperparameters()
    options = request.phitune or PhituneOptions()
    hyper = dict(options.hyperparameters)
    origin: dict[str, str] = {}

    def put(param: str, name: str, value: object) -> None:
        if value is None or value == "auto":
            return
        if name in hyper and hyper[name] != value:
            raise SpecError(param, f"{value!r} conflicts with phitune.hyperparameters.{name}={hyper[name]!r}")
        hyper[name] = value
        origin[f"hyperparameters.{name}"] = param

    put(f"{source}.n_epochs", "epochs", openai_hp.n_epochs)
    put(f"{source}.batch_size", "batch_size", openai_hp.batch_size)
    put("seed", "seed", request.seed)
    base = base_learning_rate(_method_type(options.method))
    multiplier = openai_hp.learning_rate_multiplier
    if isinstance(multiplier, (int, float)):
        param = f"{source}.learning_rate_multiplier"
        if "learning_rate" in hyper:
            raise SpecError(param, "give learning_rate_multiplier or phitune.hyperparameters.learning_rate, not both")
        if multiplier <= 0:
            raise SpecError(param, "must be greater than 0")
        hyper["learning_rate"] = multiplier * base
        origin["hyperparameters.learning_rate"] = param
    hyper.setdefault("learning_rate", base)
    try:
        spec = build_spec(
            model=request.model,
            training_file=request.training_file,
            validation_file=request.validation_file,
            method=options.method,
            hyperparameters=hyper,
            distributed=options.distributed,
            suffix=request.suffix,
            task=options.task,
        )
    except SpecError as exc:
        exc.field = request_param(exc.field, origin)
        raise
    return spec, origin


def request_param(field: str, origin: dict[str, str]) -> str:
    """The request parameter behind a :class:`JobSpec` field: its OpenAI name where it came from one, else its
    place in the ``phitune`` object (``model``, files and ``suffix`` keep their names)."""
    if field in origin:
        return origin[field]
    return f"phitune.{field}" if field.split(".")[0] in ("method", "hyperparameters", "distributed", "task") else field


def openai_hyperparameters(spec: JobSpec) -> dict[str, Any]:
    """A spec's hyperparameters in OpenAI's names. ``n_epochs`` is ``"auto"`` where ``max_steps`` overrides the
    epochs: the steps decide how many passes over the data there are."""
    hp = spec.hyperparameters
    return {
        "n_epochs": hp.epochs if hp.max_steps is None else "auto",
        "batch_size": hp.batch_size,
        "learning_rate_multiplier": hp.learning_rate / base_learning_rate(spec.method.type),
    }


def job_to_openai(job: FineTuneJob) -> dict[str, Any]:
    """A job as OpenAI's ``fine_tuning.job`` object, plus phitune's fields (``spec``, ``step``, ``total_steps``)."""
    data = job.model_dump(mode="json")
    hyperparameters = openai_hyperparameters(job.spec) if job.spec is not None else {}
    data.update(
        organization_id=ORGANIZATION_ID,
        result_files=[],
        integrations=[],
        metadata=None,
        hyperparameters=hyperparameters,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )
    return data


_SERVER_PATH_KEYS = frozenset({"location", "path"})


def event_to_openai(event: JobEvent) -> dict[str, Any]:
    """An event without the server-side folders some name in their data (``location`` of a checkpoint,
    ``load.path`` of a base model), at any depth."""
    data = event.model_dump(mode="json")
    if data["data"]:
        data["data"] = _without_paths(data["data"])
    return data


def _without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k not in _SERVER_PATH_KEYS}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return value


def checkpoint_to_openai(checkpoint: Checkpoint) -> dict[str, Any]:
    """A checkpoint without its server-side folder."""
    return checkpoint.model_dump(mode="json", exclude={"location"})


def file_to_openai(file: FileObject) -> dict[str, Any]:
    return file.model_dump(mode="json")


def model_to_openai(model: ModelObject) -> dict[str, Any]:
    """A model without its server-side folder."""
    return model.model_dump(mode="json", exclude={"path"})
