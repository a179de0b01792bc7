"""Multi-process training through the public API: DDP, FSDP and DeepSpeed ZeRO 1/2/3 on CPU (gloo, torchrun, two
processes) follow the single-process loss curve of the same global batch; stopped jobs (pause, kill -9) resume on
it; options that cannot run are refused before a job exists.

The expected losses were recorded once from a single-process run of tiny-phi3 (fp32, as torchtune's recipe tests do).
On the machine that recorded them every layout reproduces them to about 1e-6; the tolerance below (torchtune's) leaves
room for CPUs whose kernels round differently. Resumed runs are also compared with uninterrupted ones at 1e-5.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import phitune
from phitune.backends.local import LocalBackend
from phitune.errors import MissingDependencyError, SpecError, UnsupportedOptionError

pytest.importorskip("torch")

LORA: dict[str, Any] = {"type": "lora", "dropout": 0.0}  # dropout draws differ between layouts; without it they agree
HP: dict[str, Any] = {
    "epochs": 50,
    "batch_size": 3,  # 8 examples: micro-batches of 3, 3 and 2, so the two ranks get unequal shares
    "gradient_accumulation_steps": 2,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",  # a shorter run follows the first steps of a longer one
    "max_seq_length": 128,
    "precision": "fp32",
    "seed": 0,
}
EXPECTED = [
    7.820048112135667,
    6.694144112723214,
    5.912382706351902,
    4.414354112413195,
    3.8735790252685547,
    3.0572153174358867,
    2.6707147451547475,
    2.0746081808338994,
    1.7330254600161599,
    1.4396137457627516,
    1.2356940974359927,
    0.9734240940638951,
]
"""train_loss at steps 1..12 of single-process LoRA on tiny-phi3 with ``HP`` (recorded once)."""
RTOL, ATOL = 1e-4, 1e-4
RESUME_RTOL = 1e-5


def _losses(client: phitune.Client, job_id: str) -> list[float]:
    """train_loss by step, the last value recorded for each step (a resumed run repeats the steps it lost)."""
    by_step: dict[int, float] = {}
    for event in client.finetune.events(job_id):
        if event.type == "metrics" and event.data and "train_loss" in event.data:
            by_step[int(event.data["step"])] = float(event.data["train_loss"])
    assert sorted(by_step) == list(range(1, len(by_step) + 1))
    return [by_step[step] for step in sorted(by_step)]


def _run(client: phitune.Client, chat_file: Path, steps: int, **options: Any) -> phitune.FineTuneJob:
    job = client.finetune.create(
        model="tiny-phi3", training_file=chat_file, method=LORA, hyperparameters={**HP, "max_steps": steps}, **options
    )
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    return job


def _kill_worker_after_first_checkpoint(client: phitune.Client, home: Path, job_id: str) -> None:
    """kill -9 the worker once the job has a checkpoint; every trainer process of the job must die with it."""
    deadline = time.monotonic() + 1800
    while not client.finetune.checkpoints(job_id):
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    with sqlite3.connect(home / "phitune.db") as db:
        os.kill(int(db.execute("SELECT pid FROM worker").fetchone()[0]), signal.SIGKILL)
    _wait_until_gone(job_id)


def _wait_until_gone(job_id: str) -> None:
    """Every process of the job (torchrun and its ranks, or the trainer) exits within 30 s."""
    deadline = time.monotonic() + 30
    while _processes_of(job_id):
        assert time.monotonic() < deadline, f"processes of {job_id} still running: {_processes_of(job_id)}"
        time.sleep(0.1)


def _processes_of(job_id: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and job_id.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _assert_resumed(client: phitune.Client, job_id: str) -> None:
    messages = [event.message for event in client.finetune.events(job_id)]
    assert any(message.startswith("resumed from checkpoint at step") for message in messages), messages


def _assert_adapter_trained(adapter: Path, base: Path) -> None:
    """The output loads with peft alone and its LoRA B matrices moved off their zero initialisation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(float(p.abs().sum()) > 0 for p in lora_b)


