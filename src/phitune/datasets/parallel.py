"""Validation of a large file in worker processes, each checking ranges of whole lines; their tallies add up, in file
order, to the report one process makes."""

from __future__ import annotations

import itertools
import math
import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from io import FileIO

from .._process import die_with_parent
from ..types import DatasetFormat
from .reading import _chunks
from .scan import _Scan, _Settings
from .tally import _Tally

_PIECE_BYTES = 1 << 23
"""About the most bytes one task of a parallel pass checks (a file splits into a multiple of ``workers`` tasks)."""


def _scan_in_parallel(scan: _Scan, file: FileIO, path: str, size: int, workers: int) -> None:
    """Tally the whole file into ``scan`` with ``workers`` processes, each reading a chunk at a time.

    One process checks the lines up to the first well-formed one, which sets the file's format; the rest of the file
    splits into ranges of whole lines (a multiple of ``workers`` of them) that the processes check in that format,
    at most two a process submitted at a time. Their tallies add up here, in file order. This process counts no
    token, so that no fork copies a tokenizer's threads mid-use.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(scan.settings,))
    try:
        head, fmt, format_line, start = pool.submit(_scan_head, path).result()
        scan.tally.add(head)
        if fmt is None or start >= size:
            return
        scan.adopt(fmt, format_line)
        pieces = math.ceil((size - start) / (workers * _PIECE_BYTES)) * workers
        bounds = _line_starts(file, start, size, math.ceil((size - start) / pieces))
        running: deque[Future[_Tally]] = deque()  # in file order
        for a, b in itertools.pairwise(bounds):
            running.append(pool.submit(_scan_range, (path, a, b, fmt, format_line)))
            if len(running) > 2 * workers:
                scan.tally.add(running.popleft().result())
        while running:
            scan.tally.add(running.popleft().result())
    finally:
        pool.shutdown(cancel_futures=True)


def _line_starts(file: FileIO, start: int, size: int, step: int) -> list[int]:
    """``start``, then the offset of the first line to start at least ``step`` bytes after the last, ..., ``size``."""
    bounds = [start]
    while (target := bounds[-1] + step) < size:
        file.seek(target - 1)
        while (data := file.read(1 << 16)) and (newline := data.find(b"\n")) < 0:
            target += len(data)
        if not data or (target := target + newline) >= size:
            break
        bounds.append(target)
    bounds.append(size)
    return bounds


_worker_settings: _Settings | None = None
"""What a worker process checks and counts with (set once, as it starts)."""


def _start_worker(settings: _Settings) -> None:
    global _worker_settings
    die_with_parent()  # a killed validation takes its processes along
    _worker_settings = settings


def _worker_scan() -> _Scan:
    assert _worker_settings is not None, "not in a worker process"
    return _Scan(_worker_settings)


def _scan_head(path: str) -> tuple[_Tally, DatasetFormat | None, int, int]:
    """In a worker: the tally of a file's lines up to the first well-formed one (to its end if none is), that line's
    format and number, and the byte offset where those lines end."""
    scan = _worker_scan()
    stop = 0
    with open(path, "rb", buffering=0) as file:
        for data, end in _chunks(file):
            scan.feed(data, end)
            stop += end
            if scan.format is not None:
                break
    return scan.tally, scan.format, scan.format_line, stop


def _scan_range(task: tuple[str, int, int, DatasetFormat, int]) -> _Tally:
    """In a worker: the tally of the whole lines from byte ``start`` to ``stop`` of a file in a known format."""
    path, start, stop, fmt, format_line = task
    scan = _worker_scan()
    scan.adopt(fmt, format_line)
    with open(path, "rb", buffering=0) as file:
        file.seek(start)
        for data, end in _chunks(file, stop - start):
            scan.feed(data, end)
    return scan.tally
