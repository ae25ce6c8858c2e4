"""Write a CDB exactly as djb's cdbmake does; reading is pure-cdb's ``cdblib.Reader``.

Not ``cdblib.Writer``: pure-cdb 4 takes a hash-table slot whose hash is 0 for
an empty one and can overwrite it, silently dropping a record (the key
``39.160.226.88`` hashes to 0). Both tcprules CDBs and lockout snapshots are
written here.
"""
from __future__ import annotations

import struct

from cdblib import djb_hash

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs the handler's start-up an re and enum import
    from typing import BinaryIO

_pair = struct.Struct("<LL").pack


def write_cdb(out: BinaryIO, records: list[tuple[bytes, bytes]]) -> None:
    """Write ``records`` to seekable ``out`` (same bytes as cdbmake for the same order)."""
    if 2048 + sum(24 + len(k) + len(v) for k, v in records) > 0xFFFFFFFF:
        raise OSError("too large for a cdb (4 GB)")
    out.write(b"\0" * 2048)
    position = 2048
    tables: list[list[tuple[int, int]]] = [[] for _ in range(256)]
    for key, value in records:
        out.write(_pair(len(key), len(value)) + key + value)
        h = djb_hash(key)
        tables[h & 255].append((h, position))
        position += 8 + len(key) + len(value)
    header = []
    for entries in tables:
        size = 2 * len(entries)
        slots = [(0, 0)] * size
        for h, where in entries:
            i = (h >> 8) % size
            while slots[i][1]:  # a record is never at position 0: the slot is taken
                i = (i + 1) % size
            slots[i] = (h, where)
        header.append(_pair(position, size))
        out.write(b"".join(_pair(*slot) for slot in slots))
        position += 8 * size
    out.seek(0)
    out.write(b"".join(header))
