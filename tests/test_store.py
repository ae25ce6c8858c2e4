"""The lockout store: format, crash safety, concurrency, expiry, IPv6 prefixes.

Crash and concurrency tests run real processes (fork) on a real filesystem and
SIGKILL them at random instants; their small journal thresholds make them
compact every few dozen writes.
"""

from __future__ import annotations

import os
import random
import signal
import time
import traceback
import zlib

import pytest
from cdblib import Reader
from conftest import ROOT
from kit.damage import REPORTED, write_at
from kit.damage import journal as journal_of

from ostiary_ucspi import store as storemod
from ostiary_ucspi.address import key as address_key
from ostiary_ucspi.cdb import write_cdb
from ostiary_ucspi.config import parse
from ostiary_ucspi.policy import (
    ERRORS,
    STOPPED,
    Entry,
    charge,
    doors_due,
    fail,
    pruner,
    refusal,
    stop,
    succeed,
)
from ostiary_ucspi.store import Store, StoreCorrupt, StoreError, journal_lines

NOW = 1_700_000_000
FOUND = ROOT / "tests" / "fuzz" / "corpus" / "journal"  # crash-*: see the README there


def config(extra: str = ""):
    return parse('KILL="kill"\nACTION="open","/bin/true"\n' + extra, "test.cfg")


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "lockout.cdb")


@pytest.fixture
def small_journal(monkeypatch) -> None:
    """Compact every few dozen writes (forked children inherit it)."""
    monkeypatch.setattr(storemod, "MIN_JOURNAL", 2048)
    monkeypatch.setattr(storemod, "MAX_JOURNAL", 2048)


def put(path: str, **kv: bytes | None) -> None:
    store = Store(path)
    with store.lock() as tx:
        for k, v in kv.items():
            tx.put(k.encode(), v)
    store.compact_due()


