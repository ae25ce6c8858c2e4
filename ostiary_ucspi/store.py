"""The lockout store: a CDB snapshot plus a small append-only journal.

For ``LOCKOUT_DB=/var/lib/ostiary/lockout.cdb`` the files are::

    lockout.cdb          snapshot, a CDB read with pure-cdb; key "!gen" = generation
    lockout.cdb.journal  "ostiary-journal GEN\\n", then lines "KEY VALUE CRC32\\n"
    lockout.cdb.lock     flock()ed by every writer, and only by writers

A journal line holds a key's whole new value (not a change), so the last line
for a key wins; the value ``-`` deletes. A line's CRC-32 covers the journal
from its first byte up to that CRC, so checking the last line's, in one call
of zlib, checks the whole journal. The lines of one transaction are written
with one ``write`` and ``fdatasync`` under the lock; all but its last line
end in ``+`` ("more follows"), so a transaction whose last line is missing
was never acknowledged and is ignored as a whole, and so is a line cut
short. Readers take no lock: they map the snapshot, read and check the
journal, and search it from the end.

When the journal outgrows a sixteenth of the snapshot (at least 16 KiB, at
most 128 KiB), the writer folds it in, dropping what ``keep`` rejects: a new
snapshot of generation N+1 (temp file, fsync, rename, fsync of the directory),
then an empty journal of generation N+1 (the same way). A journal one
generation behind its snapshot was already folded in, so a crash between the
two renames loses nothing. A journal whose tail a crash left unfinished is
rewritten (the same way) by the next writer before it appends. Anything else
that does not parse is corruption, which :class:`StoreCorrupt` reports and
callers treat as "refuse everyone".

When root writes (the operator's tool), new files get the owner of the
directory, so the handler's user can still write them.
"""
import os
import stat
import zlib
from fcntl import LOCK_EX, flock
from mmap import ACCESS_READ, mmap
from struct import unpack_from

from .cdb import HEADER_LEN, CdbError, Reader

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable

    Keep = Callable[[bytes, bytes], bool]

MAGIC = b"ostiary-journal "
GEN_KEY = b"!gen"
DELETED = b"-"
MORE = b"+"
MIN_JOURNAL = 16 * 1024
MAX_JOURNAL = 128 * 1024
JOURNAL_SHARE = 16  # the journal may grow to this fraction of the snapshot
MAX_FILE = 1 << 30


class StoreError(Exception):
    """The store cannot be used (missing directory, permissions)."""


class StoreCorrupt(StoreError):
    """A store file does not parse: fail closed."""


def journal_lines(pending: dict[bytes, bytes], crc: int) -> bytes:
    """Return one transaction's journal lines, to follow a journal whose CRC-32 is ``crc``.

    Each line's checksum covers the journal from its first byte to that
    checksum; all lines but the last end in ``+``.
    """
    lines = []
    for key, value in pending.items():
        head = key + b" " + value + b" "
        crc = zlib.crc32(head, crc)
        tail = b"%08x%s\n" % (crc, MORE)
        crc = zlib.crc32(tail, crc)
        lines.append(head + tail)
    lines[-1] = lines[-1][:-2] + b"\n"
    return b"".join(lines)


