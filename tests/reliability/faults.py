"""What the fault and abuse suite's tests share: the ledger's rows and the environment of child processes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import phitune

SOURCE = str(Path(phitune.__file__).parents[1])
"""The folder this checkout's phitune is imported from, for the child processes the suite starts."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout's phitune first on its path, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")]), **extra}


@dataclass
class Row:
    """One line of the ledger: of ``tried`` attempts at breaking something, how many it ``survived``, and how many
    ``lost`` data or answered wrong, left something ``stuck`` (a job that never ends, a hung call) or ``leaked``
    (a path in an answer, a file or process left behind)."""

    area: str
    tried: int = 0
    survived: int = 0
    lost: int = 0
    stuck: int = 0
    leaked: int = 0

    def check(self) -> None:
        assert self.tried > 0, f"{self.area}: nothing was tried"
        assert (self.lost, self.stuck, self.leaked) == (0, 0, 0), self
        assert self.survived == self.tried, self