def fork(fn, *args) -> int:
    """Run ``fn(*args)`` in a child process; it exits 0 if fn returns."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def journal(path: str) -> bytes:
    with open(path + ".journal", "rb") as f:
        return f.read()


# -- format and basic behaviour ---------------------------------------------


def test_missing_store_reads_as_none_and_missing_directory_is_an_error(tmp_path):
    assert Store(str(tmp_path / "lockout.cdb")).view() is None
    with pytest.raises(StoreError, match="does not exist"):
        Store(str(tmp_path / "no" / "lockout.cdb")).view()
    with pytest.raises(StoreError, match="does not exist"):
        with Store(str(tmp_path / "no" / "lockout.cdb")).lock():
            pass


def test_puts_reach_the_journal_then_a_compaction_folds_them_in(path):
    put(path, a=b"1", b=b"two words")
    put(path, a=b"3", c=b"")
    put(path, b=None)
    view = Store(path).view()
    assert (view.get(b"a"), view.get(b"b"), view.get(b"c")) == (b"3", None, b"")
    assert view.items() == {b"a": b"3", b"c": b""}
    assert Reader(open(path, "rb").read()).get(b"a") is None  # still only in the journal
    assert Store(path).compact() == 2
    assert journal(path) == b"ostiary-journal 2\n"
    plain = Reader(open(path, "rb").read())  # pure-cdb's own reader
    assert (plain.get(b"!gen"), plain.get(b"a"), plain.get(b"b"), plain.get(b"c")) == (
        b"2",
        b"3",
        None,
        b"",
    )
    assert Store(path).view().items() == {b"a": b"3", b"c": b""}


def test_transaction_sees_its_own_puts_and_writes_them_as_one(path):
    with Store(path).lock() as tx:
        tx.put(b"k", b"v")
        tx.put(b"gone", None)
        assert tx.get(b"k") == b"v" and tx.get(b"gone") is None
        assert tx.items() == {b"k": b"v"}
        assert Store(path).view().get(b"k") is None  # not before commit
    lines = journal(path).split(b"\n")
    assert lines[1].startswith(b"k v ") and lines[1].endswith(b"+")
    assert lines[2].startswith(b"gone - ") and not lines[2].endswith(b"+")


def test_charges_are_synced_to_disk_and_refunds_are_not(path, monkeypatch):
    """A charge must survive a power cut before the salt goes out; a lost refund errs safe."""
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(storemod.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    cfg = parse('KILL="kill-kill-kill"\nACTION="open-open-open","/bin/true"\n', "t.cfg")
    store = Store(path)
    with store.lock() as tx:  # the journal exists: what follows are appends
        tx.put(b"10.0.0.9", b"x")
    synced.clear()
    assert charge(store, b"10.0.0.1", cfg, 1000).refused is None
    assert len(synced) == 1
    succeed(store, b"10.0.0.1")
    assert len(synced) == 1
    assert Entry(store.view().get(b"10.0.0.1")).strikes == 0


def test_an_exception_in_a_transaction_writes_nothing(path):
    put(path, k=b"1")
    with pytest.raises(RuntimeError):
        with Store(path).lock() as tx:
            tx.put(b"k", b"2")
            raise RuntimeError
    assert Store(path).view().get(b"k") == b"1"


@pytest.mark.parametrize(
    "key, value",
    [(b"", b"v"), (b"a b", b"v"), (b"a\nb", b"v"), (b"k", b"a\nb"), (b"!gen", b"5"), (b"k", b"-")],
)
def test_put_refuses_what_the_journal_cannot_hold(path, key, value):
    with Store(path).lock() as tx, pytest.raises(ValueError):
        tx.put(key, value)


def test_lookup_does_not_confuse_keys_that_share_a_prefix_or_suffix(path):
    put(path, **{"1.2.3.4": b"a", "11.2.3.4": b"b", "1.2.3.45": b"c"})
    view = Store(path).view()
    assert [view.get(k) for k in (b"1.2.3.4", b"11.2.3.4", b"1.2.3.45", b"1.2.3")] == [
        b"a",
        b"b",
        b"c",
        None,
    ]


def test_snapshot_reader_agrees_with_pure_cdb(path):
    rng = random.Random(7)
    items = {
        b"%d.%d.%d.%d" % tuple(rng.randrange(256) for _ in range(4)): b"%d" % i for i in range(3000)
    }
    items[b"39.160.226.88"] = b"its djb hash is 0"
    with Store(path).lock() as tx:
        for k, v in items.items():
            tx.put(k, v)
    Store(path).compact()
    view = Store(path).view()
    plain = Reader(open(path, "rb").read())
    for k in list(items)[:500] + [b"39.160.226.88", b"nope", b"1.1.1.1"]:
        assert view.get(k) == plain.get(k) == items.get(k)
    assert view.items() == items


def test_journal_grows_to_its_threshold_then_is_compacted(path, small_journal):
    gens = set()
    expected = {}
    for i in range(200):
        key = f"k{i % 50}"  # overwrites, and records only the last compaction could keep
        put(path, **{key: b"%d %s" % (i, b"x" * 40)})
        expected[key.encode()] = b"%d %s" % (i, b"x" * 40)
        assert os.path.getsize(path + ".journal") <= 2048
        view = Store(path).view()
        assert view.get(key.encode()) == expected[key.encode()]
        gens.add(view.gen)
    assert len(gens) > 3
    assert Store(path).view().items() == expected


# -- corruption: fail closed, say what is wrong -------------------------------


@pytest.mark.parametrize("damage, message", list(REPORTED.values()), ids=list(REPORTED))
def test_a_damaged_store_is_reported_corrupt(path, damage, message):
    put(path, a=b"1")
    damage(path)
    with pytest.raises(StoreCorrupt, match=message):
        Store(path).view()
    with pytest.raises(StoreCorrupt, match=message):
        with Store(path).lock():
            pass


def test_a_journal_generation_too_long_is_corrupt(path):
    """5,000 digits: once a ValueError (Python's int() refuses over 4,300)."""
    put(path, a=b"1")
    journal_of(path).write_bytes((FOUND / "crash-long-generation").read_bytes())
    for read in (lambda: Store(path).view(), lambda: Store(path).lock().__enter__()):
        with pytest.raises(StoreCorrupt, match="lockout.cdb.journal: bad journal header"):
            read()


def test_a_lockout_record_with_a_field_too_long_is_corrupt(path):
    """A checksummed record of 192.0.2.8 whose strikes have 5,000 digits: once a ValueError."""
    put(path, a=b"1")
    journal_of(path).write_bytes((FOUND / "crash-long-record").read_bytes())
    view = Store(path).view()
    assert view.get(b"192.0.2.8").startswith(b"1" * 5000 + b" ")
    with pytest.raises(StoreCorrupt, match="lockout record does not parse"):
        refusal(view, b"192.0.2.8", 3)


@pytest.mark.parametrize("line, byte", [(1, b"7"), (1, b"x"), (2, b"3"), (3, b"0")])
def test_damage_to_any_acknowledged_journal_byte_is_corruption(path, line, byte):
    """Even in a record of another key, or one whose key it garbles: the checksums chain."""
    put(path, a=b"1")
    put(path, b=b"2")
    put(path, c=b"3")
    data = journal(path)
    start = [i + 1 for i, c in enumerate(data) if c == 10][line - 1]
    offset = start + {b"7": 2, b"x": 0, b"3": 2, b"0": 4}[byte]  # the value, the key, a checksum
    assert data[offset : offset + 1] != byte
    write_at(journal_of(path), offset, byte)
    for read in (lambda: Store(path).view(), lambda: Store(path).lock().__enter__()):
        with pytest.raises(StoreCorrupt, match="lockout.cdb.journal: checksum mismatch"):
            read()


def test_journal_checksums_chain_from_the_first_byte(path):
    put(path, a=b"1")
    put(path, b=b"2", c=b"")
    data = journal(path)
    assert data.split(b"\n")[1:-1] == [
        b"a 1 %08x" % zlib.crc32(b"ostiary-journal 1\na 1 "),
        b"b 2 %08x+" % zlib.crc32(data[: data.index(b"b 2 ") + 4]),
        b"c  %08x" % zlib.crc32(data[: data.index(b"c  ") + 3]),
    ]


# -- crash safety: every instant --------------------------------------------


def test_a_cut_line_and_an_unfinished_transaction_are_ignored_then_rewritten(path):
    put(path, a=b"1")
    for i in range(3):
        committed = journal(path)
        tail = journal_lines({b"a": b"2", b"b": b"2"}, zlib.crc32(committed))
        cut = (tail[:5], tail[: tail.index(b"\n") + 1], tail[:-1])[i]
        before = Store(path).view().items()
        with open(path + ".journal", "wb") as f:
            f.write(committed + cut)
        view = Store(path).view()
        assert view.items() == before and view.journal.torn
        put(path, **{f"c{i}": b"3"})  # the next writer drops the tail before it appends
        assert journal(path) == committed + journal_lines({b"c%d" % i: b"3"}, zlib.crc32(committed))
        assert Store(path).view().items() == {**before, b"c%d" % i: b"3"}


def crash_at(path: str, victim: str, after: int) -> None:
    """In a child, compact the store and die (SIGKILL) at the ``after``-th call of os.``victim``.

    Its calls, in order: fsync of the new snapshot, rename, fsync of the directory;
    the same for the new journal.
    """

    def child():
        real = getattr(os, victim)
        calls = []

        def dying(*args, **kw):
            calls.append(args)
            if len(calls) == after:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kw)

        setattr(os, victim, dying)
        with Store(path).lock() as tx:
            tx.put(b"pending", b"folded in")
        Store(path).compact()

    assert wait(fork(child)) == -signal.SIGKILL