@pytest.mark.slow
def test_single_process_lora_follows_the_recorded_losses_and_resumes_after_kill_9(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    reference = _losses(client, _run(client, chat_file, 12).id)
    assert reference == pytest.approx(EXPECTED, rel=RTOL, abs=ATOL)

    job = client.finetune.create(
        model="tiny-phi3",
        training_file=chat_file,
        method=LORA,
        hyperparameters={**HP, "max_steps": 12, "checkpoint_every": 3},
    )
    _kill_worker_after_first_checkpoint(client, home, job.id)
    job = client.finetune.wait(job.id, timeout=1800, progress=False)  # restarts the worker, which resumes the job
    assert job.status == "succeeded", job.error
    _assert_resumed(client, job.id)
    assert _losses(client, job.id) == pytest.approx(reference, rel=RESUME_RTOL)


@pytest.mark.slow
def test_fsdp_follows_single_process_and_resumes_after_kill_9(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    fsdp = {"strategy": "fsdp", "nproc": 2}
    uninterrupted = _run(client, chat_file, 8, distributed=fsdp)
    reference = _losses(client, uninterrupted.id)
    assert reference == pytest.approx(EXPECTED[:8], rel=RTOL, abs=ATOL)
    assert uninterrupted.fine_tuned_model is not None
    output = client.models.get(uninterrupted.fine_tuned_model).path
    assert output is not None
    _assert_adapter_trained(Path(output), home / "models" / "base" / "tiny-phi3")

    job = client.finetune.create(
        model="tiny-phi3",
        training_file=chat_file,
        method=LORA,
        hyperparameters={**HP, "max_steps": 8, "checkpoint_every": 3},
        distributed=fsdp,
    )
    _kill_worker_after_first_checkpoint(client, home, job.id)
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    _assert_resumed(client, job.id)
    assert _losses(client, job.id) == pytest.approx(reference, rel=RESUME_RTOL)
    checkpoint = Path(client.finetune.checkpoints(job.id)[0].location or "")
    assert (checkpoint / "trainer_state.pt").exists() and (checkpoint / "model" / "adapter_config.json").exists()


@pytest.mark.slow
def test_ddp_paused_and_resumed_follows_single_process(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    backend = LocalBackend(home)
    job = client.finetune.create(
        model="tiny-phi3",
        training_file=chat_file,
        method=LORA,
        hyperparameters={**HP, "max_steps": 8},
        distributed={"strategy": "ddp", "nproc": 2},
    )
    deadline = time.monotonic() + 1800
    while client.finetune.get(job.id).step < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    backend.pause_job(job.id)  # rank 0 reads the flag; every rank saves its part of the checkpoint and stops
    while not any("job paused at step" in event.message for event in client.finetune.events(job.id)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.finetune.get(job.id).status == "paused" and client.finetune.checkpoints(job.id)
    _wait_until_gone(job.id)
    backend.resume_job(job.id)
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded", job.error
    _assert_resumed(client, job.id)
    assert _losses(client, job.id) == pytest.approx(EXPECTED[:8], rel=RTOL, abs=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        {"zero_stage": 1},
        {"zero_stage": 2},
        {"zero_stage": 3},
        {"zero_stage": 3, "offload_optimizer": True},
    ],
    ids=["zero1", "zero2", "zero3", "zero3-offload"],
)
def test_deepspeed_follows_single_process(home: Path, chat_file: Path, layout: dict[str, Any]) -> None:
    pytest.importorskip("deepspeed")
    client = phitune.Client(home=home)
    job = _run(client, chat_file, 4, distributed={"strategy": "deepspeed", "nproc": 2, **layout})
    assert _losses(client, job.id) == pytest.approx(EXPECTED[:4], rel=RTOL, abs=ATOL)
    assert job.fine_tuned_model is not None
    output = client.models.get(job.fine_tuned_model).path
    assert output is not None
    _assert_adapter_trained(Path(output), home / "models" / "base" / "tiny-phi3")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "layouts"),
    [
        (LORA, [{"strategy": "ddp", "nproc": 2}, {"strategy": "fsdp", "nproc": 2}]),
        ("full", [{"strategy": "fsdp", "nproc": 2}, {"strategy": "deepspeed", "nproc": 2, "zero_stage": 3}]),
    ],
    ids=["lora", "full"],
)
def test_phi4_mini_layouts_follow_its_single_process_curve(
    home: Path, chat_file: Path, method: Any, layouts: list[dict[str, Any]]
) -> None:
    """tiny-phi4-mini (partial rotary, tied input and output embeddings, grouped-query attention) trains the same
    curve on one process and on two: LoRA with DDP and FSDP, full fine-tuning — the tied embedding sharded — with
    FSDP and DeepSpeed ZeRO-3; the full output keeps its embeddings tied."""
    if any(layout["strategy"] == "deepspeed" for layout in layouts):
        pytest.importorskip("deepspeed")
    client = phitune.Client(home=home)
    options = {"model": "tiny-phi4-mini", "training_file": chat_file, "method": method}
    hyperparameters = {**HP, "max_steps": 3}

    def losses(**layout: Any) -> tuple[list[float], phitune.FineTuneJob]:
        job = client.finetune.create(**options, hyperparameters=hyperparameters, **layout)
        job = client.finetune.wait(job.id, timeout=1800, progress=False)
        assert job.status == "succeeded", job.error
        return _losses(client, job.id), job

    reference, _ = losses()
    for layout in layouts:
        curve, job = losses(distributed=layout)
        assert curve == pytest.approx(reference, rel=RTOL, abs=ATOL), layout
    assert job.fine_tuned_model is not None
    output = Path(client.models.get(job.fine_tuned_model).path or "")
    if method == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(output)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        _assert_adapter_trained(output, home / "models" / "base" / "tiny-phi4-mini")


@pytest.mark.slow
def test_phi35_moe_expert_adapters_train_with_ddp_and_fsdp(home: Path, chat_file: Path) -> None:
    """tiny-phi3.5-moe's LoRA (attention and every expert) under DDP and FSDP: each rank's router draws its own
    jitter and Gumbel samples, so the curve follows the single process's statistically, not to the digit; DDP and
    FSDP, which draw alike, agree with each other."""
    client = phitune.Client(home=home)
    curves = []
    for layout in (
        {},
        {"distributed": {"strategy": "ddp", "nproc": 2}},
        {"distributed": {"strategy": "fsdp", "nproc": 2}},
    ):
        job = client.finetune.create(
            model="tiny-phi3.5-moe",
            training_file=chat_file,
            method=LORA,
            hyperparameters={**HP, "max_steps": 3},
            **layout,
        )
        job = client.finetune.wait(job.id, timeout=1800, progress=False)
        assert job.status == "succeeded", job.error
        curves.append(_losses(client, job.id))
    single, ddp, fsdp = curves
    assert fsdp == pytest.approx(ddp, rel=RTOL, abs=ATOL)
    assert ddp == pytest.approx(single, rel=0.05) and ddp[-1] < ddp[0]


def test_options_that_cannot_run_here_are_refused_naming_the_field(
    home: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = phitune.Client(home=home)
    uploaded = client.files.upload(chat_file)
    prompt_tuning = {"type": "peft", "config": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}}
    cases: list[tuple[dict[str, Any], type[SpecError], str]] = [
        ({"distributed": {"strategy": "ddp", "nproc": 512}}, UnsupportedOptionError, "distributed.nproc"),
        (
            {"method": "qlora", "distributed": {"strategy": "fsdp", "nproc": 2}},
            UnsupportedOptionError,
            "distributed.strategy",
        ),
        (
            {"method": "qlora", "distributed": {"strategy": "deepspeed", "nproc": 2}},
            UnsupportedOptionError,
            "distributed.strategy",
        ),
        (
            {"method": prompt_tuning, "distributed": {"strategy": "fsdp", "nproc": 2}},
            UnsupportedOptionError,
            "distributed.strategy",
        ),
        (
            {"distributed": {"strategy": "ddp", "nproc": 2}, "hyperparameters": {"batch_size": 1}},
            SpecError,
            "hyperparameters.batch_size",
        ),
        ({"distributed": {"strategy": "ddp", "nproc": 2, "offload_optimizer": True}}, SpecError, "distributed"),
        ({"distributed": {"strategy": "fsdp", "nproc": 2, "zero_stage": 3}}, SpecError, "distributed"),
        ({"distributed": {"nproc": 2}}, SpecError, "distributed"),
    ]
    for options, error, field in cases:
        with pytest.raises(error) as info:
            client.finetune.create(model="tiny-phi3", training_file=uploaded.id, **options)
        assert info.value.field == field, (options, info.value)

    with pytest.raises(SpecError) as info:  # peft's adapters on expert tensors take no dropout (LoRA's default 0.05)
        client.finetune.create(model="tiny-phi3.5-moe", training_file=uploaded.id, method="lora")
    assert info.value.field == "method.dropout"

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if the distributed extra were not installed
    with pytest.raises(MissingDependencyError, match=r"phitune\[distributed\]"):
        client.finetune.create(
            model="tiny-phi3", training_file=uploaded.id, distributed={"strategy": "deepspeed", "nproc": 2}
        )
    assert client.finetune.list() == []
