"""The public, typed objects of phitune.

Requests (``JobSpec`` and its parts) refuse unknown fields so that a typo is an error naming the field; responses
(``FineTuneJob``, ``JobEvent``, ...) tolerate unknown fields so that a newer service does not break an older SDK.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypedDict, cast

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

if TYPE_CHECKING:
    from .backends.base import Backend, OpenAIEndpoint

JobStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
"""The OpenAI job statuses, plus ``paused`` (Azure and ``phitune serve`` can pause a job)."""

TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

DatasetFormat = Literal["chat", "prompt_completion", "text_ground_truth"]
Task = Literal["chat_completion", "text_completion"]

PHI3_LORA_TARGETS: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""Phi-3's fused attention and MLP projections: the LoRA targets that cover every linear layer of a decoder block
(Phi-3, Phi-3.5-mini, Phi-4-mini and Phi-4 alike: all ``Phi3ForCausalLM``)."""
PHIMOE_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Phi-3.5-MoE's attention projections (separate, not fused): its linear layers besides the router."""
PHI3_SMALL_LORA_TARGETS: tuple[str, ...] = ("query_key_value", "dense", "up_proj", "down_proj")
"""Phi-3-small's projections: fused ``query_key_value`` (per key/value group: its queries, key, value) and
interleaved ``up_proj`` (gate and linear columns alternating), each adapted whole, so an adapter follows the fused
layout."""
PHIMOE_EXPERT_TARGETS: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")
"""Phi-3.5-MoE's expert weights, ``[experts, out, in]`` tensors that peft adapts through ``target_parameters``: each
expert gets its own rank-r adapter, so every expert's MLP is fine-tuned as a dense model's MLP is. The router is no
target: it stays frozen, as fine-tuning recipes for mixture-of-experts models keep it (a trained router can collapse
onto few experts)."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Response(BaseModel):
    """Base of every response object: unknown fields from newer services are kept, not rejected."""

    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------------------------------------- methods
class _LoRAOptions(_Request):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] | None = Field(
        None,
        description="Module names to adapt; None: every linear layer of a decoder block but a router (Phi-3's fused "
        "projections PHI3_LORA_TARGETS; Phi-3-small's PHI3_SMALL_LORA_TARGETS; Phi-3.5-MoE's attention "
        "PHIMOE_LORA_TARGETS).",
    )
    target_parameters: tuple[str, ...] | None = Field(
        None,
        description="Mixture-of-experts models: expert tensors to adapt (peft target_parameters); None: every "
        "expert's (PHIMOE_EXPERT_TARGETS); (): none, the experts stay frozen. Dense models have none.",
    )

    def targets(self, model_type: str = "phi3") -> tuple[str, ...]:
        """The modules adapted on a model of this ``config.json`` ``model_type``."""
        defaults = {"phimoe": PHIMOE_LORA_TARGETS, "phi3small": PHI3_SMALL_LORA_TARGETS}
        return self.target_modules or defaults.get(model_type, PHI3_LORA_TARGETS)

    def expert_targets(self, model_type: str = "phi3") -> tuple[str, ...]:
        """The expert tensors adapted on a model of this ``model_type`` (none on a dense model)."""
        if self.target_parameters is not None:
            return self.target_parameters
        return PHIMOE_EXPERT_TARGETS if model_type == "phimoe" else ()


class LoRA(_LoRAOptions):
    """Low-rank adapters on a frozen base (peft ``LoraConfig``)."""

    type: Literal["lora"] = "lora"


class QLoRA(_LoRAOptions):
    """LoRA on a base quantised to 4 bits by bitsandbytes (NF4 with double quantisation by default)."""

    type: Literal["qlora"] = "qlora"
    bits: Literal[4] = Field(4, description="Bits per quantised weight.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="The 4-bit data type: NormalFloat or float.")
    double_quant: bool = Field(True, description="Quantise the quantisation scales too (~0.37 bits per weight less).")


class DoRA(_LoRAOptions):
    """Weight-decomposed low-rank adaptation (peft ``use_dora=True``)."""

    type: Literal["dora"] = "dora"


class Full(_Request):
    """Full fine-tuning: every weight trains; the output is a complete transformers model folder."""

    type: Literal["full"] = "full"


class PEFT(_Request):
    """Any other peft tuner, given as a peft config dict (``{"peft_type": "IA3", ...}``)."""

    type: Literal["peft"] = "peft"
    config: dict[str, Any]

    @field_validator("config")
    @classmethod
    def _has_peft_type(cls, config: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(config.get("peft_type"), str):
            raise ValueError("config needs a 'peft_type' string, e.g. {'peft_type': 'IA3'}")
        return config


Method = Annotated[LoRA | QLoRA | DoRA | Full | PEFT, Field(discriminator="type")]
METHOD_NAMES: tuple[str, ...] = ("lora", "qlora", "dora", "full", "peft")


# ---------------------------------------------------------------------------------------------- hyperparameters
class Hyperparameters(_Request):
    """Training hyperparameters. ``batch_size`` is the global batch (examples per micro-step, all processes).
    docs/hyperparameters.md says which backend takes which."""

    epochs: int = Field(1, ge=1, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Train exactly this many optimizer steps, overriding epochs (as Hugging Face TrainingArguments "
        "does): the data is cycled through, each pass reshuffled by the seed, and the learning-rate schedule spans "
        "max_steps.",
    )
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate of AdamW.")
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per micro-batch, every process together.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(1024, ge=16, le=131072, description="Longer examples are cut to this many tokens.")
    warmup_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of the steps over which the learning rate rises from 0."
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="How the learning rate falls after the warm-up."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW's decoupled weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Clip the gradient norm to this; None: no clipping.")
    seed: int = Field(0, ge=0, description="Seeds the data order and the adapter's initialisation.")
    checkpoint_every: int | None = Field(None, ge=1, description="Save a resumable checkpoint every N steps.")
    eval_every: int | None = Field(None, ge=1, description="Validation loss every N steps (needs validation_file).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, more time."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the CPU/GPU supports it, else fp32."
    )
    drop_untrainable_examples: bool = Field(
        False,
        description="Train without the examples that keep no token with loss within max_seq_length (the job's "
        "events say which); by default such examples refuse the job.",
    )

    def plan(self, examples: int) -> TrainingPlan:
        """The optimizer steps of training on ``examples`` examples: ``max_steps`` where set, else every epoch's."""
        if examples < 1:
            raise ValueError(f"a training plan needs at least one example, got {examples}")
        if self.max_steps is not None:
            micro_batches = self.max_steps * self.gradient_accumulation_steps
        else:
            micro_batches = self.epochs * math.ceil(examples / self.batch_size)
        return TrainingPlan(
            examples=examples,
            batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            micro_batches=micro_batches,
            total_steps=math.ceil(micro_batches / self.gradient_accumulation_steps),
        )