@pytest.mark.parametrize(
    "victim, after", [("fsync", 1), ("rename", 1), ("fsync", 3), ("rename", 2)]
)
def test_sigkill_inside_a_compaction_loses_nothing(path, victim, after):
    put(path, a=b"1")
    put(path, b=b"2")
    crash_at(path, victim, after)
    items = Store(path).view().items()
    assert items[b"a"] == b"1" and items[b"b"] == b"2"
    assert items.get(b"pending") in (None, b"folded in")
    put(path, c=b"3")
    assert Store(path).view().items() == {**items, b"c": b"3"}


def test_crash_between_the_two_renames_leaves_a_folded_journal(path):
    put(path, a=b"1")
    crash_at(path, "rename", 2)  # the snapshot is renamed, the journal is not
    assert Store(path).view().gen == 2
    assert journal(path).startswith(b"ostiary-journal 1\na 1 ")
    view = Store(path).view()
    assert view.journal.records() == []  # journal 1 holds nothing past snapshot 2's !from
    assert view.items() == {b"a": b"1", b"pending": b"folded in"}
    put(path, b=b"2")  # writes a journal of generation 2
    assert journal(path).startswith(b"ostiary-journal 2\n")
    assert Store(path).view().items() == {b"a": b"1", b"pending": b"folded in", b"b": b"2"}