class Journal:
    """The acknowledged part of a journal file, checked from its first byte to its last.

    ``data[:end]`` is what acknowledged transactions wrote, ``crc`` its CRC-32;
    ``torn``: the file goes on past it (a crash cut a write short).
    """

    def __init__(self, data: bytes, name: str) -> None:
        head_end = data.find(b"\n")
        if not data.startswith(MAGIC) or head_end < 0 or not data[len(MAGIC):head_end].isdigit():
            raise StoreCorrupt(f"{name}: bad journal header")
        end = data.rfind(b"\n") + 1
        while end > head_end + 1 and data[end - 2:end - 1] == MORE:
            end = data.rfind(b"\n", 0, end - 1) + 1
        if end > head_end + 1:  # the last line's checksum covers everything before it
            crc = zlib.crc32(memoryview(data)[:end - 9])
            if data[end - 10:end - 9] != b" " or data[end - 9:end - 1] != b"%08x" % crc:
                raise StoreCorrupt(f"{name}: checksum mismatch: the journal was damaged")
            crc = zlib.crc32(data[end - 9:end], crc)
        else:
            crc = zlib.crc32(data[:end])
        self.name = name
        self.gen = int(data[len(MAGIC):head_end])
        self.data = data
        self.head_end = head_end
        self.end = end
        self.crc = crc
        self.torn = len(data) != end

    def last(self, key: bytes) -> bytes | None:
        """Return the newest value for ``key``, or None."""
        start = self.data.rfind(b"\n" + key + b" ", self.head_end, self.end)
        if start < 0:
            return None
        line = self.data[start + 1:self.data.index(b"\n", start + 1)].rstrip(MORE)
        return line[len(key) + 1:-9]

    def records(self) -> list[tuple[bytes, bytes]]:
        """Return every (key, value), oldest first."""
        out = []
        for line in self.data[self.head_end + 1:self.end].split(b"\n")[:-1]:
            key, sep, value = line.rstrip(MORE)[:-9].partition(b" ")
            if not sep or not key:
                raise StoreCorrupt(f"{self.name}: journal record that does not parse: {line[:60]!r}")
            out.append((key, value))
        return out


class View:
    """A consistent picture of the store: a snapshot and its journal."""

    def __init__(self, path: str, reader: Reader, gen: int, journal: Journal | None) -> None:
        """``journal`` is None when no journal of this generation exists."""
        self.path = path
        self.reader = reader
        self.gen = gen
        self.journal = journal
        self.cache: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        """Return the current value of ``key``, or None."""
        if key in self.cache:
            return self.cache[key]
        value = None if self.journal is None else self.journal.last(key)
        if value is None:
            try:
                value = self.reader.get(key)
            except CdbError as e:
                raise StoreCorrupt(f"{self.path}: {e}") from None
        value = None if value == DELETED else value
        self.cache[key] = value
        return value

    def items(self) -> dict[bytes, bytes]:
        """Return every live key and value (the snapshot with the journal folded in)."""
        try:
            items = dict(self.reader.items())
        except CdbError as e:
            raise StoreCorrupt(f"{self.path}: {e}") from None
        del items[GEN_KEY]
        if self.journal is not None:
            items.update(self.journal.records())
        return {k: v for k, v in items.items() if v != DELETED}