class TrainingPlan(Response):
    """The optimizer steps a job takes over its training examples (:meth:`Hyperparameters.plan`). Micro-batches
    stream through the data one pass after another, each pass a fresh seeded shuffle; an optimizer step takes
    ``gradient_accumulation_steps`` of them (the last step of an epochs-long run may take fewer)."""

    examples: int = Field(description="Training examples that carry loss.")
    batch_size: int
    gradient_accumulation_steps: int
    micro_batches: int = Field(description="Micro-batches of the whole run.")
    total_steps: int

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches of one pass over the examples (the last may hold fewer than ``batch_size``)."""
        return math.ceil(self.examples / self.batch_size)

    def examples_seen(self, step: int | None = None) -> int:
        """Examples fed to the model by the end of ``step`` (default: the whole run), counting repeats."""
        micro = self.micro_batches if step is None else min(step * self.gradient_accumulation_steps, self.micro_batches)
        passes, within = divmod(micro, self.batches_per_epoch)
        return passes * self.examples + min(within * self.batch_size, self.examples)

    def epochs(self, step: int | None = None) -> float:
        """Passes over the examples by the end of ``step`` (default: the whole run); fractional mid-pass."""
        return self.examples_seen(step) / self.examples

    def describe(self) -> str:
        """E.g. ``30 steps, 1.5 epochs, 120 examples seen``."""
        steps, epochs = self.total_steps, round(self.epochs(), 2)
        return (
            f"{steps} step{'' if steps == 1 else 's'}, {epochs:g} epoch{'' if epochs == 1 else 's'}, "
            f"{self.examples_seen()} examples seen"
        )


# ------------------------------------------------------------------------------------------------ distributed
class Distributed(_Request):
    """Multi-process training through an existing engine (torchrun for DDP/FSDP, DeepSpeed for ZeRO)."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="none: one process; ddp or fsdp through torchrun; deepspeed: DeepSpeed ZeRO."
    )
    nproc: int = Field(1, ge=1, le=1024, description="Training processes.")
    zero_stage: Literal[1, 2, 3] | None = Field(None, description="DeepSpeed's ZeRO stage; None: stage 2.")
    offload_optimizer: bool = Field(False, description="DeepSpeed: keep the optimizer state in CPU memory.")

    @model_validator(mode="after")
    def _consistent(self) -> Distributed:
        if self.strategy != "deepspeed" and (self.zero_stage is not None or self.offload_optimizer):
            raise ValueError("zero_stage and offload_optimizer apply to strategy='deepspeed' only")
        if self.strategy == "none" and self.nproc != 1:
            raise ValueError("nproc > 1 needs a strategy: 'ddp', 'fsdp' or 'deepspeed'")
        return self


