"""Fine-tune tiny-phi3 with LoRA on the local backend, offline, through the public SDK — the flow of the README.

Run: ``python samples/local_finetune.py`` (about a minute on 2 CPU cores). State goes to a temporary home folder.
"""

from __future__ import annotations

import tempfile

import phitune
from phitune.demo import demo_dataset


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        client = phitune.Client(home=home)
        report = client.files.validate(demo_dataset())
        print(f"{report.examples} examples, ~{report.tokens.total} tokens, ok={report.ok}")

        training_file = client.files.upload(demo_dataset())
        job = client.finetune.create(
            model="tiny-phi3",
            training_file=training_file.id,
            method=phitune.LoRA(r=16, alpha=32, dropout=0.0),
            hyperparameters={
                "epochs": 100,
                "max_steps": 60,
                "batch_size": 10,
                "learning_rate": 3e-3,
                "checkpoint_every": 20,
            },
            suffix="sample",
        )
        job = client.finetune.wait(job.id)
        print(f"{job.id}: {job.status}, {job.step} steps, model {job.fine_tuned_model}")
        for checkpoint in client.finetune.checkpoints(job.id):
            print(f"checkpoint at step {checkpoint.step_number}: {checkpoint.metrics}")
        assert job.fine_tuned_model is not None

        print("adapter folder:", client.models.get(job.fine_tuned_model).path)
        deployment = client.deployments.create(model=job.fine_tuned_model, name="sample")
        reply = deployment.chat([{"role": "user", "content": "What is the capital of Japan?"}], max_tokens=16)
        print("reply:", reply.text, reply.usage)
        client.deployments.delete("sample")


if __name__ == "__main__":
    main()
