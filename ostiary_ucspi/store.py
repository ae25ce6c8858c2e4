"""The lockout store: a CDB snapshot plus a small append-only journal.

For ``LOCKOUT_DB=/var/lib/ostiary/lockout.cdb`` the files are::

    lockout.cdb          snapshot, a CDB (cdb.py); its own keys !gen, !from, !count
    lockout.cdb.journal  "ostiary-journal GEN\\n", then lines "KEY VALUE CRC32\\n"
    lockout.cdb.lock     flock()ed by every writer, and only by writers
    lockout.cdb.compact  flock()ed by the one compaction at a time

A journal line holds a key's whole new value (not a change), so the last line
for a key wins; the value ``-`` deletes. A line's CRC-32 covers the journal
from its first byte up to that CRC, so checking the last line's, in one call
of zlib, checks the whole journal. The lines of one transaction are written
with one ``write`` and ``fdatasync`` under the lock; all but its last line
end in ``+`` ("more follows"), so a transaction whose last line is missing
was never acknowledged and is ignored as a whole, and so is a line cut
short. Readers take no lock: they read the snapshot, read and check the
journal, and search it from the end.

When the journal outgrows a sixteenth of the snapshot (at least 16 KiB, at
most 128 KiB), the writer that grew it folds it in afterwards
(:meth:`Store.compact_due`, once its client is gone), without the writers'
lock: under the compactors' lock ``NAME.compact`` it reads a view, streams
its records through ``prune`` into a new snapshot of generation N+1 (temp
file, fsync) whose key ``!from`` holds P, where the journal's acknowledged
part ended. Writers append meanwhile. Then, under the writers' lock and
only for as long as one writer holds it, the new snapshot is renamed in
(fsync of the directory) and the journal is replaced by generation N+1
holding what was appended past P (the same way). Snapshot N+1 with journal
N means "journal N from byte P on", so a crash between the two renames
loses nothing, and the next writer rewrites that journal as generation N+1
before it appends, as it does a journal whose tail a crash left unfinished.
A compaction killed or failing anywhere leaves the store as it was,
serving. Anything else that does not parse is corruption, which
:class:`StoreCorrupt` reports and callers treat as "refuse everyone".

Every store file is at most MAX_FILE bytes: readers call a larger one
corrupt, writers write none, and :meth:`View.full` tells the policy to
take no new key once snapshot and journal pass half of it, so a compaction
always fits.

Root never works in the state directory as root when someone else owns it
(:class:`StateDir`): it reaches the directory without following a link,
then switches its effective ids to the directory's owner and group (and
drops its supplementary groups) for as long as it works there, so it can
do nothing there that the owner could not do itself; the files it creates
are the owner's from the start. Every store file is opened relative to the
directory's descriptor with ``O_NOFOLLOW``; temporary files get a random
name and ``O_EXCL``. A state directory that others than its owner may
write, or (with ``editor``) one that is not the config editor's own, root
refuses.
"""

import errno
import os
import stat
import zlib
from fcntl import LOCK_EX, LOCK_NB, flock

from .cdb import HEADER_LEN, CdbError, Reader

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from types import TracebackType
    from typing import BinaryIO

    from .cdb import Data

    Records = Callable[[], Iterator[tuple[bytes, bytes]]]
    Prune = Callable[[Records], Iterable[tuple[bytes, bytes]]]

MAGIC = b"ostiary-journal "
GEN_KEY = b"!gen"
FROM_KEY = b"!from"  # in snapshot N+1: where in journal N its fold ended
COUNT_KEY = b"!count"  # in a snapshot: how many of its keys do not start with "!"
SNAPSHOT_KEYS = (GEN_KEY, FROM_KEY, COUNT_KEY)  # the snapshot's own: not records
DELETED = b"-"
MORE = b"+"
MIN_JOURNAL = 16 * 1024
MAX_JOURNAL = 128 * 1024
JOURNAL_SHARE = 16  # the journal may grow to this fraction of the snapshot
READ_MAX = 256 << 10  # a snapshot up to this size is read, a larger one mapped
MAX_FILE = 64 << 20  # the largest store file: readers call a larger one corrupt, writers write none


