"""``phitune demo``: the whole product offline in a few minutes — validate, fine-tune tiny-phi3 with LoRA on a
bundled chat set, deploy, chat, and show the effect (loss and exact-match answers before and after)."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

from ._client import Client, default_home
from .types import FineTuneJob, LoRA

DEMO_STEPS = 80
HYPERPARAMETERS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 10,
    "learning_rate": 3e-3,
    "warmup_ratio": 0.05,
    "lr_scheduler": "cosine",
    "max_seq_length": 256,
    "seed": 0,
    "checkpoint_every": 40,
}


def demo_dataset() -> Path:
    """The bundled demo chat dataset (20 short questions and answers)."""
    return Path(str(resources.files("phitune") / "assets" / "demo_chat.jsonl"))


def exact_matches(client: Client, deployment: str, dataset: Path) -> tuple[int, int, list[tuple[str, str, str]]]:
    """(matches, total, rows of question/expected/answer) of greedy answers on the dataset's prompts."""
    import json

    rows = []
    matches = 0
    dep = client.deployments.get(deployment)
    for line in dataset.read_text().splitlines():
        messages = json.loads(line)["messages"]
        expected = messages[-1]["content"]
        answer = dep.chat(messages[:-1], max_tokens=16).text.strip()
        matches += answer == expected
        rows.append((messages[-2]["content"], expected, answer))
    return matches, len(rows), rows


def run_demo(home: Path | None = None, steps: int | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    home = home or default_home()
    client = Client(home=home)
    dataset = demo_dataset()
    started = time.monotonic()

    from .trainer.tiny import ensure_tiny_phi3

    ensure_tiny_phi3(home / "models" / "base")
    report = client.files.validate(dataset, model="tiny-phi3", epochs=HYPERPARAMETERS["epochs"])
    console.print(
        f"[bold]dataset[/] {dataset.name}: {report.examples} examples, {report.tokens.total} tokens "
        f"({report.tokens.trainable} trainable, tokenizer {report.tokens.tokenizer}), ok={report.ok}"
    )
    training_file = client.files.upload(dataset, model="tiny-phi3")

    run = f"demo-{int(time.time())}"
    client.deployments.create(model="tiny-phi3", name=f"{run}-base")
    before, total, _ = exact_matches(client, f"{run}-base", dataset)

    job = client.finetune.create(
        model="tiny-phi3",
        training_file=training_file.id,
        method=LoRA(r=16, alpha=32, dropout=0.0),
        hyperparameters={**HYPERPARAMETERS, "max_steps": steps or DEMO_STEPS},
        suffix="demo",
    )
    console.print(f"[bold]job[/] {job.id} {job.status}")
    job = client.finetune.wait(job.id, progress=console.is_terminal, poll_interval=0.5)
    if job.status != "succeeded":
        console.print(f"[red]job {job.status}[/]: {job.error.message if job.error else ''}")
        return 1
    first_loss, last_loss = _loss_range(client, job)
    assert job.fine_tuned_model is not None
    client.deployments.create(model=job.fine_tuned_model, name=f"{run}-ft")
    after, _, rows = exact_matches(client, f"{run}-ft", dataset)
    for name in (f"{run}-base", f"{run}-ft"):
        client.deployments.delete(name)

    table = Table("question", "expected", "fine-tuned answer", title="held-in prompts (greedy)")
    for question, expected, answer in rows[:8]:
        table.add_row(question, expected, answer)
    console.print(table)
    console.print(f"[bold]fine-tuned model[/] {job.fine_tuned_model} at {client.models.get(job.fine_tuned_model).path}")
    console.print(f"[bold]train loss[/] {first_loss:.3f} (step 1) -> {last_loss:.3f} (step {job.step})")
    console.print(f"[bold]exact match[/] before {before}/{total} -> after {after}/{total}")
    console.print(f"done in {time.monotonic() - started:.0f} s")
    return 0 if after > before and last_loss < first_loss else 1


def _loss_range(client: Client, job: FineTuneJob) -> tuple[float, float]:
    losses = [
        float(e.data["train_loss"])
        for e in client.finetune.events(job.id)
        if e.type == "metrics" and e.data and "train_loss" in e.data
    ]
    return losses[0], losses[-1]
