"""Fine-tune tiny-phi3 with LoRA on the local backend, offline, through the public SDK — the flow of the README.

Run: ``python samples/local_finetune.py`` (a few minutes on 2 CPU cores). State goes to a temporary home folder.

The bundled demo set is 20 short questions, each under one system prompt ("You are a concise assistant. Answer in a
few words."). The fine-tune is asked the same way, so its answers show what training taught it: the sample prints
the training loss of the first and last steps, and how many of the 20 answers match exactly before and after.
"""

from __future__ import annotations

import tempfile

import phitune
from phitune.demo import demo_dataset, demo_prompts, exact_matches, loss_range


def main() -> None:
    phitune.quiet_libraries()  # no warnings or progress bars from transformers, peft, DeepSpeed
    with tempfile.TemporaryDirectory() as home:
        client = phitune.Client(home=home)
        report = client.files.validate(demo_dataset())
        print(f"{report.examples} examples, ~{report.tokens.total} tokens, ok={report.ok}")

        client.deployments.create(model="tiny-phi3", name="base")
        before = exact_matches(client, "base")  # the untrained model's greedy answers to the 20 questions

        training_file = client.files.upload(demo_dataset())
        job = client.finetune.create(
            model="tiny-phi3",
            training_file=training_file.id,
            method=phitune.LoRA(r=16, alpha=32, dropout=0.0),
            hyperparameters={
                "epochs": 100,
                "max_steps": 80,
                "batch_size": 10,
                "learning_rate": 3e-3,
                "warmup_ratio": 0.05,
                "lr_scheduler": "cosine",
                "checkpoint_every": 40,
            },
            suffix="sample",
        )
        job = client.finetune.wait(job.id)
        print(f"{job.id}: {job.status}, {job.step} steps, model {job.fine_tuned_model}")
        for checkpoint in client.finetune.checkpoints(job.id):
            print(f"checkpoint at step {checkpoint.step_number}: {checkpoint.metrics}")
        assert job.fine_tuned_model is not None
        first, last = loss_range(client, job.id)
        print(f"train loss {first:.3f} (step 1) -> {last:.3f} (step {job.step})")

        print("adapter folder:", client.models.get(job.fine_tuned_model).path)
        deployment = client.deployments.create(model=job.fine_tuned_model, name="sample")
        messages, expected = demo_prompts()[1]  # the system prompt and a question, as in training
        reply = deployment.chat(messages, max_tokens=16)
        print(f"Q: {messages[-1]['content']}\nA: {reply.text} (expected {expected}; {reply.usage})")
        after = exact_matches(client, "sample")
        counts = f"base {before.matches}/{before.total} -> fine-tuned {after.matches}/{after.total}"
        print(f"exact match on the training questions: {counts}")
        for name in ("base", "sample"):
            client.deployments.delete(name)


if __name__ == "__main__":
    main()