# ------------------------------------------------------------------------------------------------ azure compute
class AzureCompute(_Request):
    """Run an Azure job on managed compute (Models as a Platform) instead of serverless (Models as a Service)."""

    compute: str | None = Field(None, description="Name of an Azure ML compute cluster in the workspace.")
    instance_types: tuple[str, ...] | None = Field(None, description="Serverless compute instance types.")
    job_tier: Literal["Spot", "Basic", "Standard", "Premium"] | None = None

    @model_validator(mode="after")
    def _some_target(self) -> AzureCompute:
        if self.compute is None and not self.instance_types:
            raise ValueError("give compute (a cluster name) or instance_types")
        return self


# ------------------------------------------------------------------------------------------------ integrations
_URI_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@?#]*@")


class MLflow(_Request):
    """Log a job to MLflow where it trains: the spec as parameters, every metric at its step, checkpoints (on
    request) and the final model as artefacts. Credentials come from the trainer's environment
    (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), never from the URI."""

    type: Literal["mlflow"] = "mlflow"
    tracking_uri: str | None = Field(
        None, description="None: an SQLite store under the phitune home (mlflow/mlflow.db), artefacts beside it."
    )
    experiment: str = Field("phitune", min_length=1, description="Created where it does not exist.")
    artifact_location: str | None = Field(None, description="Where a new experiment keeps its artefacts.")
    run_name: str | None = Field(None, description="None: the job id.")
    log_checkpoints: bool = Field(False, description="Upload every checkpoint folder as an artefact.")
    log_model: bool = Field(True, description="Upload the fine-tuned model folder as an artefact.")

    @field_validator("tracking_uri", "artifact_location")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value is not None and _URI_CREDENTIALS.match(value):
            raise ValueError(
                "put no credentials in the URI; set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD"
            )
        return value


class TensorBoard(_Request):
    """Write TensorBoard event files where the job trains: every metric as a scalar at its step, in
    ``log_dir/<job id>`` (a resumed job's repeated steps replace the ones they supersede)."""

    type: Literal["tensorboard"] = "tensorboard"
    log_dir: str | None = Field(None, description="None: tensorboard/ under the phitune home.")


Integration = Annotated[MLflow | TensorBoard, Field(discriminator="type")]
"""An experiment tracker a job logs to (``JobSpec.integrations``)."""


# ----------------------------------------------------------------------------------------------------- job spec
_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class JobOptions(TypedDict, total=False):
    """A job's options besides its model and files: the keyword arguments that ``finetune.create`` and
    ``finetune.estimate`` take beside them, each as the :class:`JobSpec` field of that name takes it."""

    method: str | Method
    hyperparameters: Hyperparameters | Mapping[str, Any] | None
    distributed: Distributed | Mapping[str, Any] | None
    suffix: str | None
    task: Task | None
    compute: AzureCompute | Mapping[str, Any] | None
    integrations: Sequence[Integration | Mapping[str, Any]] | None


