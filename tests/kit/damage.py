"""The catalogue of broken store files, shared by store, handler and operator tests.

Every entry takes the snapshot's path (``.../lockout.cdb``, str or Path); the
journal is that path plus ``.journal``. Each catalogue documents what the store
must already hold for its damage to apply.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

Damage = Callable[[Path], None]


def journal(db: str | Path) -> Path:
    """The journal beside snapshot ``db``."""
    return Path(str(db) + ".journal")


def write_at(path: str | Path, offset: int, data: bytes) -> None:
    """Overwrite ``path`` at ``offset`` with ``data``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def garble_line(path: Path, key: bytes, new: bytes) -> None:
    """Replace the journal line about ``key`` by ``new``, or change a digit of its value."""
    lines = path.read_bytes().split(b"\n")
    i = next(i for i, x in enumerate(lines) if x.startswith(key + b" ") or b" " + key + b" " in x)
    changed = new if new else lines[i].replace(b" 1 1 0 ", b" 0 0 0 ")
    assert changed != lines[i]
    lines[i] = changed
    path.write_bytes(b"\n".join(lines))


def urandom_keep_size(p: Path) -> None:
    p.write_bytes(os.urandom(p.stat().st_size))


def replace_by_fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p, 0o600)


def replace_by_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


# What the store itself says (StoreCorrupt matching the regex), after one put of a=1.
REPORTED = {
    "header": (lambda p: write_at(p, 0, b"\xff\xff"), "bad CDB header"),
    "cut end": (lambda p: os.truncate(p, os.path.getsize(p) - 8), "does not match its header"),
    "100 bytes": (lambda p: os.truncate(p, 100), r"too short to be a CDB \(100 bytes\)"),
    "empty": (lambda p: open(p, "wb").close(), r"too short to be a CDB \(0 bytes\)"),
    "journal header": (lambda p: write_at(journal(p), 0, b"OSTIARY"), "bad journal header"),
    "journal generation": (
        lambda p: journal(p).write_bytes(b"ostiary-journal 9\n"),
        "generation 9 does not match snapshot 1",
    ),
    "journal checksum": (lambda p: write_at(journal(p), 16, b"9"), "checksum mismatch"),
    "snapshot missing": (lambda p: os.unlink(p), "missing, but its journal exists"),
}

# A store with journal records for 127.0.0.1 and 10.0.0.1, broken so that a handler
# refuses everyone (an alert naming the corruption).
CORRUPTIONS: dict[str, Damage] = {
    "cdb truncated": lambda p: os.truncate(p, 1000),
    "cdb empty": lambda p: os.truncate(p, 0),
    "cdb header garbage": lambda p: Path(p).write_bytes(os.urandom(64) + Path(p).read_bytes()[64:]),
    "cdb garbage appended": lambda p: Path(p).write_bytes(Path(p).read_bytes() + b"garbage"),
    "cdb missing, journal kept": lambda p: Path(p).unlink(),
    "journal header garbage": lambda p: journal(p).write_bytes(
        b"garbage\n" + journal(p).read_bytes().split(b"\n", 1)[1]
    ),
    "journal checksum, own line": lambda p: garble_line(journal(p), b"127.0.0.1", b""),
    "journal checksum, other line": lambda p: garble_line(journal(p), b"10.0.0.1", b""),
    "journal garbage line": lambda p: garble_line(journal(p), b"10.0.0.1", b"this is not a record"),
    "journal own line garbage": lambda p: garble_line(journal(p), b"127.0.0.1", b"0000 x"),
}

# One file of a store holding a snapshot and a journal, broken: (which file, what is done to it).
BROKEN_FILES: dict[str, tuple[str, Damage]] = {
    "snapshot truncated": ("cdb", lambda p: os.truncate(p, 1000)),
    "snapshot cut at the end": ("cdb", lambda p: os.truncate(p, p.stat().st_size - 5)),
    "snapshot garbage": ("cdb", urandom_keep_size),
    "snapshot zero-length": ("cdb", lambda p: os.truncate(p, 0)),
    "snapshot is a directory": ("cdb", replace_by_dir),
    "snapshot is a FIFO": ("cdb", replace_by_fifo),
    "journal cut in its header": ("journal", lambda p: os.truncate(p, 7)),
    "journal garbage": ("journal", urandom_keep_size),
    "journal zero-length": ("journal", lambda p: os.truncate(p, 0)),
    "journal is a FIFO": ("journal", replace_by_fifo),
}


def damage_header(db: str | Path) -> None:
    """Garble the snapshot's first four bytes."""
    write_at(db, 0, b"\xff\xff\xff\xff")


def damage_journal(db: str | Path) -> None:
    """Change the first byte of the value of the journal record of 192.0.2.7."""
    data = journal(db).read_bytes()
    write_at(journal(db), data.index(b"192.0.2.7 ") + len(b"192.0.2.7 "), b"9")


def damage_record(db: str | Path) -> None:
    """Write a well-formed journal record whose value is no lockout record."""
    from ostiary_ucspi.store import Store

    with Store(str(db)).lock() as tx:
        tx.put(b"192.0.2.8", b"not a record")


# What the operator's tool reports for each, on a store holding 192.0.2.7.
OPERATOR = [
    (damage_header, "lockout.cdb: bad CDB header"),
    (damage_journal, "lockout.cdb.journal: checksum mismatch: the journal was damaged"),
    (damage_record, "lockout record does not parse: b'not a record'"),
]
