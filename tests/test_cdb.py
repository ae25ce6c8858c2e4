"""ostiary_ucspi.cdb: the reader agrees with pure-cdb on what cdbmake's layout holds."""

import io
import struct

import cdblib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary_ucspi import cdb

KEYS = st.binary(min_size=0, max_size=24)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_hash_is_pure_cdbs(key: bytes) -> None:
    assert cdb.hash_key(key) == cdblib.djb_hash(key)


def test_the_key_whose_hash_is_zero() -> None:
    assert cdb.hash_key(b"39.160.226.88") == 0  # why cdb.py writes, not cdblib.Writer


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(KEYS, st.binary(max_size=40), max_size=60), st.lists(KEYS, max_size=20))
def test_reader_agrees_with_pure_cdb(records: dict[bytes, bytes], probes: list[bytes]) -> None:
    out = io.BytesIO()
    cdb.write_cdb(out, list(records.items()))
    data = out.getvalue()
    ours, theirs = cdb.Reader(data), cdblib.Reader(data)
    for key in [*records, *probes]:
        assert ours.get(key) == theirs.get(key) == records.get(key)
    assert list(ours.items()) == list(theirs.iteritems()) == list(records.items())


@pytest.mark.parametrize("cut", [8, 100, 2047])
def test_a_short_file_is_refused(cut: int) -> None:
    out = io.BytesIO()
    cdb.write_cdb(out, [(b"k", b"v")])
    with pytest.raises(cdb.CdbError):
        cdb.Reader(out.getvalue()[:cut])


def test_a_table_pointing_past_the_end_is_an_error_not_a_crash() -> None:
    out = io.BytesIO()
    cdb.write_cdb(out, [(b"key", b"value")])
    data = bytearray(out.getvalue())
    h = cdb.hash_key(b"key")
    index = 2 * (h & 255)
    table = int.from_bytes(data[4 * index : 4 * index + 4], "little")
    slots = int.from_bytes(data[4 * index + 4 : 4 * index + 8], "little")
    slot = table + 8 * ((h >> 8) % slots)
    data[slot + 4 : slot + 8] = (len(data) - 2).to_bytes(4, "little")  # record position: the end
    with pytest.raises(cdb.CdbError):
        cdb.Reader(bytes(data)).get(b"key")


@pytest.mark.parametrize("little", [True, False], ids=["cast", "portable"])
@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=0, max_size=80), start=st.integers(0, 80), count=st.integers(1, 20))
def test_words_are_little_endian_32_bit_numbers_either_way(
    little: bool, data: bytes, start: int, count: int
) -> None:
    """What the reader reads instead of struct, with the cast on a little-endian machine or not."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cdb, "LITTLE", little)
        if start + 4 * count > len(data):
            with pytest.raises(cdb.CdbError):
                cdb.words(data, start, count)
        else:
            assert cdb.words(data, start, count) == list(
                struct.unpack_from(f"<{count}L", data, start)
            )
    assert cdb.pair(7, 0xFFFFFFFF) == struct.pack("<LL", 7, 0xFFFFFFFF)