class Store:
    """Reader and writer of one lockout store.

    ``keep(key, value)`` decides what survives the compactions that writes
    trigger (None keeps everything).
    """

    def __init__(self, path: str, keep: "Keep | None" = None) -> None:
        self.path = path
        self.journal = path + ".journal"
        self.keep = keep
        self.last_view: View | None = None  # the newest view() returned, for a read that may lag

    def _open(self, path: str) -> "tuple[int, os.stat_result] | None":
        """Open a store file for reading; return (descriptor, its stat), None if it does not exist."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not hang us
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"unable to read {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise StoreError(f"unable to read {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise StoreCorrupt(f"{path}: not a regular file")
        if st.st_size > MAX_FILE:
            os.close(fd)
            raise StoreCorrupt(f"{path}: larger than any store this program writes")
        return fd, st

    def _read(self, path: str) -> bytes | None:
        """Return the content of ``path``, None if it does not exist."""
        opened = self._open(path)
        if opened is None:
            return None
        try:
            with open(opened[0], "rb", buffering=0) as f:
                return f.readall()
        except OSError as e:
            raise StoreError(f"unable to read {path}: {e.strerror}") from None

    def _map(self) -> tuple[mmap, tuple[int, int]] | None:
        """Map the snapshot; return it and its (device, inode), None if it does not exist."""
        opened = self._open(self.path)
        if opened is None:
            return None
        fd, st = opened
        try:
            if st.st_size < HEADER_LEN:
                raise StoreCorrupt(f"{self.path}: too short to be a CDB ({st.st_size} bytes)")
            return mmap(fd, 0, access=ACCESS_READ), (st.st_dev, st.st_ino)
        except OSError as e:
            raise StoreError(f"unable to read {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)

    def view(self) -> View | None:
        """Return a consistent view without locking; None if the store does not exist yet."""
        for _ in range(50):
            mapped = self._map()
            if mapped is None:
                if os.path.exists(self.journal):
                    raise StoreCorrupt(f"{self.path}: missing, but its journal exists")
                d = os.path.dirname(self.path) or "."
                if not os.path.isdir(d):
                    raise StoreError(f"state directory {d} does not exist")
                return None
            data, identity = mapped
            try:
                reader = Reader(data)
            except CdbError as e:
                raise StoreCorrupt(f"{self.path}: {e}") from None
            gen_raw = reader.get(GEN_KEY)
            if gen_raw is None or not gen_raw.isdigit():
                raise StoreCorrupt(f"{self.path}: no generation record")
            gen = int(gen_raw)
            data = self._read(self.journal)
            if data is None:
                self.last_view = View(self.path, reader, gen, None)
                return self.last_view
            journal = Journal(data, self.journal)
            jgen = journal.gen
            if jgen in (gen, gen - 1):  # one behind: folded into this snapshot already
                self.last_view = View(self.path, reader, gen, journal if jgen == gen else None)
                return self.last_view
            try:
                again = os.stat(self.path)
            except OSError:
                continue
            if (again.st_dev, again.st_ino) == identity:
                raise StoreCorrupt(f"{self.journal}: generation {jgen} does not match snapshot {gen}")
            # Compactions finished between our two reads: read again.
        raise StoreError(f"{self.path}: changing too fast to read")

    def check_usable(self) -> None:
        """Raise StoreError unless the directory's owner may read and write every store file.

        The handler runs as that user, and root's writes keep to it (see
        give_to_owner); a file of another owner or mode, say one root restored
        from a backup, locks the handler out though root reads it fine.
        """
        d = os.path.dirname(self.path) or "."
        try:
            dst = os.stat(d)
        except FileNotFoundError:
            raise StoreError(f"state directory {d} does not exist") from None
        if dst.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            raise StoreError(f"state directory {d}: mode {dst.st_mode & 0o7777:o} keeps its owner "
                             f"from creating files in it: chmod u+rwx {d}")
        for path in (self.path, self.journal, self.path + ".lock"):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if st.st_uid != dst.st_uid:
                raise StoreError(f"{path}: its owner (uid {st.st_uid}) is not the state "
                                 f"directory's (uid {dst.st_uid}), so the handler cannot use it: "
                                 f"chown {dst.st_uid} {path}")
            if st.st_mode & (stat.S_IRUSR | stat.S_IWUSR) != stat.S_IRUSR | stat.S_IWUSR:
                raise StoreError(f"{path}: Permission denied to its owner, the handler "
                                 f"(mode {st.st_mode & 0o7777:o}): chmod u+rw {path}")

    def lock(self, durable: bool = True) -> "Transaction":
        """Take the writers' lock and return a transaction (a context manager).

        ``durable=False`` skips the journal's fdatasync: for updates whose loss
        in a power cut errs on the safe side (a refund), and a later durable
        append to the same journal flushes them too.
        """
        return Transaction(self, durable)

    def set_aside(self, suffix: str) -> list[str]:
        """Under the writers' lock, rename the snapshot and journal to NAME + ``suffix``.

        The next writer starts an empty store. Returns the new names.
        """
        moved = []
        with Lock(self.path + ".lock"):
            for path in (self.path, self.journal):
                if os.path.exists(path):
                    try:
                        os.rename(path, path + suffix)
                    except OSError as e:
                        raise StoreError(f"unable to rename {path}: {e.strerror}") from None
                    moved.append(path + suffix)
            sync_dir(self.path)
        return moved


class Lock:
    """The writers' lock, held from ``__enter__`` to ``__exit__``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> "Lock":
        try:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:  # the first writer creates it, for the directory's owner
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                give_to_owner(self.fd, self.path)
        except FileNotFoundError:
            raise StoreError(f"state directory {os.path.dirname(self.path)} does not exist") from None
        except OSError as e:
            raise StoreError(f"unable to open {self.path}: {e.strerror}") from None
        try:
            flock(self.fd, LOCK_EX)
        except OSError as e:
            os.close(self.fd)
            raise StoreError(f"unable to lock {self.path}: {e.strerror}") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        os.close(self.fd)


