"""The adversarial suite's session ``tally``, checked and printed when the run ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adversarial.adv_tally import Tally

TALLY = pytest.StashKey[Tally]()


@pytest.fixture(scope="session")
def tally(pytestconfig: pytest.Config) -> Iterator[Tally]:
    """The run's :class:`Tally`; at the end of the session its checks must hold."""
    t = pytestconfig.stash.setdefault(TALLY, Tally())
    yield t
    t.verify()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """The suite's figures, last: one line per section that ran, then the totals."""
    t = config.stash.get(TALLY, None)
    if t is not None:
        for line in t.lines():
            terminalreporter.write_line(f"adversarial: {line}")
