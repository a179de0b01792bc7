"""``phitune demo``: the whole product offline in a few minutes — validate, fine-tune tiny-phi3 with LoRA on a
bundled chat set, deploy, chat, and show the effect: the training loss of the first and last steps, and the answers
to the training questions (asked with the training system prompt) of the base model and of the fine-tune.

:func:`demo_prompts`, :func:`exact_matches` and :func:`loss_range` serve the samples as well."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ._client import Client, default_home
from .types import LoRA

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
    """The bundled demo chat dataset (20 short questions and answers, each under the same system prompt)."""
    return Path(str(resources.files("phitune") / "assets" / "demo_chat.jsonl"))


def demo_prompts(dataset: Path | None = None) -> list[tuple[list[dict[str, str]], str]]:
    """Each example of a chat dataset (default: the demo's) as (its messages up to the answer, the answer): what to
    send a model fine-tuned on it, in the format it was trained on (its system prompt included), and what it should
    say back."""
    prompts = []
    for line in (dataset or demo_dataset()).read_text().splitlines():
        *asked, answer = json.loads(line)["messages"]
        prompts.append((asked, answer["content"]))
    return prompts


class ExactMatches(BaseModel):
    """Greedy answers of a deployment to a dataset's prompts, against the dataset's answers."""

    matches: int
    total: int
    rows: list[tuple[str, str, str]] = Field(description="(question, expected answer, the deployment's answer).")


def exact_matches(client: Client, deployment: str, dataset: Path | None = None) -> ExactMatches:
    """How many of a chat dataset's prompts (default: the demo's) ``deployment`` answers exactly (greedy decoding)."""
    dep = client.deployments.get(deployment)
    rows = []
    for messages, expected in demo_prompts(dataset):
        rows.append((messages[-1]["content"], expected, dep.chat(messages, max_tokens=16).text.strip()))
    return ExactMatches(matches=sum(answer == expected for _, expected, answer in rows), total=len(rows), rows=rows)


def run_demo(home: Path | None = None, steps: int | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    home = home or default_home()
    client = Client(home=home)
    dataset = demo_dataset()
    started = time.monotonic()

    from .tiny import ensure_tiny_phi3

    ensure_tiny_phi3(home / "models" / "base")
    report = client.files.validate(dataset, model="tiny-phi3", epochs=HYPERPARAMETERS["epochs"])
    console.print(
        f"[bold]dataset[/] {dataset.name}: {report.examples} examples, {report.tokens.total} tokens "
        f"({report.tokens.trainable} trainable, tokenizer {report.tokens.tokenizer}), ok={report.ok}"
    )
    training_file = client.files.upload(dataset, model="tiny-phi3")

    run = f"demo-{int(time.time())}"
    client.deployments.create(model="tiny-phi3", name=f"{run}-base")
    before = exact_matches(client, f"{run}-base", dataset)

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
    first_loss, last_loss = loss_range(client, job.id)
    assert job.fine_tuned_model is not None
    client.deployments.create(model=job.fine_tuned_model, name=f"{run}-ft")
    after = exact_matches(client, f"{run}-ft", dataset)
    for name in (f"{run}-base", f"{run}-ft"):
        client.deployments.delete(name)

    shown = 8
    table = Table(title=f"{shown} of the {after.total} training questions, asked as in training (greedy)")
    table.add_column("question")
    table.add_column("expected")
    table.add_column("base model", max_width=24, no_wrap=True, overflow="ellipsis")
    table.add_column("fine-tuned", max_width=24, no_wrap=True, overflow="ellipsis")
    for (question, expected, base_answer), (_, _, answer) in list(zip(before.rows, after.rows, strict=True))[:shown]:
        table.add_row(question, expected, base_answer, answer)
    console.print(table)
    console.print(f"[bold]fine-tuned model[/] {job.fine_tuned_model} at {client.models.get(job.fine_tuned_model).path}")
    console.print(f"[bold]train loss[/] {first_loss:.3f} (step 1) -> {last_loss:.3f} (step {job.step})")
    console.print(
        f"[bold]exact match on the {after.total} training questions:[/] base model {before.matches}/{before.total} "
        f"-> fine-tuned {after.matches}/{after.total}"
    )
    console.print(f"done in {time.monotonic() - started:.0f} s")
    return 0 if after.matches > before.matches and last_loss < first_loss else 1


def loss_range(client: Client, job_id: str) -> tuple[float, float]:
    """The training loss of a job's first and last optimizer steps, from its metrics events."""
    losses = [
        float(e.data["train_loss"])
        for e in client.finetune.events(job_id)
        if e.type == "metrics" and e.data and "train_loss" in e.data
    ]
    return losses[0], losses[-1]
