"""The fault and abuse suite (``pytest -m reliability``): each test records what it tried and how it ended in one
ledger, printed at the end of the session, and asserts that nothing was lost, stuck or leaked."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from faults import Row

_LEDGER: list[Row] = []


@pytest.fixture
def ledger() -> Iterator[Callable[[str], Row]]:
    """Open rows of the ledger (``row = ledger("area")``); every row is checked when the test ends."""
    opened: list[Row] = []

    def open_row(area: str) -> Row:
        row = Row(area)
        opened.append(row)
        _LEDGER.append(row)
        return row

    yield open_row
    for row in opened:
        row.check()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _LEDGER:
        return
    terminalreporter.section("reliability: tried / survived / lost / stuck / leaked")
    width = max(len(row.area) for row in _LEDGER)
    for row in _LEDGER:
        terminalreporter.write_line(
            f"{row.area:<{width}}  {row.tried:>6} tried  {row.survived:>6} survived  {row.lost:>3} lost  "
            f"{row.stuck:>3} stuck  {row.leaked:>3} leaked"
        )