def give_to_owner(fd: int, path: str) -> None:
    """When root creates a store file, hand it to the owner of its directory."""
    if os.geteuid() != 0:
        return
    d = os.stat(os.path.dirname(path) or ".")
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (d.st_uid, d.st_gid):
        os.fchown(fd, d.st_uid, d.st_gid)


def sync_dir(path: str) -> None:
    """fsync the directory holding ``path``, so a rename in it is durable."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(path: str, write: "Callable[[object], None]") -> None:
    """Atomically replace ``path`` by what ``write(file)`` writes: temp file, fsync, rename."""
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        with open(fd, "wb") as f:
            give_to_owner(fd, path)
            write(f)
            f.flush()
            os.fsync(fd)
        os.rename(tmp, path)
        sync_dir(path)
    except OSError as e:
        raise StoreError(f"unable to write {path}: {e.strerror or e}") from None


def journal_threshold(snapshot_size: int) -> int:
    """Return the journal size past which a writer compacts."""
    return min(MAX_JOURNAL, max(MIN_JOURNAL, snapshot_size // JOURNAL_SHARE))


class Transaction:
    """Reads see the store as of the lock; puts are written together on exit."""

    def __init__(self, store: Store, durable: bool = True) -> None:
        self.store = store
        self.durable = durable
        self.pending: dict[bytes, bytes] = {}
        self.lock = Lock(store.path + ".lock")
        self.view: View | None = None

    def __enter__(self) -> "Transaction":
        self.lock.__enter__()
        try:
            self.view = self.store.view()
            if self.view is None:
                self._write_snapshot({}, 1)
        except BaseException:
            self.lock.__exit__(None, None, None)
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
        if (not key or b" " in key or b"\n" in key or key == GEN_KEY
                or (value is not None and (b"\n" in value or value == DELETED))):
            raise ValueError("store keys are one word; values are one line, not '-'")
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
            self.lock.__exit__(None, None, None)

    def _append(self) -> None:
        view = self.view
        jpath = self.store.journal
        journal = view.journal
        if journal is not None and not journal.torn:
            lines = journal_lines(self.pending, journal.crc)
            try:
                fd = os.open(jpath, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                try:
                    if os.write(fd, lines) != len(lines):
                        raise StoreError(f"short write to {jpath}")
                    if self.durable:
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise StoreError(f"unable to append to {jpath}: {e.strerror}") from None
            size = journal.end + len(lines)  # we hold the lock: nobody else appended
        else:  # a crash left no journal of this generation, or an unfinished tail
            head = MAGIC + b"%d\n" % view.gen if journal is None else journal.data[:journal.end]
            size = self._write_journal(head + journal_lines(self.pending, zlib.crc32(head)))
        if size > journal_threshold(len(view.reader.data)):
            self.compact()  # of the view and the pending puts: the journal as it is now
        self.pending.clear()

    def compact(self, keep: "Keep | None" = None) -> int:
        """Fold the journal into a new snapshot, dropping what ``keep(key, value)`` rejects.

        ``keep`` defaults to the store's. Returns the number of entries written.
        Callers hold the lock (inside ``with``); pending puts are written too.
        """
        keep = keep or self.store.keep
        items = self.items()
        self.pending.clear()
        if keep is not None:
            items = {k: v for k, v in items.items() if keep(k, v)}
        self._write_snapshot(items, self.view.gen + 1)
        return len(items)

    def _write_snapshot(self, items: dict[bytes, bytes], gen: int) -> None:
        records = [(GEN_KEY, b"%d" % gen), *items.items()]
        from .cdb import write_cdb

        replace(self.store.path, lambda f: write_cdb(f, records))
        self._write_journal(MAGIC + b"%d\n" % gen)
        self.view = self.store.view()

    def _write_journal(self, data: bytes) -> int:
        """Replace the journal by ``data``; return its size."""
        replace(self.store.journal, lambda f: f.write(data))
        return len(data)
