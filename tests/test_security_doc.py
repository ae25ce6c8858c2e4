"""SECURITY.md's citations: every ``tests/FILE.py::test_name`` it names exists."""

from __future__ import annotations

import re

from conftest import ROOT

CITATION = re.compile(r"tests/(\w+\.py)::(\w+)")


def test_every_test_security_md_cites_exists():
    text = (ROOT / "SECURITY.md").read_text()
    cited = set(CITATION.findall(text))
    assert len(cited) > 20
    missing = [
        f"{f}::{t}"
        for f, t in sorted(cited)
        if not re.search(rf"^(async )?def {t}\(", (ROOT / "tests" / f).read_text(), re.M)
    ]
    assert missing == []
