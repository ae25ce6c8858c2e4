"""The adversarial suite's figures: per test (:func:`figure`) and for the whole run (:class:`Tally`).

A test that counts across many inputs asks for the session's ``tally`` fixture
(``tests/adversarial/conftest.py``) and adds to a :meth:`Tally.section` of its
own and to ``Tally.totals``; nothing depends on another test having run. At
the end of the session every section's check is asserted and its line, then
the totals line, are printed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


def figure(config: pytest.Config, line: str) -> None:
    """Print one summary line of the suite's figures, past pytest's output capture."""
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\nadversarial: {line}", flush=True)


class Tally:
    """Counters of the run: named sections, and the totals every section adds to."""

    def __init__(self) -> None:
        self.totals = {"inputs": 0, "connections": 0, "crashes": 0, "false positives": 0}
        self.sections: dict[str, tuple[dict, Callable[[dict], str], Callable[[dict], bool]]] = {}
        self.servers = 0  # servers (kit.servers.Server) that added their connections

    def section(
        self,
        name: str,
        render: Callable[[dict], str],
        check: Callable[[dict], bool] = lambda s: s.get("crashes", 0) == 0,
        **counters: float,
    ) -> dict:
        """The counters of section ``name`` (made on first use), its summary line and its check."""
        if name not in self.sections:
            self.sections[name] = (dict(counters), render, check)
        return self.sections[name][0]

    def lines(self) -> list[str]:
        """The summary: one line per section used, then the totals."""
        out = [render(counts) for counts, render, _ in self.sections.values()]
        t = self.totals
        out.append(
            f"totals: {t['inputs']} adversarial inputs, {t['connections']} connections "
            f"served, {t['crashes']} crashes, {t['false positives']} false positives"
        )
        return out

    def verify(self) -> None:
        """Every section's check holds, and the run had no crash and no false positive."""
        for name, (counts, _, check) in self.sections.items():
            assert check(counts), (name, counts)
        assert self.totals["crashes"] == 0 and self.totals["false positives"] == 0, self.totals
        if self.sections:  # something counted inputs
            assert self.totals["inputs"] > 0, self.totals
        if self.servers:  # a server reported what it served
            assert self.totals["connections"] > 0, self.totals
