"""How long a job trains: ``max_steps`` overrides ``epochs`` (Hugging Face's meaning), everything that predicts the
steps agrees, and a resumed run repeats the uninterrupted one across epoch boundaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import write_chat
from phitune.openai_shapes import openai_hyperparameters
from phitune.trainer.loop import NullControl
from phitune.types import Hyperparameters, JobSpec


def test_max_steps_overrides_epochs_and_cycles_through_the_data() -> None:
    plan = Hyperparameters(batch_size=4, max_steps=30).plan(80)  # 20 steps per epoch
    assert (plan.total_steps, plan.examples_seen(), plan.epochs()) == (30, 120, 1.5)
    assert plan.describe() == "30 steps, 1.5 epochs, 120 examples seen"
    assert plan.epochs(20) == 1.0 and plan.epochs(25) == 1.25

    short = Hyperparameters(epochs=3, batch_size=4, max_steps=5).plan(80)  # fewer steps than the epochs would take
    assert (short.total_steps, short.epochs()) == (5, 0.25)

    ragged = Hyperparameters(batch_size=3, max_steps=5).plan(8)  # passes of 3, 3 and 2 examples
    assert (ragged.batches_per_epoch, ragged.examples_seen(), ragged.describe()) == (
        3,
        14,
        "5 steps, 1.75 epochs, 14 examples seen",
    )


def test_without_max_steps_every_epoch_trains() -> None:
    plan = Hyperparameters(epochs=3, batch_size=4, gradient_accumulation_steps=2).plan(10)  # 3 micro-batches a pass
    assert (plan.micro_batches, plan.total_steps, plan.examples_seen(), plan.epochs()) == (9, 5, 30, 3.0)
    assert plan.epochs(1) == 0.8 and plan.describe() == "5 steps, 3 epochs, 30 examples seen"
    assert Hyperparameters(batch_size=8).plan(8).describe() == "1 step, 1 epoch, 8 examples seen"


def test_openai_shapes_show_no_epoch_count_where_max_steps_decides() -> None:
    steps = JobSpec(model="tiny-phi3", training_file="file-x", hyperparameters={"epochs": 3, "max_steps": 30})
    assert openai_hyperparameters(steps)["n_epochs"] == "auto"
    epochs = JobSpec(model="tiny-phi3", training_file="file-x", hyperparameters={"epochs": 3})
    assert openai_hyperparameters(epochs)["n_epochs"] == 3


class _Recorder(NullControl):
    """A loop :class:`~phitune.trainer.loop.Control` that keeps the loop's messages and step metrics."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any] | None]] = []
        self.steps: list[dict[str, Any]] = []

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.messages.append((text, data))

    def metrics(self, data: dict[str, Any]) -> None:
        if "train_loss" in data:
            self.steps.append(data)


def test_max_steps_trains_past_an_epoch_and_a_resume_across_the_boundary_repeats_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    from phitune.trainer.loop import TrainRun, iter_checkpoints, train

    train_file = write_chat(tmp_path / "train.jsonl")  # 8 examples: passes of 3, 3 and 2 at batch_size 3
    hp = {"batch_size": 3, "max_steps": 5, "checkpoint_every": 2, "learning_rate": 3e-3, "max_seq_length": 128}
    spec = JobSpec(model="tiny-phi3", training_file=str(train_file), hyperparameters=hp)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()

    def run(output: str, resume_from: Path | None = None, attempt: int = 1) -> tuple[_Recorder, Any]:
        control = _Recorder()
        folders = (tmp_path / output, checkpoints, resume_from)
        result = train(TrainRun(spec, str(tiny_model_dir), train_file, None, *folders, attempt=attempt), control)
        return control, result

    whole, result = run("whole")
    assert result.status == "succeeded" and result.step == result.total_steps == 5
    (first,) = [(text, data) for text, data in whole.messages if text.startswith("training ")]
    assert "5 steps, 1.75 epochs, 14 examples seen" in first[0]
    assert first[1] is not None and (first[1]["total_steps"], first[1]["epochs"], first[1]["examples_seen"]) == (
        5,
        1.75,
        14,
    )
    assert [m["step"] for m in whole.steps] == [1, 2, 3, 4, 5]
    assert [m["epoch"] for m in whole.steps] == [0.375, 0.75, 1.0, 1.375, 1.75]
    assert {m["attempt"] for m in whole.steps} == {1}

    step_2 = next(p for p in iter_checkpoints(checkpoints) if p.name == "step-000002")
    # steps 3 (the pass's short batch), 4 and 5 (the next pass), marked as the second attempt's
    resumed, result = run("resumed", resume_from=step_2, attempt=2)
    assert result.status == "succeeded" and result.step == 5
    assert ("resumed from checkpoint at step 2 (attempt 2)", {"step": 2, "attempt": 2}) in resumed.messages
    assert [(m["step"], m["attempt"]) for m in resumed.steps] == [(3, 2), (4, 2), (5, 2)]
    for again, before in zip(resumed.steps, whole.steps[2:], strict=True):
        assert again["train_loss"] == pytest.approx(before["train_loss"], rel=1e-5, abs=1e-6), again["step"]
