"""What a pass over consecutive lines found: counts, token statistics (a bounded histogram) and the first problems;
the tallies of consecutive ranges add up."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ..types import DatasetIssueCategory


class _Histogram:
    """Counts of non-negative ints in log-linear buckets: exact below 1024, within 0.2% above, bounded size."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def add(self, values: list[int]) -> None:
        self.counts.update([v if v < 1024 else _bucket(v) for v in values])

    def quantile(self, q: float) -> int:
        """The smallest bucket's upper bound that covers at least ``q`` of the values (nearest rank)."""
        rank = math.ceil(q * self.counts.total())
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return _bucket_top(bucket)
        return 0


def _bucket(value: int) -> int:
    shift = value.bit_length() - 10
    return (shift << 9) + (value >> shift)


def _bucket_top(bucket: int) -> int:
    if bucket < 1024:
        return bucket
    shift = (bucket >> 9) - 1
    return ((bucket - (shift << 9) + 1) << shift) - 1


_Issue = tuple[int, DatasetIssueCategory, str]
"""A problem as ``(line, category, message)``."""


@dataclass
class _Tally:
    """What a pass over consecutive lines found, with line numbers counted from the first of them.

    Each keeps the first ``max_errors`` errors and warnings; the tallies of consecutive ranges of lines add up,
    in file order, to that of the whole range.
    """

    max_errors: int
    lines_read: int = 0
    lines: int = 0
    examples: int = 0
    total: int = 0
    trainable: int = 0
    min: int = 0
    max: int = 0
    histogram: _Histogram = field(default_factory=_Histogram)
    errors: list[_Issue] = field(default_factory=list)
    error_count: int = 0
    warnings: list[_Issue] = field(default_factory=list)

    def add(self, later: _Tally) -> None:
        """Fold in the tally of the lines that follow these."""
        offset = self.lines_read
        room = self.max_errors - len(self.errors)
        self.errors += [(line + offset, category, text) for line, category, text in later.errors[:room]]
        room = self.max_errors - len(self.warnings)
        self.warnings += [(line + offset, category, text) for line, category, text in later.warnings[:room]]
        self.error_count += later.error_count
        if later.examples:
            self.min = later.min if not self.examples else min(self.min, later.min)
            self.max = max(self.max, later.max)
        self.lines_read += later.lines_read
        self.lines += later.lines
        self.examples += later.examples
        self.total += later.total
        self.trainable += later.trainable
        self.histogram.counts.update(later.histogram.counts)
