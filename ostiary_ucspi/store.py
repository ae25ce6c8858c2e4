"""The lockout store: a CDB snapshot plus a small append-only journal.

For ``LOCKOUT_DB=/var/lib/ostiary/lockout.cdb`` the files are::

    lockout.cdb          snapshot, a CDB read with pure-cdb; key "!gen" = generation
    lockout.cdb.journal  "ostiary-journal GEN\\n", then lines "CRC32 KEY VALUE\\n"
    lockout.cdb.lock     flock()ed by every writer, and only by writers

A journal line holds a key's whole new value (not a change), so replaying it
twice is harmless and the last line for a key wins; the value ``-`` deletes.
A writer appends its lines with one ``write`` and ``fdatasync`` under the lock;
a lookup reads without the lock. When the journal outgrows a sixteenth of the
snapshot (64 KiB at least), the writer folds it in: a new snapshot of
generation N+1 (temp file, fsync, rename), then an empty journal of generation
N+1 (the same way). A journal one generation behind its snapshot was already
folded in, so a crash between the two renames loses nothing, and neither does
a crash at any other instant. A journal line cut short by a crash was never
acknowledged and is ignored; anything else that does not parse is corruption,
which :class:`StoreCorrupt` reports and callers treat as "refuse everyone".
"""
from __future__ import annotations

import os
import zlib
from fcntl import LOCK_EX, flock
from struct import unpack_from

from cdblib import Reader, Writer

MAGIC = b"ostiary-journal "
GEN_KEY = b"!gen"
DELETED = b"-"
MIN_JOURNAL = 64 * 1024
MAX_FILE = 1 << 30
EMPTY_CDB_LEN = 2048


class StoreError(Exception):
    """The store cannot be used (missing directory, permissions)."""


class StoreCorrupt(StoreError):
    """A store file does not parse: fail closed."""


def check_cdb(data: bytes | memoryview, name: str) -> None:
    """Check a CDB's header against its size: its 256 tables must tile its end."""
    size = len(data)
    if size < EMPTY_CDB_LEN:
        raise StoreCorrupt(f"{name}: too short to be a CDB ({size} bytes)")
    header = unpack_from("<512I", data)
    nxt = header[0]
    if nxt < EMPTY_CDB_LEN:
        raise StoreCorrupt(f"{name}: bad CDB header")
    for i in range(0, 512, 2):
        if header[i] != nxt:
            raise StoreCorrupt(f"{name}: bad CDB header (table {i // 2})")
        nxt += 8 * header[i + 1]
    if nxt != size:
        raise StoreCorrupt(f"{name}: CDB size does not match its header")


def journal_line(key: bytes, value: bytes) -> bytes:
    """Return one journal line for ``key`` = ``value``."""
    body = key + b" " + value
    return b"%08x %s\n" % (zlib.crc32(body), body)


def parse_journal(data: bytes, name: str) -> tuple[int, bytes]:
    """Return (generation, records) of journal ``data``; a cut-off tail is dropped."""
    head_end = data.find(b"\n")
    if not data.startswith(MAGIC) or head_end < 0 or not data[len(MAGIC):head_end].isdigit():
        raise StoreCorrupt(f"{name}: bad journal header")
    return int(data[len(MAGIC):head_end]), data[head_end:data.rfind(b"\n") + 1]


def last_record(records: bytes, key: bytes, name: str) -> bytes | None:
    """Return the newest value for ``key`` in journal ``records``, or None."""
    needle = b" " + key + b" "
    end = len(records)
    while True:
        p = records.rfind(needle, 0, end)
        if p < 0:
            return None
        start = p - 8
        if start > 0 and records[start - 1] == 10:
            eol = records.index(b"\n", p)
            body = records[p + 1:eol]
            if records[start:p] != b"%08x" % zlib.crc32(body):
                raise StoreCorrupt(f"{name}: journal record with a bad checksum")
            return records[p + len(needle):eol]
        end = p + len(needle) - 1


def iter_journal(records: bytes, name: str):
    """Yield (key, value) for every journal record, oldest first, checking each."""
    for line in records.split(b"\n")[1:-1]:
        crc, _, body = line.partition(b" ")
        key, sep, value = body.partition(b" ")
        if not sep or crc != b"%08x" % zlib.crc32(body) or not key:
            raise StoreCorrupt(f"{name}: journal record that does not parse")
        yield key, value


class View:
    """A consistent picture of the store: a snapshot and its journal."""

    def __init__(self, path: str, snapshot: bytes, reader: Reader, gen: int,
                 records: bytes | None) -> None:
        """``records`` is None when no journal of this generation exists yet."""
        self.path = path
        self.snapshot = snapshot
        self.reader = reader
        self.gen = gen
        self.current = records is not None
        self.records = b"\n" if records is None else records

    def get(self, key: bytes) -> bytes | None:
        """Return the current value of ``key``, or None."""
        value = last_record(self.records, key, self.path + ".journal")
        if value is None:
            value = self.reader.get(key)
        return None if value == DELETED else value

    def items(self) -> dict[bytes, bytes]:
        """Return every live key and value (the snapshot with the journal folded in)."""
        items = {k: v for k, v in self.reader.iteritems() if k != GEN_KEY}
        for key, value in iter_journal(self.records, self.path + ".journal"):
            items[key] = value
        return {k: v for k, v in items.items() if v != DELETED}


