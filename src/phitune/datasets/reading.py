"""Reading a dataset file: only a regular file opens, and it comes a read's worth of whole lines at a time."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from io import FileIO

from ..errors import DatasetError
from ..types import DatasetIssue

_CHUNK_BYTES = 1 << 18
"""Read size: small enough that a chunk's bytes and decoded objects stay in the CPU cache (2-3x faster than 4 MiB)."""

MAX_LINE_BYTES = 1 << 24
"""The longest line read (16 MiB, far beyond any model's context): a longer one is a ``too_long`` error, skipped
without being held in memory, so memory stays bounded whatever a file holds."""


def open_dataset(path: str | os.PathLike[str]) -> FileIO:
    """Open a dataset file for reading. Anything but a regular file (a FIFO, which would wait for a writer forever; a
    device such as ``/dev/zero``, which never ends; a folder) is a :class:`~phitune.errors.DatasetError`
    (``not_a_file``), raised before anything is read."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens without waiting
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            message = f"{_file_kind(mode)}, not a regular file: datasets are read from regular files"
            raise DatasetError(os.fspath(path), [DatasetIssue(line=0, category="not_a_file", message=message)])
        os.set_blocking(descriptor, True)
        return FileIO(descriptor, "rb", closefd=True)
    except BaseException:
        os.close(descriptor)
        raise


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    kinds |= {stat.S_ISDIR: "a folder", stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def _chunks(file: FileIO, size: int | None = None) -> Iterator[tuple[bytearray | None, int]]:
    """The file's next ``size`` bytes (to its end if None), a read's worth of whole lines at a time.

    Each is ``(buffer, end)``: the lines are ``buffer[:end]``, until the next one comes (the buffer is reused). A
    line longer than a read comes whole; so does the last, with or without its newline. A line longer than
    :data:`MAX_LINE_BYTES` comes as ``(None, n)``: its ``n`` bytes (newline included) were skipped unread.
    """
    buffer = bytearray(_CHUNK_BYTES)
    kept = 0  # the bytes of a line begun but not ended, at the start of the buffer
    skipped = 0  # the bytes of an overlong line passed over so far; while skipping, nothing is kept
    left = size
    while left is None or left > 0:
        room = len(buffer) - kept if left is None else min(len(buffer) - kept, left)
        read = file.readinto(memoryview(buffer)[kept : kept + room])
        if not read:
            break
        end = kept + read
        if left is not None:
            left -= read
        if skipped:
            newline = buffer.find(b"\n", 0, end)
            if newline < 0:
                skipped += end
                continue
            yield None, skipped + newline + 1
            skipped = 0
            buffer[: end - newline - 1] = buffer[newline + 1 : end]
            kept = end - newline - 1
            continue
        cut = end if left == 0 else buffer.rfind(b"\n", kept, end) + 1
        if cut:
            yield buffer, cut
            buffer[: end - cut] = buffer[cut:end]
            kept = end - cut
        elif end < len(buffer):
            kept = end
        elif len(buffer) < MAX_LINE_BYTES:
            kept = end
            buffer.extend(bytes(len(buffer)))
        else:
            skipped, kept = end, 0
    if skipped:
        yield None, skipped
    elif kept:
        yield buffer, kept
