"""Experiment tracking: ``integrations=[phitune.MLflow(...), phitune.TensorBoard(...)]`` logged where the job trains,
read back with MLflow's own client and TensorBoard's own event reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

import phitune
from phitune.errors import MissingDependencyError, SpecError, UnsupportedOptionError
from phitune.integrations.tracking import TrackedControl
from phitune.trainer.loop import NullControl

mlflow_tracking = pytest.importorskip("mlflow.tracking")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

FAST = {"epochs": 50, "batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128, "seed": 0}


class Recorder(NullControl):
    """A Control that keeps what it is told."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []
        self.metric_events: list[dict[str, Any]] = []

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.messages.append((level, text))

    def metrics(self, data: dict[str, Any]) -> None:
        self.metric_events.append(data)


def _scalars(folder: Path, tag: str) -> dict[int, float]:
    reader = event_accumulator.EventAccumulator(str(folder))
    reader.Reload()
    return {event.step: event.value for event in reader.Scalars(tag)}


def test_a_job_logs_its_spec_metrics_checkpoints_and_model(home: Path, chat_file: Path, tmp_path: Path) -> None:
    client = phitune.Client(home=home)
    job = client.finetune.create(
        model="tiny-phi3",
        training_file=chat_file,
        hyperparameters={**FAST, "max_steps": 4, "checkpoint_every": 2},
        integrations=[phitune.MLflow(log_checkpoints=True), phitune.TensorBoard(log_dir=str(tmp_path / "tb"))],
    )
    assert job.spec is not None and [i.type for i in job.spec.integrations] == ["mlflow", "tensorboard"]
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    events = client.finetune.events(job.id)
    losses = {e.data["step"]: e.data["train_loss"] for e in events if e.type == "metrics" and e.data}
    assert sorted(losses) == [1, 2, 3, 4]

    # MLflow: the embedded default, an SQLite store under the phitune home
    mlflow = mlflow_tracking.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("phitune").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == job.id
    assert run.data.tags["phitune.job_id"] == job.id and run.data.tags["phitune.method"] == "lora"
    params = run.data.params
    assert params["model"] == "tiny-phi3" and params["method.type"] == "lora" and params["method.r"] == "16"
    assert params["hyperparameters.learning_rate"] == "0.003" and params["hyperparameters.max_steps"] == "4"
    history = mlflow.get_metric_history(run.info.run_id, "train_loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "learning_rate")] == [1, 2, 3, 4]
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert artifacts == {"checkpoints", "model"}
    assert [a.path for a in mlflow.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/step-000002"]
    assert "model/adapter_config.json" in {a.path for a in mlflow.list_artifacts(run.info.run_id, "model")}
    assert any(m.startswith(f"mlflow: logging this job to run {run.info.run_id}") for m in (e.message for e in events))

    # TensorBoard: one folder per job, every metric a scalar at its step
    assert _scalars(tmp_path / "tb" / job.id, "train_loss") == pytest.approx(losses)
    assert sorted(_scalars(tmp_path / "tb" / job.id, "tokens_per_second")) == [1, 2, 3, 4]


def test_a_resumed_job_continues_its_run_and_supersedes_repeated_steps(tmp_path: Path) -> None:
    spec = phitune.JobSpec(
        model="tiny-phi3",
        training_file="file-x",
        integrations=(
            phitune.MLflow(
                tracking_uri=f"sqlite:///{tmp_path / 'ml.db'}", experiment="resume", artifact_location=tmp_path.as_uri()
            ),
            phitune.TensorBoard(log_dir=str(tmp_path / "tb")),
        ),
    )
    first = TrackedControl(Recorder(), spec, job_id="ftjob-1", home=tmp_path)
    for step in (1, 2, 3):
        first.metrics({"step": step, "attempt": 1, "train_loss": 10.0 - step, "learning_rate": 1e-3})
    first.close("paused")
    second = TrackedControl(Recorder(), spec, job_id="ftjob-1", home=tmp_path)  # resumed from the step-2 checkpoint
    for step in (3, 4):
        second.metrics({"step": step, "attempt": 2, "train_loss": 1.0 / step, "learning_rate": 1e-3})
    second.close("succeeded")

    assert _scalars(tmp_path / "tb" / "ftjob-1", "train_loss") == pytest.approx({1: 9.0, 2: 8.0, 3: 1 / 3, 4: 0.25})
    mlflow = mlflow_tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ml.db'}")
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FINISHED"
    assert "attempt" not in run.data.metrics and "step" not in run.data.metrics
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 3, 4]


def test_a_failing_tracker_becomes_a_warning_and_training_goes_on(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    spec = phitune.JobSpec(
        model="tiny-phi3",
        training_file="file-x",
        integrations=(
            phitune.MLflow(tracking_uri=f"sqlite:///{tmp_path / 'a-file' / 'ml.db'}"),  # no store can be made there
            phitune.TensorBoard(log_dir=str(tmp_path / "tb")),
        ),
    )
    inner = Recorder()
    control = TrackedControl(inner, spec, job_id="ftjob-2", home=tmp_path)
    control.metrics({"step": 1, "train_loss": 2.5})
    control.succeeded(tmp_path)
    warnings = [text for level, text in inner.messages if level == "warn"]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow tracking stopped: ")
    assert warnings[0].endswith("training goes on without it")
    assert inner.metric_events == [{"step": 1, "train_loss": 2.5}]  # the store still gets everything
    assert _scalars(tmp_path / "tb" / "ftjob-2", "train_loss") == {1: 2.5}


def test_credentials_in_a_tracking_uri_are_refused() -> None:
    with pytest.raises(SpecError) as info:
        phitune.Client.openai(base_url="http://127.0.0.1:9/v1", api_key="k", phitune_server=True).finetune.create(
            model="tiny-phi3",
            training_file="file-x",
            integrations=[{"type": "mlflow", "tracking_uri": "https://me:s3cret@mlflow.example"}],
        )
    assert info.value.field.startswith("integrations.0") and "s3cret" not in str(info.value)
    assert "MLFLOW_TRACKING_TOKEN" in str(info.value)


def test_backends_that_cannot_track_refuse_integrations_before_sending() -> None:
    sent: list[httpx.Request] = []

    def service(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    for phitune_server in (True, False):
        client = phitune.Client.openai(
            base_url="http://127.0.0.1:9/v1",
            api_key="k",
            phitune_server=phitune_server,
            http_client=httpx.Client(transport=httpx.MockTransport(service)),
        )
        with pytest.raises(UnsupportedOptionError) as info:
            client.finetune.create(model="tiny-phi3", training_file="file-x", integrations=[phitune.TensorBoard()])
        assert info.value.field == "integrations" and info.value.backend == "openai"
    assert sent == []

    spec = phitune.JobSpec(model="Phi-3-mini-4k-instruct", training_file="data.jsonl", integrations=(phitune.MLflow(),))
    with pytest.raises(UnsupportedOptionError) as info:
        phitune.kaito.training_config(spec)
    assert info.value.field == "integrations"


def test_a_missing_tracker_package_is_refused_at_create(
    home: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    client = phitune.Client(home=home)
    with pytest.raises(MissingDependencyError) as info:
        client.finetune.create(model="tiny-phi3", training_file=chat_file, integrations=[phitune.MLflow()])
    assert info.value.extra == "mlflow" and "pip install 'phitune[mlflow]'" in str(info.value)
    assert client.finetune.list() == [] and client.files.list() == []
