""":func:`validate` (the report of a whole file, in one process or several) and :func:`parse` (the examples the
trainer takes, read as the validator reads them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..catalog import find
from ..errors import SpecError
from ..types import DatasetReport
from .examples import Example
from .parallel import _scan_in_parallel
from .reading import open_dataset
from .scan import _Scan, _scan_all, _Settings
from .tokens import ApproximateCounter, TokenCounter

DEFAULT_WORKERS = 4
"""Processes a large file is checked in by default (where the machine has as many CPUs)."""

_PARALLEL_MIN_BYTES = 1 << 25
"""Smaller files are checked in one process whatever ``workers`` says: starting processes costs about 30 ms of CPU,
what one process takes to check 15 MB."""


def validate(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    max_seq_length: int | None = None,
    epochs: int = 1,
    counter: TokenCounter | None = None,
    max_errors: int = 1000,
    workers: int | None = None,
) -> DatasetReport:
    """Check every line of a JSONL dataset in one streaming pass with bounded memory.

    ``model`` (a catalog name) sets the context length beyond which an example is a ``too_long`` error; beyond
    ``max_seq_length`` it is a warning (the example will be truncated). ``counter`` defaults to
    :class:`ApproximateCounter`. ``error_count`` counts every error; ``errors`` and ``warnings`` keep the first
    ``max_errors`` each. Token statistics cover the valid examples, before any truncation.

    A file of more than 32 MiB is checked in ``workers`` processes (default: one per CPU, at most
    ``DEFAULT_WORKERS``; forked where the platform allows, else ``counter`` must pickle), each reading its own ranges
    of whole lines; the report is the same as with one. ``workers=1`` keeps it in this process.
    Raises ``OSError`` when the file cannot be read, :class:`~phitune.errors.DatasetError` (``not_a_file``) when it
    is not a regular file, and :class:`~phitune.errors.SpecError` for invalid arguments.
    """
    if epochs < 1:
        raise SpecError("epochs", f"must be at least 1, got {epochs}")
    if max_seq_length is not None and max_seq_length < 1:
        raise SpecError("max_seq_length", f"must be at least 1, got {max_seq_length}")
    if max_errors < 0:
        raise SpecError("max_errors", f"must not be negative, got {max_errors}")
    if workers is None:
        workers = min(os.cpu_count() or 1, DEFAULT_WORKERS)
    if workers < 1:
        raise SpecError("workers", f"must be at least 1, got {workers}")
    entry = find(model) if model else None
    settings = _Settings(
        counter or ApproximateCounter(),
        (entry.name, entry.context_length) if entry else None,
        max_seq_length,
        max_errors,
    )
    scan = _Scan(settings)
    with open_dataset(path) as file:
        size = os.fstat(file.fileno()).st_size
        if workers > 1 and size > _PARALLEL_MIN_BYTES:
            _scan_in_parallel(scan, file, os.fspath(path), size, workers)
        else:
            size = _scan_all(scan, file)
    return scan.report(os.fspath(path), size, epochs)


@dataclass(frozen=True)
class ParsedDataset:
    """The well-formed examples of a dataset file, each with its 1-based line, and the report of the pass that
    found them (its ``errors`` name every line left out)."""

    examples: list[tuple[int, Example]]
    report: DatasetReport


def parse(path: str | os.PathLike[str], *, max_errors: int = 1000) -> ParsedDataset:
    """Read a dataset as :func:`validate` does, in this process and with no length limit, keeping its examples: what
    the trainer encodes, so that it takes exactly the lines the validator accepts."""
    scan = _Scan(_Settings(ApproximateCounter(), None, None, max_errors), keep=[])
    with open_dataset(path) as file:
        size = _scan_all(scan, file)
    assert scan.keep is not None
    return ParsedDataset(scan.keep, scan.report(os.fspath(path), size, 1))
