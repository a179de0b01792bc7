"""A job's loss curves from its events: drawn in the terminal (plotext) or written as a PNG (matplotlib, the ``plot``
extra). Neither library is imported until a chart is drawn."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from .errors import MissingDependencyError
from .types import JobEvent

if TYPE_CHECKING:
    from ._client import Client

_CURVES = {"train": ("train_loss",), "valid": ("valid_loss", "full_valid_loss")}


class LossCurves(BaseModel):
    """A job's training and validation loss, as ``(step, loss)`` points in step order."""

    job_id: str
    train: list[tuple[int, float]] = []
    valid: list[tuple[int, float]] = []

    @property
    def empty(self) -> bool:
        return not self.train and not self.valid


def loss_curves(job_id: str, events: Iterable[JobEvent]) -> LossCurves:
    """The loss curves in a job's metrics events (oldest first). A resumed job repeats the steps after its checkpoint:
    where events carry ``data["attempt"]``, a point is kept only if no later attempt started at or before its step,
    so each step shows the latest attempt's value; without it, the last value recorded for a step."""
    points: dict[str, dict[tuple[int, int], float]] = {curve: {} for curve in _CURVES}
    first_step: dict[int, int] = {}  # attempt -> its first step
    for event in events:
        data = event.data
        if event.type != "metrics" or not data or not isinstance(data.get("step"), int):
            continue
        attempt, step = int(data.get("attempt", 0)), int(data["step"])
        first_step[attempt] = min(step, first_step.get(attempt, step))
        for curve, keys in _CURVES.items():
            for key in keys:
                value = data.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    points[curve][(attempt, step)] = float(value)

    def current(curve: str) -> list[tuple[int, float]]:
        kept: dict[int, tuple[int, float]] = {}
        for (attempt, step), value in points[curve].items():
            superseded = any(later > attempt and start <= step for later, start in first_step.items())
            if not superseded and (step not in kept or attempt >= kept[step][0]):
                kept[step] = (attempt, value)
        return [(step, kept[step][1]) for step in sorted(kept)]

    return LossCurves(job_id=job_id, train=current("train"), valid=current("valid"))


def job_curves(client: Client, job_id: str) -> LossCurves:
    """The loss curves of a job of ``client``'s backend, from all its events."""
    return loss_curves(job_id, _all_events(client, job_id))


def _all_events(client: Client, job_id: str, page: int = 1000) -> Iterator[JobEvent]:
    after: str | None = None
    while True:
        events = client.finetune.events(job_id, after=after, limit=page)
        yield from events
        if len(events) < page:
            return
        after = events[-1].id


def terminal_chart(
    curves: LossCurves, *, width: int | None = None, height: int | None = None, color: bool = True
) -> str:
    """The curves as a text chart (braille dots), sized to the terminal unless ``width``/``height`` say otherwise."""
    import plotext as plt

    plt.clear_figure()
    for points, label in ((curves.train, "training loss"), (curves.valid, "validation loss")):
        if points:
            plt.plot([s for s, _ in points], [v for _, v in points], label=label, marker="braille")
    plt.title(f"{curves.job_id}: loss" if not curves.empty else f"{curves.job_id}: no loss recorded yet")
    plt.xlabel("step")
    plt.ylabel("loss")
    if width is not None or height is not None:
        plt.plot_size(width or plt.terminal_width(), height or 20)
    chart: str = plt.build().rstrip("\n")
    return chart if color else plt.uncolorize(chart)


def write_png(curves: LossCurves, path: str | Path) -> Path:
    """Write the curves to ``path`` as a PNG image and return the path."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot") from None
    figure = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    for points, label, style in ((curves.train, "training loss", "-"), (curves.valid, "validation loss", "o--")):
        if points:
            axes.plot([s for s, _ in points], [v for _, v in points], style, label=label)
    axes.set(title=f"{curves.job_id}: loss", xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    if not curves.empty:
        axes.legend()
    target = Path(path)
    figure.savefig(target, format="png")
    return target
