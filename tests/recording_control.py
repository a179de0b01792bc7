"""A trainer ``Control`` that records what a training run reports and never asks it to stop, for tests that call
``phitune.trainer.loop.train`` in their own process."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RecordingControl:
    """Keeps every message (text and data) and the loss of every step."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any] | None]] = []
        self.losses: list[float] = []

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.messages.append((text, data))

    def metrics(self, data: dict[str, Any]) -> None:
        if "train_loss" in data:
            self.losses.append(float(data["train_loss"]))

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None:
        pass

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        pass

    def should_stop(self) -> None:
        return None