class Store:
    """Reader and writer of one lockout store."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.journal = path + ".journal"

    def _read(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"unable to read {path}: {e.strerror}") from None
        if len(data) > MAX_FILE:
            raise StoreCorrupt(f"{path}: larger than any store this program writes")
        return data

    def view(self) -> View | None:
        """Return a consistent view without locking; None if the store does not exist yet."""
        for _ in range(50):
            snapshot = self._read(self.path)
            journal = self._read(self.journal)
            if snapshot is None:
                if journal is not None:
                    raise StoreCorrupt(f"{self.path}: missing, but its journal exists")
                d = os.path.dirname(self.path) or "."
                if not os.path.isdir(d):
                    raise StoreError(f"state directory {d} does not exist")
                return None
            check_cdb(snapshot, self.path)
            reader = Reader(snapshot)
            gen_raw = reader.get(GEN_KEY)
            if gen_raw is None or not gen_raw.isdigit():
                raise StoreCorrupt(f"{self.path}: no generation record")
            gen = int(gen_raw)
            if journal is None:
                return View(self.path, snapshot, reader, gen, None)
            jgen, records = parse_journal(journal, self.journal)
            if jgen == gen:
                return View(self.path, snapshot, reader, gen, records)
            if jgen == gen - 1:  # folded into this snapshot already
                return View(self.path, snapshot, reader, gen, None)
            if jgen != gen + 1:
                raise StoreCorrupt(f"{self.journal}: generation {jgen} does not match snapshot {gen}")
            # A compaction finished between our two reads: read again.
        raise StoreError(f"{self.path}: changing too fast to read")

    def lock(self) -> Transaction:
        """Take the writers' lock and return a transaction (a context manager)."""
        return Transaction(self)


class Transaction:
    """Reads see the store as of the lock; puts are written together on exit."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: dict[bytes, bytes] = {}
        self.fd = -1
        self.view: View | None = None

    def __enter__(self) -> Transaction:
        store = self.store
        try:
            self.fd = os.open(store.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise StoreError(f"state directory {os.path.dirname(store.path)} does not exist") from None
        except OSError as e:
            raise StoreError(f"unable to open {store.path}.lock: {e.strerror}") from None
        flock(self.fd, LOCK_EX)
        try:
            self.view = store.view()
            if self.view is None:
                self.view = self._write_snapshot({}, 1)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def get(self, key: bytes) -> bytes | None:
        """Return the value of ``key`` including this transaction's puts."""
        if key in self.pending:
            value = self.pending[key]
            return None if value == DELETED else value
        return self.view.get(key)

    def put(self, key: bytes, value: bytes | None) -> None:
        """Set ``key`` (None deletes it) when the transaction commits."""
        if not key or b" " in key or b"\n" in key or (value and b"\n" in value):
            raise ValueError("store keys are one word; values are one line")
        self.pending[key] = DELETED if value is None else value

    def items(self) -> dict[bytes, bytes]:
        """Return every live key and value, including this transaction's puts."""
        items = self.view.items()
        for key, value in self.pending.items():
            if value == DELETED:
                items.pop(key, None)
            else:
                items[key] = value
        return items

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.pending:
                self._append()
        finally:
            os.close(self.fd)

    def _append(self) -> None:
        view = self.view
        jpath = self.store.journal
        lines = b"".join(journal_line(k, v) for k, v in self.pending.items())
        if not view.current:
            self._write_journal(view.gen)  # a crash left no journal of this generation
        fd = os.open(jpath, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            if os.write(fd, lines) != len(lines):
                raise StoreError(f"short write to {jpath}")
            os.fdatasync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > max(MIN_JOURNAL, len(view.snapshot) // 16):
            self.compact()

    def compact(self, keep=None) -> int:
        """Fold the journal into a new snapshot; ``keep(key, value)`` may drop entries.

        Returns the number of entries written. Callers hold the lock (inside ``with``).
        """
        items = self.items()
        self.pending.clear()
        if keep is not None:
            items = {k: v for k, v in items.items() if keep(k, v)}
        self.view = self._write_snapshot(items, self.view.gen + 1)
        return len(items)

    def _write_snapshot(self, items: dict[bytes, bytes], gen: int) -> View:
        path = self.store.path
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            w = Writer(f)
            w.put(GEN_KEY, b"%d" % gen)
            for key, value in items.items():
                w.put(key, value)
            w.finalize()
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        self._write_journal(gen)
        with open(path, "rb") as f:
            snapshot = f.read()
        return View(path, snapshot, Reader(snapshot), gen, b"\n")

    def _write_journal(self, gen: int) -> None:
        jpath = self.store.journal
        tmp = jpath + ".tmp"
        with open(tmp, "wb") as f:
            f.write(MAGIC + b"%d\n" % gen)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, jpath)
        dfd = os.open(os.path.dirname(jpath) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