def late_writer(monkeypatch, path: str, **late: bytes) -> None:
    """Make the first fsync (the new snapshot's, before the swap) be followed by ``put(**late)``.

    The put takes the writers' lock: were the compaction holding it, the test would hang.
    """
    real = os.fsync
    done: list[int] = []

    def fsync(fd: int) -> None:
        real(fd)
        if not done:
            done.append(fd)
            put(path, **late)

    monkeypatch.setattr(storemod.os, "fsync", fsync)


def test_writers_append_while_a_compaction_builds_and_nothing_is_lost(path, monkeypatch):
    put(path, a=b"1", b=b"1")
    late_writer(monkeypatch, path, late=b"2", b=None)
    assert Store(path).compact() == 2  # a and b, as the journal stood when it began
    view = Store(path).view()
    assert view.gen == 2 and view.items() == {b"a": b"1", b"late": b"2"}
    assert journal(path).startswith(b"ostiary-journal 2\n")
    assert [k for k, _ in view.journal.records()] == [b"late", b"b"]  # only what came late


def test_a_crash_before_the_journal_is_replaced_keeps_what_came_late(path, monkeypatch):
    put(path, a=b"1")

    def child() -> None:
        late_writer(monkeypatch, path, late=b"2")
        real = os.rename
        calls: list[object] = []

        def rename(*args: object, **kw: object) -> None:
            calls.append(args)
            if len(calls) == 2:  # the journal's
                os.kill(os.getpid(), signal.SIGKILL)
            real(*args, **kw)

        monkeypatch.setattr(storemod.os, "rename", rename)
        Store(path).compact()

    assert wait(fork(child)) == -signal.SIGKILL
    view = Store(path).view()
    assert view.gen == 2 and journal(path).startswith(b"ostiary-journal 1\n")
    assert view.items() == {b"a": b"1", b"late": b"2"}
    put(path, c=b"3")  # the next writer rewrites the journal as generation 2 from !from on
    assert journal(path).startswith(b"ostiary-journal 2\nlate 2 ")
    assert Store(path).view().items() == {b"a": b"1", b"late": b"2", b"c": b"3"}


def test_a_compaction_already_running_is_not_waited_for(path):
    put(path, a=b"1")
    store = Store(path)
    with store.state_dir() as dfd, storemod.Lock(dfd, path + ".compact"):
        assert store.compact(wait=False) is None
    assert store.compact(wait=False) == 1


