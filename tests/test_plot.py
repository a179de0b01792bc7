"""``phitune jobs plot``: a job's loss curves in the terminal and as a PNG, from its stored events."""

from __future__ import annotations

from pathlib import Path

import pytest

from phitune import JobEvent, JobSpec
from phitune.cli import main
from phitune.local.store import Store
from phitune.plot import LossCurves, loss_curves


def _metrics(step: int, **values: float) -> JobEvent:
    return JobEvent(id=f"ftevent-{step}", created_at=0, message="m", type="metrics", data={"step": step, **values})


def test_each_step_shows_the_latest_attempt_that_reached_it() -> None:
    events = [
        JobEvent(id="ftevent-0", created_at=0, message="attempt 1 started", data={"attempt": 1}),
        *(_metrics(step, attempt=1, train_loss=10.0 - step) for step in (1, 2, 3, 4)),
        _metrics(4, attempt=1, valid_loss=7.5),
        # the worker died after step 4; attempt 2 resumed from the step-2 checkpoint and was cancelled after step 3
        *(_metrics(step, attempt=2, train_loss=1.0 / step) for step in (3,)),
        *(_metrics(step, attempt=3, train_loss=0.1 * step) for step in (4, 5)),
        _metrics(5, attempt=3, full_valid_loss=0.4),
    ]
    curves = loss_curves("ftjob-1", events)
    assert curves.train == [(1, 9.0), (2, 8.0), (3, pytest.approx(1 / 3)), (4, pytest.approx(0.4)), (5, 0.5)]
    assert curves.valid == [(5, 0.4)]  # attempt 1's step-4 validation was superseded by attempt 3


def test_without_attempts_the_last_value_of_a_step_counts() -> None:
    events = [_metrics(1, train_loss=3.0), _metrics(2, train_loss=2.0), _metrics(2, train_loss=1.5)]
    assert loss_curves("ftjob-2", events) == LossCurves(job_id="ftjob-2", train=[(1, 3.0), (2, 1.5)])


@pytest.fixture
def job_id(tmp_path: Path) -> str:
    store = Store(tmp_path / "home")
    job, _ = store.create_job(JobSpec(model="tiny-phi3", training_file="file-x"), idempotency_key="k")
    for step in range(1, 11):
        data = {"step": step, "attempt": 1, "train_loss": 3.0 / step, "learning_rate": 1e-3}
        if step % 5 == 0:
            data["valid_loss"] = 3.5 / step
        store.add_event(job.id, "metrics", type="metrics", data=data)
    return job.id


def test_jobs_plot_draws_in_the_terminal(tmp_path: Path, job_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(tmp_path / "home")
    assert main(["--home", home, "jobs", "plot", job_id, "--width", "70", "--height", "18"]) == 0
    chart = capsys.readouterr().out
    lines = chart.splitlines()
    assert f"{job_id}: loss" in lines[0] and "\x1b[" not in chart  # not a terminal: no colour codes
    assert "training loss" in chart and "validation loss" in chart and "step" in chart
    assert len(lines) == 18 and max(len(line) for line in lines) <= 70
    assert any(c in chart for c in "⠁⠂⠄⡀⢀⠈⠐⠠")  # braille dots: the curves


def test_jobs_plot_writes_a_png(tmp_path: Path, job_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "loss.png"
    assert main(["--home", str(tmp_path / "home"), "jobs", "plot", job_id, "--png", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 10_000
