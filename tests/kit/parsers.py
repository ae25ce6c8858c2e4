"""The parsers' contract, for every fuzzer (Hypothesis and atheris alike).

Each check feeds one input to one parser, which either returns or raises its
own one error type with a message in that parser's form. Anything else that
escapes (an IndexError, a ValueError, a failed assertion here) is a bug.
"""

from __future__ import annotations

from ostiary_ucspi.config import ConfigError, parse
from ostiary_ucspi.policy import Entry
from ostiary_ucspi.store import Journal, StoreCorrupt
from ostiary_ucspi.ucspi.tcprules import Fatal, parse_rules


def check_config(text: str) -> None:
    """Parse ``text`` as ostiary.cfg: a Config, or one ConfigError naming the file on one line."""
    try:
        parse(text, "fuzz.cfg")
    except ConfigError as e:
        assert str(e).startswith("fuzz.cfg") and "\n" not in str(e), str(e)


def check_journal(data: bytes, start: int = 0) -> None:
    """Read ``data`` as a journal (from ``start``), its records and their values.

    Or one StoreCorrupt naming it.
    """
    try:
        journal = Journal(data, "fuzz.journal", start)
        out = journal.records()
    except StoreCorrupt as e:
        assert str(e).startswith("fuzz.journal: "), str(e)
        return
    for key, value in out:
        assert journal.last(key) is not None
        try:
            Entry(value)
        except StoreCorrupt:
            pass


def check_rules(data: bytes) -> None:
    """Compile ``data`` as tcprules input: records, or one Fatal (exit 100) naming the line."""
    try:
        for key, value in parse_rules(data):
            assert isinstance(key, bytes) and (value == b"" or value.startswith((b"D\0", b"+")))
    except Fatal as e:
        assert e.status == 100 and e.text.startswith("line "), e.text
