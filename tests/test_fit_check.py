"""The fit check of local jobs end to end: refusal before anything is stored, the opt-out, the first ETA, the
``phitune jobs estimate`` command and the ETA in ``wait``'s progress."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import phitune
from phitune.backends.local import LocalBackend
from phitune.cli import main
from phitune.errors import SpecError, WontFitError
from phitune.estimate import memory_limit
from phitune.resources.finetune import _Progress
from phitune.types import FineTuneJob, JobSpec

GiB = 2**30
TINY = {"batch_size": 4, "max_seq_length": 128, "max_steps": 2}


def test_a_job_that_cannot_fit_is_refused_before_anything_is_stored(
    home: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHITUNE_MEMORY_LIMIT", "6GiB")
    client = phitune.Client(home=home)
    with pytest.raises(WontFitError) as caught:  # Phi-3-mini's bf16 weights alone are 7.1 GiB
        client.finetune.create(model="Phi-3-mini-4k-instruct", training_file=chat_file, method="lora")
    error = caught.value
    assert error.estimate.peak_bytes > 7 * GiB and error.estimate.available_bytes == 6 * GiB
    assert error.estimate.examples == 8  # token lengths from the training file
    assert "GiB at its peak" in str(error) and "6.0 GiB is available" in str(error)
    assert any(s.startswith("method='qlora'") for s in error.suggestions) and error.suggestions[0] in str(error)
    assert client.finetune.list() == [] and client.files.list() == []  # the file this call uploaded is gone too
    assert not (home / "jobs").exists()

    monkeypatch.setenv("PHITUNE_MEMORY_LIMIT", "1MiB")  # below the runtime itself: the machine it needs is named
    uploaded = client.files.upload(chat_file)
    with pytest.raises(WontFitError, match=r"on a machine \(or GPU\) with ~\d+ GiB or more"):
        client.finetune.create(model="tiny-phi3", training_file=uploaded.id, hyperparameters=TINY)
    assert client.finetune.list() == [] and [f.id for f in client.files.list()] == [uploaded.id]

    monkeypatch.setenv("PHITUNE_SKIP_FIT_CHECK", "1")
    job = client.finetune.create(model="tiny-phi3", training_file=uploaded.id, hyperparameters=TINY)
    assert job.status == "queued" and job.estimated_finish is None
    client.finetune.cancel(job.id)


def test_a_model_whose_shape_is_unknown_is_not_refused(
    home: Path, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PHITUNE_MEMORY_LIMIT", "1")
    folder = tmp_path / "other-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "something-else", "n_embd": 64}))
    client = phitune.Client(home=home)
    uploaded = client.files.upload(chat_file)
    assert isinstance(client.backend, LocalBackend)
    # no decoder dimensions in its config.json: the fit check has nothing to refuse it with (the model is refused
    # after it, as one that cannot be loaded)
    with pytest.raises(SpecError, match="no causal language model"):
        client.backend.check_spec(JobSpec(model=str(folder), training_file=uploaded.id))
    assert "fit check skipped" in caplog.text
    with pytest.raises(SpecError, match="HF_HUB_OFFLINE"):
        client.backend.check_spec(JobSpec(model="someone/not-downloaded", training_file=uploaded.id))


def test_a_local_job_starts_with_the_predicted_finish(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    job = client.finetune.create(model="tiny-phi3", training_file=chat_file, hyperparameters=TINY)
    try:
        assert job.estimated_finish is not None
        assert job.created_at < job.estimated_finish < job.created_at + 600  # 2 steps of a 0.8M-parameter model
        assert client.finetune.get(job.id).estimated_finish is not None
    finally:
        client.finetune.cancel(job.id)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1073741824", GiB), ("2GiB", 2 * GiB), ("2g", 2 * GiB), ("1.5 GB", 1_500_000_000), ("512MiB", 2**29)],
)
def test_memory_limit_sizes(monkeypatch: pytest.MonkeyPatch, text: str, expected: int) -> None:
    monkeypatch.setenv("PHITUNE_MEMORY_LIMIT", text)
    assert memory_limit() == expected


@pytest.mark.parametrize("text", ["lots", "2GiBs", "0", "-1GiB", "2 Gi"])
def test_memory_limit_that_is_no_size_names_the_variable(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("PHITUNE_MEMORY_LIMIT", text)
    with pytest.raises(SpecError) as caught:
        memory_limit()
    assert caught.value.field == "PHITUNE_MEMORY_LIMIT"


def test_cli_jobs_estimate(
    home: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ["--model", "tiny-phi3", "--training-file", str(chat_file), "--hp", "batch_size=2"]
    assert main(["--home", str(home), "jobs", "estimate", *options]) == 0
    out = capsys.readouterr().out
    assert "memory at the peak (GiB): runtime " in out and "GiB available: fits" in out
    assert "per epoch: 8 examples" in out and "4 steps" in out and "tokens/s" in out

    assert main(["--home", str(home), "--json", "jobs", "estimate", *options]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["fits"] and dumped["steps_per_epoch"] == 4 and dumped["memory"]["runtime"] > 0

    monkeypatch.setenv("PHITUNE_MEMORY_LIMIT", "6GiB")
    mini = ["--model", "Phi-3-mini-4k-instruct", "--training-file", str(chat_file)]
    assert main(["--home", str(home), "jobs", "estimate", *mini]) == 1
    out = capsys.readouterr().out
    assert "of 6.00 GiB available: does NOT fit" in out and "  - method='qlora': ~" in out

    assert main(["--home", str(home), "jobs", "create", *mini]) == 2  # refused: an error, nothing created
    assert "6.0 GiB is available" in capsys.readouterr().err
    assert phitune.Client(home=home).finetune.list() == []


def test_wait_progress_shows_the_time_left(capsys: pytest.CaptureFixture[str]) -> None:
    now = int(time.time())
    job = FineTuneJob(
        id="ftjob-x", created_at=now, status="running", model="m", training_file="f", step=3, total_steps=10
    )
    with _Progress(job.id, enabled=True) as bar:
        bar.update(job, [])
        assert bar._progress.tasks[0].fields["eta"] == ""
        bar.update(job.model_copy(update={"estimated_finish": now + 95}), [])
        assert bar._progress.tasks[0].fields["eta"] in ("ETA 0:01:35", "ETA 0:01:34", "ETA 0:01:33")
    assert "ETA 0:01:3" in capsys.readouterr().out
    with _Progress(job.id, enabled=True) as bar:
        bar.update(job.model_copy(update={"estimated_finish": now + 95, "status": "succeeded"}), [])
        assert bar._progress.tasks[0].fields["eta"] == ""