def test_sigkill_in_the_middle_of_an_append(path):
    put(path, a=b"1")

    def child():
        real = os.write

        def half(fd, data):
            real(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        os.write = half
        with Store(path).lock() as tx:
            tx.put(b"a", b"2")
            tx.put(b"b", b"2")

    assert wait(fork(child)) == -signal.SIGKILL
    assert Store(path).view().items() == {b"a": b"1"}  # all or nothing
    put(path, c=b"3")
    assert Store(path).view().items() == {b"a": b"1", b"c": b"3"}


def charger(path: str, key: bytes, wfd: int) -> None:
    """Charge ``key`` forever; write one byte to ``wfd`` after each acknowledged charge."""
    store = Store(path)
    cfg = config("MAX_BAD_CONNS=1000000000\n")
    while True:
        assert charge(store, key, cfg, int(time.time())).refused is None
        os.write(wfd, b".")


def compactor(path: str) -> None:
    store = Store(path)
    while True:
        store.compact()


def test_sigkill_at_random_instants_loses_no_acknowledged_strike(path, monkeypatch):
    monkeypatch.setattr(storemod, "MIN_JOURNAL", 8192)
    monkeypatch.setattr(storemod, "MAX_JOURNAL", 8192)
    with Store(path).lock() as tx:  # enough records that a compaction takes a while
        for i in range(3000):
            tx.put(b"192.0.%d.%d" % (i >> 8, i & 255), b"1 1 0 %d" % NOW)
    keys = [b"10.0.0.%d" % i for i in range(3)]
    strikes = dict.fromkeys(keys, 0)
    rng = random.Random(11)
    deadline = time.monotonic() + 8
    rounds = mid_compaction = 0
    while time.monotonic() < deadline:
        rounds += 1
        pipes = {k: os.pipe() for k in keys}
        pids = [fork(charger, path, k, pipes[k][1]) for k in keys] + [fork(compactor, path)]
        for _, w in pipes.values():
            os.close(w)
        time.sleep(rng.uniform(0.02, 0.25))
        for pid in rng.sample(pids, len(pids)):
            os.kill(pid, signal.SIGKILL)
            time.sleep(rng.uniform(0, 0.005))
        for pid in pids:
            assert wait(pid) == -signal.SIGKILL, "a worker failed"
        d, name = os.path.split(path)
        temps = [n for n in os.listdir(d) if n.startswith((name + ".tmp.", name + ".journal.tmp."))]
        mid_compaction += bool(temps)
        items = Store(path).view().items()
        assert len(items) == 3000 + len(keys) + 1
        for k, (r, _) in pipes.items():
            with os.fdopen(r, "rb") as f:
                acked = len(f.read())
            now = Entry(items[k]).strikes
            # every acknowledged charge is there, and at most one that was not
            assert strikes[k] + acked <= now <= strikes[k] + acked + 1, (k, strikes[k], acked, now)
            strikes[k] = now
        assert int(items[ERRORS]) == sum(strikes.values())  # no transaction half-written
    assert rounds >= 5 and min(strikes.values()) > 20 and mid_compaction > 0


# -- lock-free readers --------------------------------------------------------


def test_readers_never_see_a_torn_store_while_writers_compact(path, small_journal):
    put(path, fixed=b"stays", counter=b"0")

    def writer():
        for i in range(1, 400):
            put(path, counter=b"%d" % i)

    pid = fork(writer)
    last = 0
    store = Store(path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = store.view()
        assert view.get(b"fixed") == b"stays"
        n = int(view.get(b"counter"))
        assert n >= last
        last = n
        if n == 399:
            break
    assert wait(pid) == 0


# -- concurrency: writers serialised, nothing lost ------------------------------


def worker(path: str, n: int, own: bytes) -> None:
    store = Store(path, prune=pruner(config(), int(time.time())))
    cfg = config("MAX_BAD_CONNS=1000000\n")
    for i in range(n):
        assert charge(store, b"203.0.113.1", cfg, int(time.time())).refused is None
        assert charge(store, own, cfg, int(time.time())).refused is None
        if i % 2:
            succeed(store, b"203.0.113.1")
        store.compact_due()


def test_two_first_writers_racing_to_create_the_lock_both_take_it(path, monkeypatch):
    real = os.open
    raced: list[str] = []

    def racing(name, flags, *args, **kw):
        if name.endswith(".lock") and not raced and not flags & os.O_CREAT:
            raced.append(name)  # another first writer creates it between our two opens
            os.close(real(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600, **kw))
            raise FileNotFoundError(name)
        return real(name, flags, *args, **kw)

    monkeypatch.setattr(storemod.os, "open", racing)
    put(path, a=b"1")
    assert raced and Store(path).view().get(b"a") == b"1"


def test_many_processes_charging_and_refunding_get_exact_counts(path, small_journal):
    procs, n = 8, 40
    pids = [fork(worker, path, n, b"198.51.100.%d" % p) for p in range(procs)]
    assert [wait(pid) for pid in pids] == [0] * procs
    view = Store(path).view()
    assert view.gen > 5  # compactions happened meanwhile
    shared = Entry(view.get(b"203.0.113.1"))
    assert shared.errors == procs * n - procs * (n // 2)
    for p in range(procs):
        own = Entry(view.get(b"198.51.100.%d" % p))
        assert (own.strikes, own.errors) == (n, n)
    assert int(view.get(ERRORS)) == 2 * procs * n - procs * (n // 2)


# -- expiry ----------------------------------------------------------------------


def test_compaction_expires_strikes_and_old_locks_but_keeps_the_rest(path):
    cfg = config("STRIKE_EXPIRE=3600\nLOCKOUT_EXPIRE=86400\n")
    records = {
        b"10.0.0.1": b"2 2 0 %d" % (NOW - 3601),  # strikes too old: dropped
        b"10.0.0.2": b"2 2 0 %d" % (NOW - 3600),  # just in time: kept
        b"10.0.0.3": b"3 3 %d %d" % (NOW - 86400, NOW),  # locked a day ago: unlocked
        b"10.0.0.4": b"3 3 %d %d" % (NOW - 86399, NOW - 86399),  # locked, not for long enough
        STOPPED: b"%d KILL from 10.0.0.9" % (NOW - 10**6),
        ERRORS: b"12",
    }
    for k, v in records.items():
        put(path, **{k.decode(): v})
    assert Store(path).compact(pruner(cfg, NOW)) == 4
    assert set(Store(path).view().items()) == {b"10.0.0.2", b"10.0.0.4", STOPPED, ERRORS}


def test_locks_never_expire_by_default(path):
    put(path, **{"10.0.0.3": b"3 3 %d %d" % (NOW - 10**8, NOW - 10**8)})
    Store(path).compact(pruner(config(), NOW))
    assert refusal(Store(path).view(), b"10.0.0.3", 3) == "locked out"


def test_a_lock_runs_out_at_lockout_expire_without_waiting_for_a_compaction(path):
    cfg = config("LOCKOUT_EXPIRE=60\n")
    put(path, **{"10.0.0.3": b"3 3 %d %d" % (NOW, NOW)})
    store = Store(path)  # no compaction in between: the record stays as it is
    assert refusal(store.view(), b"10.0.0.3", 3, cfg.lockout_expire, NOW + 59) == "locked out"
    assert charge(store, b"10.0.0.3", cfg, NOW + 59).refused == "locked out"
    assert refusal(store.view(), b"10.0.0.3", 3, cfg.lockout_expire, NOW + 60) is None
    assert charge(store, b"10.0.0.3", cfg, NOW + 60).refused is None
    entry = Entry(store.view().get(b"10.0.0.3"))
    assert (entry.strikes, entry.locked_since) == (1, 0)  # charged afresh
    assert fail(store, b"10.0.0.3", cfg, NOW + 61) == (False, None)
    for _ in range(2):
        charge(store, b"10.0.0.3", cfg, NOW + 62)
        locked, _ = fail(store, b"10.0.0.3", cfg, NOW + 62)
    assert locked  # and it can be locked again, LOCKOUT_ACTION and all
    assert Entry(store.view().get(b"10.0.0.3")).locked_since == NOW + 62


def test_the_handlers_automatic_compaction_applies_expiry(path, small_journal):
    cfg = config()
    put(path, **{"10.9.9.9": b"1 1 0 %d" % (NOW - 86401), "10.9.9.8": b"1 1 0 %d" % NOW})
    store = Store(path, prune=pruner(cfg, NOW))
    gen = store.view().gen
    i = 0
    while store.view().gen == gen:
        assert charge(store, b"10.1.%d.%d" % (i >> 8, i & 255), cfg, NOW).refused is None
        store.compact_due()
        i += 1
    items = store.view().items()
    assert b"10.9.9.9" not in items and b"10.9.9.8" in items


# -- policy on the store: IPv6 prefixes, stopped state -----------------------------


def test_ipv6_counts_per_prefix_ipv4_per_address(path):
    cfg = config()
    store = Store(path)
    rotating = ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2:1234:5678:9abc:def0"]
    for ip in rotating:
        key = address_key(ip)
        assert key == b"2001:db8:1:2::/64"
        assert refusal(store.view(), key, 3) is None
        assert charge(store, key, cfg, NOW).refused is None
        fail(store, key, cfg, NOW)
    assert refusal(store.view(), address_key("2001:db8:1:2:dead::1"), 3) == "locked out"
    assert refusal(store.view(), address_key("2001:db8:1:3::1"), 3) is None
    assert refusal(store.view(), address_key("192.0.2.1"), 3) is None
    for i in range(3):
        charge(store, address_key("192.0.2.%d" % i), cfg, NOW)
    assert refusal(store.view(), address_key("192.0.2.3"), 3) is None
    assert address_key("::ffff:192.0.2.1") == b"192.0.2.1"


def test_ipv6_prefix_length_follows_the_config(path):
    cfg = config("IPV6_PREFIX=48\n")
    store = Store(path)
    for i in range(3):
        key = address_key("2001:db8:7:%x::1" % i, cfg.ipv6_prefix)
        assert key == b"2001:db8:7::/48"
        charge(store, key, cfg, NOW)
        fail(store, key, cfg, NOW)
    assert refusal(store.view(), address_key("2001:db8:7:ffff::1", 48), 3) == "locked out"
    assert address_key("2001:db8::1", 128) == b"2001:db8::1/128"


def test_the_stopped_state_lives_in_the_store_and_refuses_everyone(path):
    with Store(path).lock() as tx:
        stop(tx, NOW, "KILL from 192.0.2.1")
        stop(tx, NOW + 1, "a later reason")
    assert Store(path).view().get(STOPPED) == b"%d KILL from 192.0.2.1" % NOW
    assert refusal(Store(path).view(), b"198.51.100.7", 3) == "service stopped: KILL from 192.0.2.1"
    Store(path).compact(pruner(config(), NOW + 10**8))
    assert refusal(Store(path).view(), b"198.51.100.7", 3).startswith("service stopped")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change owners")
def test_files_root_writes_belong_to_the_directorys_owner(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    os.chown(d, 65534, 65534)
    path = str(d / "lockout.cdb")
    put(path, a=b"1")
    Store(path).compact()
    for name in ("lockout.cdb", "lockout.cdb.journal", "lockout.cdb.lock"):
        st = os.stat(d / name)
        assert (st.st_uid, st.st_gid) == (65534, 65534), name


LONG = b"9" * 5000  # past int()'s 4,300 digits: a ValueError, were it not checked first


@pytest.mark.parametrize("key", [b"!gen", b"!from", b"!count"])
def test_a_snapshot_number_too_long_is_corrupt(path, key):
    put(path, a=b"1")  # snapshot and journal of generation 1
    records = {b"!gen": b"2", b"!from": b"18", b"!count": b"1", b"a": b"1", key: LONG}
    with open(path, "wb") as f:
        write_cdb(f, list(records.items()))
    with pytest.raises(StoreCorrupt, match="does not parse"):
        Store(path).view().count()


def test_an_error_total_too_long_is_corrupt(path):
    put(path, **{"!errors": LONG})
    with pytest.raises(StoreCorrupt, match="does not parse"):
        charge(Store(path), b"10.0.0.1", config(), NOW)


def test_a_door_index_too_long_is_corrupt(path):
    put(path, **{"!doors": LONG + b" !door:1:10.0.0.1"})
    with pytest.raises(StoreCorrupt, match="does not parse"):
        doors_due(Store(path).view(), NOW)


def point_past_the_end(path: str, key: bytes) -> None:
    """Make the snapshot's hash-table slot for ``key`` point past the file (its header still tiles)."""
    import struct

    from ostiary_ucspi.cdb import hash_key

    with open(path, "rb") as f:
        data = bytearray(f.read())
    h = hash_key(key)
    table, slots = struct.unpack_from("<LL", data, 8 * (h & 255))
    i = (h >> 8) % slots
    while struct.unpack_from("<LL", data, table + 8 * i)[0] != h:
        i = (i + 1) % slots
    struct.pack_into("<LL", data, table + 8 * i, h, len(data) + 100)
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("key", [b"!gen", b"!from", b"!count"])
def test_a_snapshot_record_pointing_past_the_end_is_corrupt(path, key):
    put(path, a=b"1")
    assert Store(path).compact() == 1  # snapshot 2 has !gen, !from and !count
    if key == b"!from":  # !from is read beside a journal one generation behind
        with open(path + ".journal", "wb") as f:
            f.write(b"ostiary-journal 1\n")
    point_past_the_end(path, key)
    with pytest.raises(StoreCorrupt):
        Store(path).view().count()


def test_setting_a_store_aside_takes_its_stopped_mark_too(path):
    """reset --force forgets the stopped state: NAME.stopped left alone kept the store corrupt."""
    put(path, a=b"1")
    store = Store(path)
    store.mark()
    write_at(path, 0, b"garbage")
    assert path + ".stopped.corrupt" in store.set_aside(".corrupt")
    put(path, b=b"1")
    view = store.view()
    assert view.items() == {b"b": b"1"} and not view.marked


def test_a_small_snapshot_is_read_a_large_one_mapped(path, monkeypatch):
    put(path, a=b"1")
    assert isinstance(Store(path).view().reader.data, bytes)  # no mmap module for a small store
    monkeypatch.setattr(storemod, "READ_MAX", 0)
    view = Store(path).view()
    assert not isinstance(view.reader.data, bytes) and view.get(b"a") == b"1"
    put(path, b=b"2")
    assert Store(path).compact() == 2 and Store(path).view().items() == {b"a": b"1", b"b": b"2"}