class JobSpec(_Request):
    """One fine-tuning job, the same for every backend. Backends translate it; they never change its meaning."""

    model: str = Field(min_length=1, description="Catalog name, Hugging Face id, local folder or Azure model id.")
    training_file: str = Field(min_length=1, description="A file id from files.upload (or a local path).")
    validation_file: str | None = None
    method: Method = Field(default_factory=LoRA)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    distributed: Distributed = Field(default_factory=Distributed)
    suffix: str | None = None
    task: Task | None = Field(None, description="chat_completion or text_completion; inferred from the data if None.")
    compute: AzureCompute | None = Field(None, description="Azure managed compute; None means serverless (MaaS).")
    integrations: tuple[Integration, ...] = Field(
        (), description="Experiment trackers the job logs to where it trains (phitune.MLflow, phitune.TensorBoard)."
    )

    @field_validator("method", mode="before")
    @classmethod
    def _method_by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in METHOD_NAMES or value == "peft":
                raise ValueError(f"unknown method {value!r}; use one of lora, qlora, dora, full or phitune.PEFT(...)")
            return {"type": value}
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix_shape(cls, value: str | None) -> str | None:
        if value is not None and not _SUFFIX.match(value):
            raise ValueError("suffix must be 1-40 characters of letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _eval_needs_validation(self) -> JobSpec:
        if self.hyperparameters.eval_every is not None and self.validation_file is None:
            raise ValueError("hyperparameters.eval_every needs a validation_file")
        return self


# --------------------------------------------------------------------------------------------------- datasets
DatasetIssueCategory = Literal[
    "invalid_json",
    "invalid_utf8",
    "not_an_object",
    "unknown_format",
    "missing_messages",
    "empty_messages",
    "invalid_message",
    "unknown_role",
    "turn_order",
    "no_assistant",
    "non_string_content",
    "empty_content",
    "too_long",
    "empty_file",
    "mixed_formats",
    "chat_markup",
    "not_a_file",
]


class DatasetIssue(Response):
    """One problem in a dataset. ``line`` is 1-based (0 for whole-file problems such as an empty file)."""

    line: int
    category: DatasetIssueCategory
    message: str


class TokenStats(Response):
    """Token counts of a dataset. ``exact`` is False when no tokenizer was available and counts are estimates."""

    total: int = 0
    trainable: int = Field(0, description="Tokens that carry loss (assistant turns / completions).")
    min: int = 0
    max: int = 0
    mean: float = 0.0
    p95: int = 0
    tokenizer: str = "approximate"
    exact: bool = False


class DatasetReport(Response):
    """The result of validating a dataset in one streaming pass."""

    path: str
    ok: bool
    format: DatasetFormat | None = None
    examples: int = 0
    errors: list[DatasetIssue] = Field(default_factory=list)
    error_count: int = Field(0, description="All errors found; ``errors`` keeps the first ``max_errors``.")
    warnings: list[DatasetIssue] = Field(default_factory=list)
    tokens: TokenStats = Field(default_factory=TokenStats)
    bytes: int = 0
    epochs: int = 1
    estimated_trained_tokens: int = Field(0, description="Trainable tokens times epochs.")


# ---------------------------------------------------------------------------------------------------- objects
class FileObject(Response):
    """A dataset stored by a backend (OpenAI ``file`` shape)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str = "fine-tune"
    status: str = "processed"
    format: DatasetFormat | None = None
    examples: int | None = None
    sha256: str | None = None


class JobError(Response):
    """Why a job failed: a ``code``, a ``message`` for the user and the ``param`` at fault, if any."""

    code: str
    message: str
    param: str | None = None


class FineTuneJob(Response):
    """A fine-tuning job (OpenAI ``fine_tuning.job`` shape, plus the full ``spec``)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    status: JobStatus
    model: str
    training_file: str
    validation_file: str | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    started_at: int | None = None
    error: JobError | None = None
    trained_tokens: int | None = None
    seed: int = 0
    suffix: str | None = None
    estimated_finish: int | None = None
    backend: str = "local"
    spec: JobSpec | None = None
    step: int = Field(0, description="Optimizer steps done so far.")
    total_steps: int | None = None

    @property
    def done(self) -> bool:
        """Whether the job reached a terminal status (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES


class JobEvent(Response):
    """A job event (OpenAI ``fine_tuning.job.event`` shape). Metrics events carry ``data`` with at least
    ``step``, ``train_loss``, ``learning_rate`` and ``tokens_per_second``."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


def metrics_message(data: dict[str, Any]) -> str:
    """The message of a metrics event: ``metrics: step=10 train_loss=1.234 ...``."""
    return "metrics: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in data.items())


class Checkpoint(Response):
    """A saved, resumable point of a job (OpenAI ``fine_tuning.job.checkpoint`` shape)."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float] = Field(default_factory=dict)
    location: str | None = Field(None, description="Where the checkpoint lies (a folder or URI).")
    fine_tuned_model_checkpoint: str | None = None


class ModelObject(Response):
    """A base or fine-tuned model (OpenAI ``model`` shape). ``path`` is set for models stored locally."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "phitune"
    kind: Literal["base", "adapter", "full"] = "base"
    base_model: str | None = None
    job_id: str | None = None
    path: str | None = None


# ------------------------------------------------------------------------------------------------------- chat
class ChatMessage(Response):
    """One message of a chat completion."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatChoice(Response):
    """One answer of a chat completion, with why generation stopped."""

    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"] | None = None


class Usage(Response):
    """Tokens a chat completion read and wrote."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(Response):
    """An OpenAI-shaped chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's content."""
        return self.choices[0].message.content if self.choices else ""

    @classmethod
    def from_openai(cls, response: Any) -> ChatCompletion:
        """Convert an ``openai`` package ``ChatCompletion`` (any OpenAI-compatible service's answer)."""
        usage = response.usage
        return cls(
            id=response.id,
            created=response.created,
            model=response.model,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=ChatMessage(role="assistant", content=c.message.content or ""),
                    finish_reason=c.finish_reason if c.finish_reason in ("stop", "length") else None,
                )
                for c in response.choices
            ],
            usage=None
            if usage is None
            else Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
        )


