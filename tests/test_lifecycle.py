"""The local backend end to end through the public API: real worker, real trainer, real SQLite."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import phitune
from phitune import _allocator as allocator
from phitune.errors import ConflictError, DatasetError, NotFoundError, SpecError

FAST = {"batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128, "seed": 0}


def _metrics(client: phitune.Client, job_id: str) -> dict[int, float]:
    """train_loss by step (the last value recorded for each step)."""
    losses: dict[int, float] = {}
    for event in client.finetune.events(job_id):
        if event.type == "metrics" and event.data and "train_loss" in event.data:
            losses[int(event.data["step"])] = float(event.data["train_loss"])
    return losses


def _wait_for(predicate, timeout: float = 1800.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def _event(client: phitune.Client, job_id: str, text: str) -> phitune.JobEvent | None:
    """The first event of the job whose message holds ``text``."""
    return next((e for e in client.finetune.events(job_id) if text in e.message), None)


def _worker_pid(home: Path) -> int:
    with sqlite3.connect(home / "phitune.db") as db:
        return int(db.execute("SELECT pid FROM worker").fetchone()[0])


def test_full_lifecycle(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    report = client.files.validate(chat_file, model="tiny-phi3")
    assert report.ok and report.examples == 8 and report.tokens.exact

    uploaded = client.files.upload(chat_file, model="tiny-phi3")
    assert client.files.get(uploaded.id).examples == 8
    job = client.finetune.create(
        model="tiny-phi3",
        training_file=uploaded.id,
        method="lora",
        hyperparameters={**FAST, "max_steps": 6, "checkpoint_every": 3},
        suffix="demo",
    )
    assert job.status == "queued" and job.spec is not None and job.spec.method.type == "lora"

    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    assert job.step == 6 and job.total_steps == 6 and job.trained_tokens and job.trained_tokens > 0
    assert job.fine_tuned_model is not None and job.fine_tuned_model.startswith("ft:tiny-phi3:demo:")
    assert job.id in {j.id for j in client.finetune.list()}

    events = client.finetune.events(job.id)
    (plan,) = [e for e in events if e.message.startswith("training lora on 8 examples: ")]
    assert "6 steps, 3 epochs, 24 examples seen" in plan.message  # max_steps, not the one epoch asked for
    assert plan.data is not None and (plan.data["total_steps"], plan.data["epochs"], plan.data["examples_seen"]) == (
        6,
        3,
        24,
    )
    (load,) = [e.data["load"] for e in events if e.data and "load" in e.data]  # the base's load, with its peak
    assert load["peak_rss_bytes"] > 0 and load["weight_bytes"] > 0 and load["seconds"] >= 0
    kept = any("allocator keeps the memory it frees" in e.message for e in events)  # no PHITUNE_MEMORY_LIMIT here
    assert kept == (allocator.for_trainers() == "mimalloc")
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert [e.data["step"] for e in metrics if e.data] == [1, 2, 3, 4, 5, 6]
    for event in metrics:
        assert event.data is not None
        assert {"step", "train_loss", "learning_rate", "tokens_per_second"} <= event.data.keys()
        assert event.object == "fine_tuning.job.event" and event.level == "info"

    checkpoints = client.finetune.checkpoints(job.id)
    assert [c.step_number for c in checkpoints] == [3]
    assert checkpoints[0].location and (Path(checkpoints[0].location) / "model" / "adapter_config.json").exists()

    model = client.models.get(job.fine_tuned_model)
    assert model.kind == "adapter" and model.path is not None
    adapter = Path(model.path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(home / "models" / "base" / "tiny-phi3")
    loaded = PeftModel.from_pretrained(base, adapter)
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) > 0

    dep = client.deployments.create(model=job.fine_tuned_model, name="my-phi")
    completion = dep.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
    assert completion.object == "chat.completion" and completion.model == job.fine_tuned_model
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert [d.name for d in client.deployments.list()] == ["my-phi"]
    with pytest.raises(ConflictError):
        client.deployments.create(model=job.fine_tuned_model, name="my-phi")
    client.deployments.delete("my-phi")
    assert client.deployments.list() == []
    with pytest.raises(NotFoundError):
        client.deployments.get("my-phi")


def test_worker_killed_mid_job_resumes_from_checkpoint_with_the_same_losses(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    hyperparameters = {**FAST, "max_steps": 14, "checkpoint_every": 4}
    reference = client.finetune.wait(
        client.finetune.create(model="tiny-phi3", training_file=chat_file, hyperparameters=hyperparameters).id,
        timeout=1800,
        progress=False,
    )
    assert reference.status == "succeeded"

    job = client.finetune.create(model="tiny-phi3", training_file=chat_file, hyperparameters=hyperparameters)
    _wait_for(lambda: client.finetune.checkpoints(job.id))
    os.kill(_worker_pid(home), signal.SIGKILL)  # the trainer dies with it (PR_SET_PDEATHSIG)
    last_checkpoint = client.finetune.checkpoints(job.id)[0].step_number

    job = client.finetune.wait(job.id, timeout=1800, progress=False)  # the next call restarts the worker
    assert job.status == "succeeded", job.error
    assert job.step == 14
    events = client.finetune.events(job.id)
    messages = [e.message for e in events]
    assert any("worker restarted" in m for m in messages)
    assert f"resumed from checkpoint at step {last_checkpoint} (attempt 2)" in messages

    expected, resumed = _metrics(client, reference.id), _metrics(client, job.id)
    assert sorted(resumed) == list(range(1, 15))
    for step in range(1, 15):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    # every step event says which attempt ran it: the first ran from step 1 at least to the checkpoint; the second
    # repeats what followed the checkpoint, to the end
    steps = [
        (e.data["attempt"], e.data["step"]) for e in events if e.type == "metrics" and "train_loss" in (e.data or {})
    ]
    first = [step for attempt, step in steps if attempt == 1]
    assert first == list(range(1, len(first) + 1)) and len(first) >= last_checkpoint
    assert [step for attempt, step in steps if attempt == 2] == list(range(last_checkpoint + 1, 15))


def _trainer_pid(home: Path, attempt: int) -> int | None:
    """The pid of the trainer process running ``attempt`` of the home's job, once it runs."""
    worker = psutil.Process(_worker_pid(home))
    for child in worker.children():
        with contextlib.suppress(psutil.Error):
            command = child.cmdline()
            if "phitune.local.attempt" in command and command[command.index("--attempt") + 1] == str(attempt):
                return child.pid
    return None


