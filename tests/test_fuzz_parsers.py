"""Fuzzing, for a bounded number of inputs: the journal, tcprules and config parsers.

Each parser either returns or raises its own one error type with a message;
nothing else escapes (no IndexError, no ValueError, no UnicodeError), and
nothing hangs: the contract is ``kit.parsers``, which the coverage-guided
harnesses of ``tests/fuzz/`` check too. Inputs are random bytes, inputs built to pass the first checks
(a journal with valid checksums around hostile records, rules lines from
their grammar) and mutations of both. Derandomized, so CI runs the same
inputs every time; FUZZ_EXAMPLES scales how many.
"""

from __future__ import annotations

import os
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.parsers import check_config, check_journal, check_rules

from ostiary_ucspi.store import MAGIC, journal_lines

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=EXAMPLES,
    suppress_health_check=list(HealthCheck),
)

words = st.binary(min_size=0, max_size=24)
records = st.dictionaries(words, words, min_size=1, max_size=6)


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    """Flip, drop or duplicate bytes of ``data`` at the given places."""
    b = bytearray(data)
    for where, how in edits:
        if not b:
            break
        i = where % len(b)
        if how == 0:
            b[i] ^= 1 << (where % 8)
        elif how == 1:
            del b[i]
        else:
            b.insert(i, b[i])
    return bytes(b)


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 2)), max_size=4)


@settings(**SETTINGS)
@given(st.binary(max_size=300))
def test_random_bytes_as_a_journal(data):
    check_journal(data)
    check_journal(MAGIC + b"1\n" + data)


@settings(**SETTINGS)
@given(st.lists(records, min_size=1, max_size=4), edits, st.integers(0, 64))
def test_checksummed_journals_of_hostile_records_and_their_mutations(txs, changes, cut):
    head = MAGIC + b"7\n"
    data = head
    for tx in txs:
        data += journal_lines(tx, zlib.crc32(data))
    check_journal(data)
    check_journal(data[: len(data) - cut])
    check_journal(mutate(data, changes))


rule_address = st.one_of(st.just(b""), st.from_regex(rb"\A[0-9.:a-f=@-]{0,20}\Z"), words)
rule_line = st.builds(
    lambda a, verb, var: a + b":" + verb + var,
    rule_address,
    st.sampled_from([b"allow", b"deny", b"allowed", b"", b"deny "]),
    st.one_of(st.just(b""), st.from_regex(rb'\A,[A-Z_]{0,6}=?("[^"\n]{0,8}"?)?\Z'), words),
)


@settings(**SETTINGS)
@given(st.lists(st.one_of(rule_line, words), max_size=6), edits)
def test_tcprules_lines_and_their_mutations(lines, changes):
    data = b"\n".join(lines)
    check_rules(data)
    check_rules(mutate(data, changes))


config_line = st.builds(
    lambda k, v: k + "=" + v,
    st.sampled_from(
        [
            "KILL",
            "ACTION",
            "LOCKOUT_ACTION",
            "UNDO",
            "LOCKOUT_DB",
            "DELAY",
            "MAX_BAD_CONNS",
            "IPV6_PREFIX",
            "DEFAULT_UID",
            "MIN_LOGLEVEL",
            "X",
        ]
    ),
    st.one_of(
        st.from_regex(r'\A"[^"\n]{0,12}"(,"/[a-z/]{0,8}")?(,[0-9]{0,4}){0,2}\Z'),
        st.text(max_size=16),
    ),
)


@settings(**SETTINGS)
@given(st.lists(st.one_of(config_line, st.text(max_size=20)), max_size=8))
def test_config_lines_give_a_config_or_one_located_error(lines):
    check_config("\n".join(lines))
