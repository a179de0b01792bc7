"""A trainer ``Control`` that records what a training run reports and never asks it to stop, for tests that call
``phitune.trainer.loop.train`` in their own process."""

from __future__ import annotations

from typing import Any

from phitune.trainer.loop import NullControl


class RecordingControl(NullControl):
    """Keeps every message (text and data) and the loss of every step."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any] | None]] = []
        self.losses: list[float] = []

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.messages.append((text, data))

    def metrics(self, data: dict[str, Any]) -> None:
        if "train_loss" in data:
            self.losses.append(float(data["train_loss"]))