class Deployment(Response):
    """A model served for chat. ``chat`` sends an OpenAI-shaped chat completion request to it."""

    name: str
    model: str
    status: Literal["creating", "succeeded", "failed", "deleting"] = "succeeded"
    created_at: int
    endpoint: str | None = Field(None, description="Base URL of an OpenAI-compatible endpoint, where there is one.")
    engine: str = "torch"
    backend: str = "local"

    _backend: Backend | None = PrivateAttr(default=None)

    def bind(self, backend: Backend) -> Deployment:
        """Attach the backend that ``chat`` sends to; the resources do this for every deployment they return."""
        self._backend = backend
        return self

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> ChatCompletion:
        """Send a chat completion to this deployment."""
        return self._bound().chat(
            self.name, messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
        )

    def openai_client(self) -> Any:
        """An ``openai.OpenAI`` client for this deployment's OpenAI-compatible endpoint (where the backend has one)."""
        backend = self._bound()
        backend.capabilities.require("openai_endpoint", "openai_client", backend.name)
        return cast("OpenAIEndpoint", backend).openai_client(self.name)

    def _bound(self) -> Backend:
        if self._backend is None:
            from .errors import ConflictError

            raise ConflictError(
                "this Deployment object is not bound to a client; use client.deployments.chat(name, messages)"
            )
        return self._backend


def fine_tuned_model_id(spec: JobSpec, job_id: str) -> str:
    """``ft:<base>:<suffix>:<short job id>`` (the OpenAI shape)."""
    base = Path(spec.model.rstrip("/")).name
    return f"ft:{base}:{spec.suffix or ''}:{job_id.split('-', 1)[-1][:8]}"
