"""Serve the local backend with ``phitune serve``, fine-tune tiny-phi3 through the official ``openai`` client, chat.

Runs offline in a few minutes on a laptop CPU::

    python samples/serve_and_openai.py [HOME]        # default: a fresh temporary folder

It starts ``python -m phitune.server`` (what ``phitune serve`` runs) on a free loopback port, with an API key passed
through the environment (never on the command line, where ``ps`` would show it), then uses nothing but ``openai``:
upload, a LoRA job with phitune-only options in ``extra_body``, events, checkpoints, chat (plain and streamed).

The demo set's 20 questions all come under one system prompt; every chat here sends it too, as in training. The
training loss of the first and last steps and the exact-match count of the base model and of the fine-tune on those
20 questions show what the job taught the model.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from phitune.demo import demo_dataset, demo_prompts

PROMPTS = demo_prompts()  # (system prompt and question, expected answer) of each training example


def start_server(home: Path, api_key: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PHITUNE_API_KEY": api_key, "PHITUNE_WORKER_IDLE_TIMEOUT": "10", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "phitune.server", "--home", str(home), "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/phitune", headers={"Authorization": f"Bearer {api_key}"}).status_code == 200:
                return server, base_url
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"phitune serve exited with status {server.returncode}")
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("phitune serve did not start within 60 s")


def exact_matches(client: openai.OpenAI, model: str) -> int:
    """How many of the training questions ``model`` answers exactly (greedy)."""
    matches = 0
    for messages, expected in PROMPTS:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
        matches += (reply.choices[0].message.content or "").strip() == expected
    return matches


def main(home: Path) -> None:
    api_key = secrets.token_urlsafe(24)
    server, base_url = start_server(home, api_key)
    try:
        client = openai.OpenAI(base_url=base_url, api_key=api_key)
        before = exact_matches(client, "tiny-phi3")

        with open(demo_dataset(), "rb") as fh:  # 20 short questions and answers
            training_file = client.files.create(file=fh, purpose="fine-tune")
        print(f"uploaded {training_file.filename}: {training_file.id}")

        job = client.fine_tuning.jobs.create(
            model="tiny-phi3",
            training_file=training_file.id,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 100, "batch_size": 10, "learning_rate_multiplier": 15}},
            },  # learning rate = 15 x LoRA's base 2e-4 = 3e-3
            seed=0,
            suffix="sample",
            # phitune-only options: anything of phitune.JobSpec that OpenAI's shape cannot say
            extra_body={
                "phitune": {
                    "method": {"type": "lora", "r": 16, "alpha": 32},
                    "hyperparameters": {
                        "max_steps": 120,
                        "warmup_ratio": 0.05,
                        "lr_scheduler": "cosine",
                        "max_seq_length": 256,
                        "checkpoint_every": 40,
                    },
                }
            },
        )
        print(f"job {job.id}: {job.status}")
        last_event = ""
        while job.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(1)
            job = client.fine_tuning.jobs.retrieve(job.id)
            latest = client.fine_tuning.jobs.list_events(job.id, limit=1).data  # newest first, as OpenAI
            if latest and latest[0].message != last_event:
                last_event = latest[0].message
                print(f"  [{job.status}] {last_event}")
        if job.status != "succeeded":
            raise SystemExit(f"job {job.status}: {job.error}")
        model = job.fine_tuned_model
        assert model is not None
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        print(f"fine-tuned model {model}; checkpoints at steps {[c.step_number for c in checkpoints]}")
        metrics = [  # (step, train_loss) of the job's metrics events, oldest first
            (event.data["step"], event.data["train_loss"])
            for event in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100)))
            if event.type == "metrics" and isinstance(event.data, dict) and "train_loss" in event.data
        ]
        (first_step, first_loss), (last_step, last_loss) = metrics[0], metrics[-1]
        print(f"train loss {first_loss:.3f} (step {first_step}) -> {last_loss:.3f} (step {last_step})")

        for messages, expected in (PROMPTS[0], PROMPTS[6]):
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
            tokens = reply.usage.completion_tokens if reply.usage else "?"
            answer = reply.choices[0].message.content
            print(f"Q: {messages[-1]['content']}\nA: {answer}  (expected {expected}; {tokens} tokens)")
        after, total = exact_matches(client, model), len(PROMPTS)
        print(f"exact match on the {total} training questions: base {before}/{total} -> fine-tuned {after}/{total}")

        messages, _ = PROMPTS[11]
        print(f"streamed: {messages[-1]['content']} ", end="")
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
            elif chunk.usage is not None:
                print(f"  ({chunk.usage.completion_tokens} tokens)")

        print("models:", ", ".join(m.id for m in client.models.list()))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="phitune-serve-") as folder:
            main(Path(folder))