class StoreError(Exception):
    """The store cannot be used (missing directory, permissions)."""


class StoreCorrupt(StoreError):
    """A store file does not parse: fail closed."""


def numeric(raw: bytes) -> bool:
    """True for a number of a store file: 1 to 18 decimal digits (int() refuses over 4,300)."""
    return 0 < len(raw) <= 18 and raw.isdigit()


def number(raw: bytes, what: str) -> int:
    """Return the decimal number ``raw`` of a store record; StoreCorrupt unless :func:`numeric`."""
    if not numeric(raw):
        raise StoreCorrupt(f"{what} does not parse: {raw[:60]!r}")
    return int(raw)


def lookup(reader: Reader, key: bytes, path: str) -> bytes | None:
    """Return the snapshot's value for ``key``, or None; StoreCorrupt if the file lies."""
    try:
        return reader.get(key)
    except CdbError as e:
        raise StoreCorrupt(f"{path}: {e}") from None


def journal_lines(pending: dict[bytes, bytes], crc: int) -> bytes:
    """Return one transaction's journal lines, to follow a journal whose CRC-32 is ``crc``.

    Each line's checksum covers the journal from its first byte to that
    checksum; all lines but the last end in ``+``. No records, no lines.
    """
    if not pending:
        return b""
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
    ``torn``: the file goes on past it (a crash cut a write short). Its
    records are those from byte ``start`` on (0: all; see ``!from``).
    """

    def __init__(self, data: bytes, name: str, start: int = 0) -> None:
        head_end = data.find(b"\n")
        gen = data[len(MAGIC) : head_end]
        if not data.startswith(MAGIC) or head_end < 0 or not numeric(gen):
            raise StoreCorrupt(f"{name}: bad journal header")
        end = data.rfind(b"\n") + 1
        while end > head_end + 1 and data[end - 2 : end - 1] == MORE:
            end = data.rfind(b"\n", 0, end - 1) + 1
        if end > head_end + 1:  # the last line's checksum covers everything before it
            crc = zlib.crc32(memoryview(data)[: end - 9])
            if data[end - 10 : end - 9] != b" " or data[end - 9 : end - 1] != b"%08x" % crc:
                raise StoreCorrupt(f"{name}: checksum mismatch: the journal was damaged")
            crc = zlib.crc32(data[end - 9 : end], crc)
        else:
            crc = zlib.crc32(data[:end])
        if start and not (
            head_end < start <= end
            and data[start - 1 : start] == b"\n"
            and data[start - 2 : start - 1] != MORE
        ):
            raise StoreCorrupt(f"{name}: the snapshot's fold ends where no transaction does")
        self.name = name
        self.gen = int(gen)
        self.data = data
        self.head_end = max(head_end, start - 1)  # the newline before the first record
        self.end = end
        self.crc = crc
        self.torn = len(data) != end

    def last(self, key: bytes) -> bytes | None:
        """Return the newest value for ``key``, or None."""
        start = self.data.rfind(b"\n" + key + b" ", self.head_end, self.end)
        if start < 0:
            return None
        line = self.data[start + 1 : self.data.index(b"\n", start + 1)].rstrip(MORE)
        return line[len(key) + 1 : -9]

    def records(self) -> list[tuple[bytes, bytes]]:
        """Return every (key, value), oldest first."""
        out = []
        for line in self.data[self.head_end + 1 : self.end].split(b"\n")[:-1]:
            key, sep, value = line.rstrip(MORE)[:-9].partition(b" ")
            if not sep or not key:
                raise StoreCorrupt(
                    f"{self.name}: journal record that does not parse: {line[:60]!r}"
                )
            out.append((key, value))
        return out


class View:
    """A consistent picture of the store: a snapshot and its journal."""

    def __init__(
        self, path: str, reader: Reader, gen: int, journal: Journal | None, marked: bool = False
    ) -> None:
        """``journal``: None when no journal of this generation exists; ``marked``: Store.mark."""
        self.path = path
        self.reader = reader
        self.gen = gen
        self.journal = journal
        self.marked = marked
        self.cache: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        """Return the current value of ``key``, or None."""
        if key in self.cache:
            return self.cache[key]
        value = None if self.journal is None else self.journal.last(key)
        if value is None:
            value = lookup(self.reader, key, self.path)
        value = None if value == DELETED else value
        self.cache[key] = value
        return value

    def items(self) -> dict[bytes, bytes]:
        """Return every live key and value (the snapshot with the journal folded in)."""
        return dict(self.records())

    def changes(self) -> dict[bytes, bytes]:
        """Return what the journal holds over the snapshot: each key's newest value."""
        return {} if self.journal is None else dict(self.journal.records())

    def records(self) -> "Iterator[tuple[bytes, bytes]]":
        """Yield every live key and value, the snapshot's first, holding only the journal's."""
        changed = self.changes()
        try:
            for key, value in self.reader.items():
                if key not in changed and key not in SNAPSHOT_KEYS:
                    yield key, value
        except CdbError as e:
            raise StoreCorrupt(f"{self.path}: {e}") from None
        for key, value in changed.items():
            if value != DELETED:
                yield key, value

    def size(self) -> int:
        """Return the bytes of snapshot and journal."""
        return len(self.reader.data) + (0 if self.journal is None else len(self.journal.data))

    def full(self) -> bool:
        """True once the store is past half of MAX_FILE: then it takes no new key."""
        return self.size() > MAX_FILE // 2

    def count(self) -> int:
        """Return how many live keys do not start with ``!`` (addresses and prefixes)."""
        raw = lookup(self.reader, COUNT_KEY, self.path)
        if raw is None:  # a snapshot of 0.2.0: count them
            return sum(1 for k, _ in self.records() if not k.startswith(b"!"))
        n = number(raw, f"{self.path}: its !count record")
        for key, value in self.changes().items():
            if not key.startswith(b"!"):
                before = lookup(self.reader, key, self.path) is not None
                n += (value != DELETED) - before
        return n


FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # no link followed; a FIFO must not hang us
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class StateDir:
    """The state directory's descriptor, and root's identity there, from enter to exit.

    As root the directory is reached from ``/`` one component at a time
    without following a link; one that others than its owner may write is
    refused, and so is one not owned by ``editor`` (the uid besides root's
    that may edit the config naming it; -1: a group may). Then, if the
    owner is not root, the effective uid and gid become the owner's and
    the directory's group, with no supplementary group, until exit.
    Others just open the directory.
    """

    def __init__(self, path: str, editor: int = 0) -> None:
        self.path = os.path.dirname(os.path.abspath(path))
        self.editor = editor
        self.fd = -1
        self.restore: tuple[int, list[int]] | None = None

    def __enter__(self) -> int:
        d = self.path
        try:
            if os.geteuid() != 0:
                self.fd = os.open(d, DIR_FLAGS)
                return self.fd
            self.fd = os.open("/", DIR_FLAGS)
            for part in d.split("/"):
                if part:
                    fd = os.open(part, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self.fd)
                    os.close(self.fd)
                    self.fd = fd
            st = os.fstat(self.fd)
        except FileNotFoundError:
            self.close()
            raise StoreError(f"state directory {d} does not exist") from None
        except OSError as e:
            self.close()
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StoreError(
                    f"state directory {d}: the way there is a symbolic link or "
                    "not a directory: root follows no link to its state"
                ) from None
            raise StoreError(f"unable to open state directory {d}: {e.strerror}") from None
        why = None
        if st.st_mode & 0o022:
            why = (
                f"others than its owner may write it (mode {st.st_mode & 0o7777:o}): chmod go-w {d}"
            )
        elif self.editor < 0:
            why = "the config naming it is writable by a group: chmod g-w it"
        elif self.editor and st.st_uid != self.editor:
            why = (
                f"it is uid {st.st_uid}'s, but the config naming it is uid {self.editor}'s, "
                f"who may not choose where root writes"
            )
        if why is not None:
            self.close()
            raise StoreError(f"state directory {d}: root will not work in it: {why}")
        if st.st_uid != 0:
            self.restore = (os.getegid(), os.getgroups())
            os.setgroups([])
            os.setegid(st.st_gid)
            os.seteuid(st.st_uid)
        return self.fd

    def close(self) -> None:
        """Close the directory's descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __exit__(
        self,
        exc_type: "type[BaseException] | None",
        exc: "BaseException | None",
        tb: "TracebackType | None",
    ) -> None:
        if self.restore is not None:
            os.seteuid(0)
            os.setegid(self.restore[0])
            os.setgroups(self.restore[1])
            self.restore = None
        self.close()


class Store:
    """Reader and writer of one lockout store.

    ``prune(records)`` returns what survives a compaction, ``records()``
    yielding the store's records afresh at each call (None keeps everything);
    ``editor``: see :class:`StateDir`.
    """

    def __init__(self, path: str, prune: "Prune | None" = None, editor: int = 0) -> None:
        self.path = path
        self.journal = path + ".journal"
        self.name = os.path.basename(path)
        self.prune = prune
        self.editor = editor
        self.due = False  # a write of ours left the journal past its threshold
        self.last_view: View | None = None  # the newest view() returned, for a read that may lag

    def state_dir(self) -> StateDir:
        """Return the state directory, to enter (see :class:`StateDir`)."""
        return StateDir(self.path, self.editor)

    def _open(self, dfd: int, name: str) -> "tuple[int, os.stat_result] | None":
        """Open store file ``name`` for reading: (descriptor, stat), None if it does not exist."""
        path = os.path.join(os.path.dirname(self.path), name)
        try:
            fd = os.open(name, os.O_RDONLY | FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StoreCorrupt(f"{path}: a symbolic link, not a store file") from None
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

    def _read(self, dfd: int, name: str) -> bytes | None:
        """Return the content of store file ``name``, None if it does not exist."""
        opened = self._open(dfd, name)
        if opened is None:
            return None
        try:
            with open(opened[0], "rb", buffering=0) as f:
                return f.readall()
        except OSError as e:
            path = os.path.join(os.path.dirname(self.path), name)
            raise StoreError(f"unable to read {path}: {e.strerror}") from None

    def _map(self, dfd: int) -> "tuple[Data, tuple[int, int]] | None":
        """Read the snapshot (map it, past READ_MAX bytes); return it and its (device, inode).

        None if it does not exist. A snapshot is never written in place, so
        what was read stays true. Reading spares a small store's handler
        the mmap module (a shared library of its own in Debian's python3).
        """
        opened = self._open(dfd, self.name)
        if opened is None:
            return None
        fd, st = opened
        try:
            if st.st_size < HEADER_LEN:
                raise StoreCorrupt(f"{self.path}: too short to be a CDB ({st.st_size} bytes)")
            if st.st_size <= READ_MAX:  # short: the header check calls it corrupt
                return os.read(fd, st.st_size), (st.st_dev, st.st_ino)
            from mmap import ACCESS_READ, mmap

            return mmap(fd, 0, access=ACCESS_READ), (st.st_dev, st.st_ino)
        except OSError as e:
            raise StoreError(f"unable to read {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)

    def view(self) -> View | None:
        """Return a consistent view without locking; None if the store does not exist yet."""
        with self.state_dir() as dfd:
            return self._view(dfd)

    def _view(self, dfd: int) -> View | None:
        """:meth:`view`, in the state directory ``dfd``."""
        jname = self.name + ".journal"
        marked = exists(dfd, self.name + MARK)
        for _ in range(50):
            mapped = self._map(dfd)
            if mapped is None:
                if exists(dfd, jname):
                    raise StoreCorrupt(f"{self.path}: missing, but its journal exists")
                if marked:
                    raise StoreCorrupt(f"{self.path}: missing, but {self.path}{MARK} exists")
                return None
            data, identity = mapped
            try:
                reader = Reader(data)
            except CdbError as e:
                raise StoreCorrupt(f"{self.path}: {e}") from None
            gen_raw = lookup(reader, GEN_KEY, self.path)
            if gen_raw is None:
                raise StoreCorrupt(f"{self.path}: no generation record")
            gen = number(gen_raw, f"{self.path}: its generation record")
            jdata = self._read(dfd, jname)
            if jdata is None:
                self.last_view = View(self.path, reader, gen, None, marked)
                return self.last_view
            found = Journal(jdata, self.journal)
            jgen = found.gen
            journal: Journal | None = found
            if jgen == gen - 1:  # one behind: folded into this snapshot up to !from
                start = lookup(reader, FROM_KEY, self.path)
                if start is None:  # folded in whole (a snapshot of 0.2.0)
                    journal = None
                else:
                    journal = Journal(jdata, self.journal, number(start, "its !from record"))
            if jgen in (gen, gen - 1):
                self.last_view = View(self.path, reader, gen, journal, marked)
                return self.last_view
            try:
                again = os.stat(self.name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                continue
            if (again.st_dev, again.st_ino) == identity:
                raise StoreCorrupt(
                    f"{self.journal}: generation {jgen} does not match snapshot {gen}"
                )
            # Compactions finished between our two reads: read again.
        raise StoreError(f"{self.path}: changing too fast to read")

    def check_usable(self) -> None:
        """Raise StoreError unless the directory's owner may read and write every store file.

        The handler runs as that user, and root works there as that user
        (see :class:`StateDir`); a file of another owner or mode, say one
        root restored from a backup, locks the handler out though root
        reads it fine.
        """
        d = os.path.dirname(self.path) or "."
        with self.state_dir() as dfd:
            dst = os.fstat(dfd)
            if dst.st_mode & stat.S_IRWXU != stat.S_IRWXU:
                raise StoreError(
                    f"state directory {d}: mode {dst.st_mode & 0o7777:o} keeps its "
                    f"owner from creating files in it: chmod u+rwx {d}"
                )
            for path in (self.path, self.journal, self.path + ".lock", self.path + ".compact"):
                try:
                    st = os.stat(os.path.basename(path), dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_uid != dst.st_uid:
                    raise StoreError(
                        f"{path}: its owner (uid {st.st_uid}) is not the state "
                        f"directory's (uid {dst.st_uid}), so the handler cannot use it: "
                        f"chown {dst.st_uid} {path}"
                    )
                if st.st_mode & (stat.S_IRUSR | stat.S_IWUSR) != stat.S_IRUSR | stat.S_IWUSR:
                    raise StoreError(
                        f"{path}: Permission denied to its owner, the handler "
                        f"(mode {st.st_mode & 0o7777:o}): chmod u+rw {path}"
                    )

    def lock(self, durable: bool = True, dfd: int = -1) -> "Transaction":
        """Take the writers' lock and return a transaction (a context manager).

        ``durable=False`` skips the journal's fdatasync: for updates whose loss
        in a power cut errs on the safe side (a refund), and a later durable
        append to the same journal flushes them too. ``dfd``: the state
        directory, entered already.
        """
        return Transaction(self, durable, dfd)

    def mark(self) -> None:
        """Create the empty file NAME.stopped, which needs no free block, for what cannot wait.

        Views carry it as ``marked`` until a transaction's :meth:`Transaction.unmark`.
        """
        path = self.path + MARK
        try:
            with self.state_dir() as dfd:
                os.close(
                    os.open(
                        os.path.basename(path), os.O_WRONLY | os.O_CREAT | FLAGS, 0o600, dir_fd=dfd
                    )
                )
                os.fsync(dfd)
        except OSError as e:
            raise StoreError(f"unable to create {path}: {e.strerror}") from None

    def compact_due(self) -> int | None:
        """Compact if a write of ours left the journal past its threshold and nobody did since.

        Writes never compact by themselves: the handler calls this once the
        client is gone, so no connection waits for it before its salt.
        Returns the number of entries written, None if nothing was due.
        """
        if not self.due:
            return None
        self.due = False
        view = self.view()
        if view is None or view.journal is None:
            return None
        if view.journal.end <= journal_threshold(len(view.reader.data)):
            return None
        return self.compact(wait=False)

    def compact(self, prune: "Prune | None" = None, wait: bool = True) -> int | None:
        """Fold the journal into a new snapshot, holding the writers' lock only for the swap.

        ``prune`` defaults to the store's. ``wait``: for a compaction already
        running, else return None at once. Returns the number of records
        written, or None when none was: another compaction ran, or the store
        was moved aside meanwhile. Writers go on appending throughout.
        """
        prune = prune or self.prune
        with self.state_dir() as dfd, Lock(dfd, self.path + ".compact", wait) as compacting:
            if not compacting.held:
                return None
            with self.lock(dfd=dfd) as tx:  # nobody else writes a temp file now
                remove_stale_temps(dfd, self)
                tx.settle()
                tx.sync()  # refunds were not: the fold must not pass what is on disk
                view = tx.v
            folded = view.journal
            if folded is None:
                raise StoreError(f"{self.journal}: missing after it was settled")
            fold = folded.end
            written = [0, 0]  # records, of which addresses and prefixes

            def snapshot() -> "Iterator[tuple[bytes, bytes]]":
                yield GEN_KEY, b"%d" % (view.gen + 1)
                for key, value in view.records() if prune is None else prune(view.records):
                    written[0] += 1
                    written[1] += not key.startswith(b"!")
                    yield key, value
                yield FROM_KEY, b"%d" % fold
                yield COUNT_KEY, b"%d" % written[1]

            from .cdb import write_cdb

            tmp = write_temp(dfd, self.path, lambda f: write_cdb(f, snapshot(), MAX_FILE))
            try:
                with self.lock(dfd=dfd) as tx:
                    now = tx.v.journal
                    if (
                        tx.v.gen != view.gen
                        or now is None
                        or now.gen != view.gen
                        or now.data[:fold] != folded.data[:fold]
                    ):  # moved aside (reset), or rewritten: this fold is void
                        return None
                    install(dfd, tmp, self.path)
                    tmp = ""
                    tx.view = self._view(dfd)  # snapshot N+1, journal N from the fold on
                    tx.settle()  # journal N+1: what was appended past the fold
            finally:
                if tmp:
                    unlink_quietly(dfd, tmp)
        return written[0]

    def set_aside(self, suffix: str) -> list[str]:
        """Under the writers' lock, rename the snapshot, journal and mark to NAME + ``suffix``.

        The next writer starts an empty store. Returns the new names.
        """
        moved = []
        with (
            self.state_dir() as dfd,
            Lock(dfd, self.path + ".compact"),
            Lock(dfd, self.path + ".lock"),
        ):
            for path in (self.path, self.journal, self.path + MARK):  # the stopped mark last
                name = os.path.basename(path)
                if exists(dfd, name):
                    try:
                        os.rename(name, name + suffix, src_dir_fd=dfd, dst_dir_fd=dfd)
                    except OSError as e:
                        raise StoreError(f"unable to rename {path}: {e.strerror}") from None
                    moved.append(path + suffix)
            os.fsync(dfd)
        return moved


def exists(dfd: int, name: str) -> bool:
    """True when the state directory ``dfd`` has an entry ``name`` (a link counts)."""
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class Lock:
    """A lock file's flock, held from ``__enter__`` to ``__exit__`` (``wait``: else ``held``)."""

    def __init__(self, dfd: int, path: str, wait: bool = True) -> None:
        self.dfd = dfd
        self.path = path
        self.wait = wait
        self.held = False
        self.fd = -1

    def __enter__(self) -> "Lock":
        name = os.path.basename(self.path)
        try:
            while self.fd < 0:
                try:
                    self.fd = os.open(name, os.O_RDWR | FLAGS, dir_fd=self.dfd)
                except FileNotFoundError:  # the first writer creates it
                    try:
                        self.fd = os.open(
                            name, os.O_RDWR | os.O_CREAT | os.O_EXCL | FLAGS, 0o600, dir_fd=self.dfd
                        )
                    except FileExistsError:  # another first writer did: open that
                        continue
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StoreCorrupt(f"{self.path}: a symbolic link, not a store file") from None
            raise StoreError(f"unable to open {self.path}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise StoreCorrupt(f"{self.path}: not a regular file")
            flock(self.fd, LOCK_EX if self.wait else LOCK_EX | LOCK_NB)
            self.held = True
        except BlockingIOError:
            pass  # not held: someone else holds it
        except OSError as e:
            os.close(self.fd)
            raise StoreError(f"unable to lock {self.path}: {e.strerror}") from None
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(
        self,
        exc_type: "type[BaseException] | None",
        exc: "BaseException | None",
        tb: "TracebackType | None",
    ) -> None:
        os.close(self.fd)


MARK = ".stopped"  # NAME.stopped: see Store.mark
TMP = ".tmp."  # NAME.tmp.RANDOM: a temporary file of NAME


def write_temp(dfd: int, path: str, write: "Callable[[BinaryIO], object]") -> str:
    """Write a new temporary file of ``path`` in ``dfd`` with ``write(file)``; return its name.

    A random name and ``O_EXCL``, so never a file someone else made; synced.
    """
    tmp = os.path.basename(path) + TMP + os.urandom(8).hex()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FLAGS, 0o640, dir_fd=dfd)
        try:
            with open(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(fd)
        except BaseException:
            unlink_quietly(dfd, tmp)
            raise
    except OSError as e:
        raise StoreError(f"unable to write {path}: {e.strerror or e}") from None
    return tmp


def install(dfd: int, tmp: str, path: str) -> None:
    """Rename temporary file ``tmp`` over ``path`` in ``dfd``, then sync the directory."""
    try:
        os.rename(tmp, os.path.basename(path), src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    except OSError as e:
        raise StoreError(f"unable to write {path}: {e.strerror or e}") from None


def replace(dfd: int, path: str, write: "Callable[[BinaryIO], object]") -> None:
    """Atomically replace ``path`` in ``dfd`` by what ``write(file)`` writes."""
    tmp = write_temp(dfd, path, write)
    try:
        install(dfd, tmp, path)
    except BaseException:
        unlink_quietly(dfd, tmp)
        raise


def unlink_quietly(dfd: int, name: str) -> None:
    """Remove ``name`` from ``dfd`` if it is there."""
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def remove_stale_temps(dfd: int, store: "Store") -> None:
    """Remove temporary files a killed writer left behind; callers hold both locks."""
    prefixes = (store.name + TMP, store.name + ".journal" + TMP)
    for name in os.listdir(dfd):
        if name.startswith(prefixes):
            unlink_quietly(dfd, name)


def journal_threshold(snapshot_size: int) -> int:
    """Return the journal size past which a writer compacts."""
    return min(MAX_JOURNAL, max(MIN_JOURNAL, snapshot_size // JOURNAL_SHARE))


class Transaction:
    """Reads see the store as of the lock; puts are written together on exit."""

    def __init__(self, store: Store, durable: bool = True, dfd: int = -1) -> None:
        self.store = store
        self.durable = durable
        self.pending: dict[bytes, bytes] = {}
        self.dir = None if dfd >= 0 else store.state_dir()
        self.dfd = dfd
        self.lock: Lock | None = None
        self.view: View | None = None

    @property
    def v(self) -> View:
        """The view taken under the lock (``with`` sets it)."""
        if self.view is None:
            raise StoreError("a transaction used outside its with-block")
        return self.view

    def __enter__(self) -> "Transaction":
        if self.dir is not None:
            self.dfd = self.dir.__enter__()
        try:
            self.lock = Lock(self.dfd, self.store.path + ".lock").__enter__()
            self.view = self.store._view(self.dfd)
            if self.view is None:
                self._create()
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        """Drop the lock and leave the state directory."""
        try:
            if self.lock is not None:
                self.lock.__exit__(None, None, None)
                self.lock = None
        finally:
            if self.dir is not None:
                self.dir.__exit__(None, None, None)

    @property
    def marked(self) -> bool:
        """True while NAME.stopped exists (see :meth:`Store.mark`)."""
        return self.v.marked

    def unmark(self) -> None:
        """Remove NAME.stopped now (under the lock)."""
        try:
            os.unlink(self.store.name + MARK, dir_fd=self.dfd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"unable to remove {self.store.path + MARK}: {e.strerror}") from None
        self.v.marked = False

    def get(self, key: bytes) -> bytes | None:
        """Return the value of ``key`` including this transaction's puts."""
        if key in self.pending:
            value = self.pending[key]
            return None if value == DELETED else value
        return self.v.get(key)

    def put(self, key: bytes, value: bytes | None) -> None:
        """Set ``key`` (None deletes it) when the transaction commits."""
        if (
            not key
            or b" " in key
            or b"\n" in key
            or key in SNAPSHOT_KEYS
            or (value is not None and (b"\n" in value or value == DELETED))
        ):
            raise ValueError("store keys are one word; values are one line, not '-'")
        self.pending[key] = DELETED if value is None else value

    def items(self) -> dict[bytes, bytes]:
        """Return every live key and value, including this transaction's puts."""
        items = self.v.items()
        for key, value in self.pending.items():
            if value == DELETED:
                items.pop(key, None)
            else:
                items[key] = value
        return items

    def __exit__(
        self,
        exc_type: "type[BaseException] | None",
        exc: "BaseException | None",
        tb: "TracebackType | None",
    ) -> None:
        try:
            if exc_type is None and self.pending:
                self._append()
        finally:
            self._release()

    def _appendable(self) -> Journal | None:
        """The view's journal if writers may append to it: this generation's, not torn."""
        journal = self.v.journal
        ok = journal is not None and not journal.torn and journal.gen == self.v.gen
        return journal if ok else None

    def _append(self) -> None:
        view = self.v
        jpath = self.store.journal
        journal = self._appendable()
        if journal is not None:
            lines = journal_lines(self.pending, journal.crc)
            if journal.end + len(lines) > MAX_FILE:
                raise StoreError(f"{jpath}: full ({journal.end} bytes): compact the store")
            try:
                fd = os.open(
                    os.path.basename(jpath), os.O_WRONLY | os.O_APPEND | FLAGS, dir_fd=self.dfd
                )
                try:
                    if os.write(fd, lines) != len(lines):
                        raise StoreError(f"short write to {jpath}")
                    if self.durable:
                        os.fdatasync(fd)
                except BaseException:  # unacknowledged, so it must not count: cut it off
                    try:
                        os.ftruncate(fd, journal.end)
                    except OSError:
                        pass
                    raise
                finally:
                    os.close(fd)
            except OSError as e:
                raise StoreError(f"unable to append to {jpath}: {e.strerror}") from None
            size = journal.end + len(lines)  # we hold the lock: nobody else appended
        else:  # a crash left no journal of this generation, or an unfinished tail
            size = self._write_journal(self._settled(self.pending))
        self.store.due = size > journal_threshold(len(view.reader.data))
        self.pending.clear()

    def _settled(self, pending: dict[bytes, bytes]) -> bytes:
        """Return a journal of this generation: what the view's holds, then ``pending``.

        An unfinished tail is cut off, keeping the rest byte for byte (a
        compaction may be reading up to its offset); a journal one generation
        behind is rewritten from its ``!from`` on.
        """
        view = self.v
        journal = view.journal
        if journal is not None and journal.gen == view.gen:
            head = journal.data[: journal.end]
            return head + journal_lines(pending, zlib.crc32(head))
        head = MAGIC + b"%d\n" % view.gen
        records = view.changes()
        records.update(pending)
        return head + journal_lines(records, zlib.crc32(head))

    def sync(self) -> None:
        """fdatasync the journal: what unsynced appends (refunds) wrote is on disk after."""
        try:
            fd = os.open(self.store.name + ".journal", os.O_RDONLY | FLAGS, dir_fd=self.dfd)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StoreError(f"unable to sync {self.store.journal}: {e.strerror}") from None

    def settle(self) -> None:
        """Rewrite a journal that is missing, behind or torn, so writers may append to it."""
        if self._appendable() is None:
            self._write_journal(self._settled({}))
            self.view = self.store._view(self.dfd)

    def _create(self) -> None:
        """Write the first, empty snapshot (generation 1) and its journal."""
        from .cdb import write_cdb

        records = [(GEN_KEY, b"1"), (COUNT_KEY, b"0")]
        replace(self.dfd, self.store.path, lambda f: write_cdb(f, records, MAX_FILE))
        self._write_journal(MAGIC + b"1\n")
        self.view = self.store._view(self.dfd)

    def _write_journal(self, data: bytes) -> int:
        """Replace the journal by ``data``; return its size."""
        replace(self.dfd, self.store.journal, lambda f: f.write(data))
        return len(data)