def test_a_trainer_killed_alone_resumes_from_its_checkpoint(home: Path, chat_file: Path) -> None:
    """The trainer dies (killed, out of memory, a native crash) while its worker lives: the worker restarts the job
    from its last checkpoint, as a new worker does after a worker's death, and says so in the job's events."""
    client = phitune.Client(home=home)
    job = client.finetune.create(
        model="tiny-phi3", training_file=chat_file, hyperparameters={**FAST, "max_steps": 10, "checkpoint_every": 3}
    )
    _wait_for(lambda: client.finetune.checkpoints(job.id))
    os.kill(_wait_for(lambda: _trainer_pid(home, 1)), signal.SIGKILL)
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    restarted = _event(client, job.id, "the trainer was killed by SIGKILL")
    assert restarted is not None and restarted.level == "warn" and restarted.data is not None
    step = restarted.data["step"]
    assert restarted.message == (
        f"the trainer was killed by SIGKILL; it resumes from its checkpoint at step {step} (restart 1 of at most 3)"
    )
    assert _event(client, job.id, f"resumed from checkpoint at step {step} (attempt 2)") is not None


def test_restarts_are_bounded_and_the_failure_says_why_without_paths(
    home: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHITUNE_MAX_RESTARTS", "1")  # the worker this client starts reads it
    client = phitune.Client(home=home)
    job = client.finetune.create(
        model="tiny-phi3", training_file=chat_file, hyperparameters={**FAST, "max_steps": 5000}
    )
    for attempt in (1, 2):
        _wait_for(lambda: client.finetune.get(job.id).status == "running" and _trainer_pid(home, attempt))  # noqa: B023
        os.kill(_wait_for(lambda: _trainer_pid(home, attempt)), signal.SIGKILL)  # noqa: B023
    job = _wait_for(lambda: (j := client.finetune.get(job.id)).done and j)
    assert job.status == "failed" and job.error is not None and job.error.code == "trainer_crashed"
    assert job.error.message.startswith("the trainer was killed by SIGKILL, after 1 restart: the job stops here")
    assert _event(client, job.id, "(restart 1 of at most 1)") is not None
    texts = [job.error.message] + [e.message + json.dumps(e.data) for e in client.finetune.events(job.id)]
    for text in texts:
        assert str(home) not in text and "site-packages" not in text, text


def test_a_dead_workers_job_shows_queued_at_once(home: Path, chat_file: Path) -> None:
    """Listing jobs finds a dead worker as getting one does: its job shows queued (to resume), never running."""
    client = phitune.Client(home=home)
    job = client.finetune.create(
        model="tiny-phi3", training_file=chat_file, hyperparameters={**FAST, "max_steps": 5000}
    )
    _wait_for(lambda: client.finetune.get(job.id).step >= 1)
    os.kill(_worker_pid(home), signal.SIGKILL)
    _wait_for(lambda: _trainer_pid_gone(home))
    listed = {j.id: j.status for j in client.finetune.list()}
    assert listed[job.id] == "queued"
    client.finetune.cancel(job.id)


def _trainer_pid_gone(home: Path) -> bool:
    """Whether no trainer of the home runs (a trainer dies with its worker)."""
    return not any(
        "phitune.local.attempt" in " ".join(p.info["cmdline"] or []) and str(home) in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
    )


def test_cancel_stops_a_running_job_and_keeps_its_checkpoints(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    job = client.finetune.create(
        model="tiny-phi3", training_file=chat_file, hyperparameters={**FAST, "max_steps": 5000, "checkpoint_every": 2}
    )
    _wait_for(lambda: client.finetune.get(job.id).step >= 3)
    cancelled = client.finetune.cancel(job.id)
    assert cancelled.status == "cancelled"
    # the trainer itself says where it stopped (a trainer killed after the worker's grace period could not)
    stopped = _wait_for(lambda: _event(client, job.id, "job cancelled at step"))
    final = client.finetune.get(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None and final.step < 5000
    kept = [c.step_number for c in client.finetune.checkpoints(job.id)]
    assert kept and stopped.message == (
        f"job cancelled at step {final.step}; checkpoints kept: {', '.join(map(str, sorted(kept)))}"
    )
    assert (home / "jobs" / job.id / "train.log").exists()
    with pytest.raises(ConflictError):
        client.finetune.cancel(job.id)


def test_cancel_before_the_first_checkpoint_says_none_is_kept(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    job = client.finetune.create(
        model="tiny-phi3", training_file=chat_file, hyperparameters={**FAST, "max_steps": 5000}
    )
    _wait_for(lambda: client.finetune.get(job.id).step >= 1)
    client.finetune.cancel(job.id)
    stopped = _wait_for(lambda: _event(client, job.id, "job cancelled at step"))
    assert stopped.message == f"job cancelled at step {client.finetune.get(job.id).step}; no checkpoint yet"
    assert client.finetune.checkpoints(job.id) == []


def test_concurrent_uploads_of_one_content(home: Path, chat_file: Path) -> None:
    """Threads uploading the same file at once share one blob; no staging copy stays behind."""
    client = phitune.Client(home=home)  # the home's database exists before the threads start
    start = threading.Barrier(4, timeout=60)

    def upload(_: int) -> phitune.FileObject:
        start.wait()
        return client.files.upload(chat_file)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        uploaded = list(pool.map(upload, range(4)))
    assert len({f.id for f in uploaded}) == 4
    (sha,) = {f.sha256 for f in uploaded}
    blobs = list((home / "files" / sha[:2]).iterdir())
    assert [b.name for b in blobs] == [f"{sha}.jsonl"]  # no temporary copy left behind
    assert blobs[0].read_bytes() == chat_file.read_bytes()
    assert list((home / "tmp").iterdir()) == []


def test_concurrent_clients_share_one_home(home: Path, tmp_path: Path, chat_file: Path) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def submit(index: int) -> None:
        try:
            client = phitune.Client(home=home)
            f = client.files.upload(chat_file)
            job = client.finetune.create(
                model="tiny-phi3", training_file=f.id, hyperparameters={**FAST, "max_steps": 2}, suffix=f"c{index}"
            )
            results.append(job.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 4

    script = (
        "import phitune, sys; c = phitune.Client(home=sys.argv[1]); "
        "f = c.files.upload(sys.argv[2]); print(c.finetune.create(model='tiny-phi3', training_file=f.id, "
        "hyperparameters={'max_steps': 2, 'batch_size': 4}).id)"
    )
    procs = [
        subprocess.run([sys.executable, "-c", script, str(home), str(chat_file)], capture_output=True, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
        results.append(proc.stdout.strip())

    client = phitune.Client(home=home)
    for job_id in results:
        assert client.finetune.wait(job_id, timeout=1800, progress=False).status == "succeeded"
    assert len(client.files.list()) == 6
    assert {j.id for j in client.finetune.list(limit=100)} == set(results)
    page = client.finetune.list(limit=2)
    assert len(page) == 2 and client.finetune.list(limit=100, after=page[-1].id)[0].id not in {p.id for p in page}


def test_invalid_options_are_refused_naming_the_field(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    f = client.files.upload(chat_file)
    cases = [
        ({"hyperparameters": {"lr": 1e-4}}, "hyperparameters.lr"),
        ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
        ({"method": "sgd"}, "method"),
        ({"suffix": "has space"}, "suffix"),
        ({"model": "Phi-3-small-128k-instruct"}, "model"),
        ({"compute": {"compute": "gpu-cluster"}}, "compute"),
    ]
    for options, field in cases:
        with pytest.raises(SpecError) as info:
            client.finetune.create(**{"model": "tiny-phi3", "training_file": f.id, **options})
        assert info.value.field == field, (options, info.value)
    with pytest.raises(NotFoundError):
        client.finetune.create(model="tiny-phi3", training_file="file-missing")
    assert client.finetune.list() == []


def test_a_bad_dataset_is_refused_with_its_lines_and_never_stored(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        "not json\n"
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    client = phitune.Client(home=home)
    with pytest.raises(DatasetError) as info:
        client.files.upload(bad)
    assert info.value.path == str(bad)
    assert {(i.line, i.category) for i in info.value.issues} == {(2, "invalid_json"), (3, "no_assistant")}
    assert f"{bad}:2:" in str(info.value) and f"{bad}:3:" in str(info.value)
    assert client.files.list() == []
    with pytest.raises(DatasetError):
        client.finetune.create(model="tiny-phi3", training_file=bad)
    assert client.finetune.list() == []


def test_import_phitune_stays_light() -> None:
    code = (
        "import sys, phitune; heavy = {m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'transformers', 'peft', 'azure', 'openai', 'fastapi', 'uvicorn', 'numpy'}; print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
