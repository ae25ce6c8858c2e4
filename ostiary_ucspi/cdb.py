"""CDB files: write them exactly as djb's cdbmake does, check a header, look keys up.

Writing is not pure-cdb's ``cdblib.Writer``: pure-cdb 4 takes a hash-table
slot whose hash is 0 for an empty one and can overwrite it, silently dropping
a record (the key ``39.160.226.88`` hashes to 0); pure-cdb's C ``djb_hash``
serves the writer, where a compaction hashes every key. Reading the lockout
store is :class:`Reader` here, not pure-cdb's: the handler's every connection
looks up a key or two, and importing pure-cdb (four modules, one of them C)
cost more than the look-ups. Both tcprules CDBs and lockout snapshots are
written and checked here: a leaf shared by the handler's store and the
ucspi-tcp shim.
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs the handler's start-up an re and enum import
    from collections.abc import Iterable, Iterator
    from mmap import mmap
    from typing import BinaryIO

    Data = bytes | mmap

HEADER_LEN = 2048  # 256 (position, slots) pairs of 4 bytes each
MAX_SIZE = 0xFFFFFFFF  # 32-bit positions
# The reader needs no struct: its C module alone costs the handler about 320 KB
# of peak RSS, a third of what the handler adds to a bare interpreter.
LITTLE = sys.byteorder == "little" and memoryview(bytes(4)).cast("I").itemsize == 4


class CdbError(ValueError):
    """A CDB's header does not describe a CDB of its size."""


def words(data: "Data", start: int, count: int) -> list[int]:
    """The ``count`` little-endian 32-bit numbers at ``start``; CdbError past the end."""
    chunk = data[start : start + 4 * count]
    if len(chunk) != 4 * count:
        raise CdbError("a hash table or a record runs past the end")
    if LITTLE:
        with memoryview(chunk) as view, view.cast("I") as numbers:
            return numbers.tolist()
    return [int.from_bytes(chunk[i : i + 4], "little") for i in range(0, 4 * count, 4)]


def pair(a: int, b: int) -> bytes:
    """Two numbers as the 8 little-endian bytes of a record's or a table's header."""
    return a.to_bytes(4, "little") + b.to_bytes(4, "little")


def check_header(data: "Data") -> list[int]:
    """Check that the 256 hash tables tile the end of ``data``, as cdbmake lays them out.

    Returns the header: 256 (position, slots) pairs, flattened. Raises
    CdbError when ``data`` is too short, or a table starts before the
    records' end or past the data.
    """
    size = len(data)
    if size < HEADER_LEN:
        raise CdbError(f"too short to be a CDB ({size} bytes)")
    header = words(data, 0, HEADER_LEN // 4)
    starts = header[0::2]
    ends = [start + 8 * slots for start, slots in zip(starts, header[1::2], strict=True)]
    if starts[0] < HEADER_LEN or starts[1:] != ends[:-1]:
        raise CdbError("bad CDB header")
    if ends[-1] != size:
        raise CdbError("CDB size does not match its header")
    return header


def hash_key(key: bytes) -> int:
    """djb's cdb hash: h = 5381; h = (h * 33) ^ byte, modulo 2**32."""
    h = 5381
    for c in key:
        h = ((h * 33) & 0xFFFFFFFF) ^ c
    return h


class Reader:
    """A CDB held in memory (bytes or an mmap) whose header :func:`check_header` passed."""

    __slots__ = ("data", "header")

    def __init__(self, data: "Data") -> None:
        self.data = data
        self.header = check_header(data)

    def get(self, key: bytes) -> bytes | None:
        """Return the first value stored for ``key``, or None; CdbError if the file lies."""
        h = hash_key(key)
        table, slots = self.header[2 * (h & 255)], self.header[2 * (h & 255) + 1]
        data = self.data
        i = (h >> 8) % slots if slots else 0
        for _ in range(slots):
            stored, where = words(data, table + 8 * i, 2)
            if where == 0:
                return None
            if stored == h:
                klen, vlen = words(data, where, 2)
                start = where + 8
                if data[start : start + klen] == key:
                    value: bytes = data[start + klen : start + klen + vlen]
                    return value
            i = (i + 1) % slots
        return None

    def items(self) -> "Iterator[tuple[bytes, bytes]]":
        """Every record in file order (the records end where the first table begins)."""
        data, end, where = self.data, self.header[0], HEADER_LEN
        while where < end:
            klen, vlen = words(data, where, 2)
            start = where + 8
            if start + klen + vlen > end:
                raise CdbError("a record runs into the hash tables")
            yield data[start : start + klen], data[start + klen : start + klen + vlen]
            where = start + klen + vlen


def write_cdb(
    out: "BinaryIO", records: "Iterable[tuple[bytes, bytes]]", limit: int = MAX_SIZE
) -> None:
    """Write ``records`` to seekable ``out`` (same bytes as cdbmake for the same order).

    Streams: memory grows by 8 bytes a record, whatever the records' size.
    Raises OSError when the result would
    pass ``limit`` bytes (at most a cdb's 4 GB); ``out`` is then unusable.
    """
    from array import array

    from cdblib import djb_hash  # C, for the many keys of a compaction: the same as hash_key

    limit = min(limit, MAX_SIZE)
    out.write(b"\0" * HEADER_LEN)
    position = HEADER_LEN
    hashes, positions = array("I"), array("I")  # 32 bits each, as in the file
    for key, value in records:
        positions.append(position)
        position += 8 + len(key) + len(value)
        if position + 16 * len(positions) > limit:  # the tables hold 2 slots a record
            raise OSError(f"the CDB would pass the limit of {limit} bytes")
        out.write(pair(len(key), len(value)) + key + value)
        hashes.append(djb_hash(key))
    counts = [0] * 256
    for h in hashes:
        counts[h & 255] += 1
    starts, total = [], 0
    for n in counts:
        starts.append(total)
        total += n
    order = array("I", bytes(4 * len(hashes)))  # record numbers, grouped by table
    fill = list(starts)
    for i, h in enumerate(hashes):
        order[fill[h & 255]] = i
        fill[h & 255] += 1
    header = []
    for b in range(256):
        size = 2 * counts[b]
        slots = array("I", bytes(8 * size))  # (hash, position) pairs
        for j in range(starts[b], starts[b] + counts[b]):
            h = hashes[order[j]]
            i = (h >> 8) % size
            while slots[2 * i + 1]:  # a record is never at position 0: the slot is taken
                i = (i + 1) % size
            slots[2 * i], slots[2 * i + 1] = h, positions[order[j]]
        header.append(pair(position, size))
        if sys.byteorder == "big":
            slots.byteswap()  # cdb is little-endian
        out.write(slots.tobytes())
        position += 8 * size
    out.seek(0)
    out.write(b"".join(header))
