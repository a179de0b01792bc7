"""The demo's prompts: asked the way the demo set trains the model."""

from __future__ import annotations

import json

from phitune.demo import demo_dataset, demo_prompts


def test_demo_prompts_are_the_training_messages_without_the_answer() -> None:
    prompts = demo_prompts()
    lines = [json.loads(line)["messages"] for line in demo_dataset().read_text().splitlines()]
    assert len(prompts) == len(lines) == 20
    for (messages, expected), trained in zip(prompts, lines, strict=True):
        assert messages == trained[:-1] and expected == trained[-1]["content"]
        assert messages[0] == {"role": "system", "content": "You are a concise assistant. Answer in a few words."}
        assert messages[-1]["role"] == "user"
