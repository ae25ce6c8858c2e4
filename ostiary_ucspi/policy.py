"""Lockout policy on top of the store: strikes, locks and the stopped state.

An address's record is ``strikes errors locked_since last_seen`` (decimal,
seconds since the epoch; ``locked_since`` 0 = not locked). ``strikes`` counts
toward MAX_BAD_CONNS and a success clears it; ``errors`` counts toward
MAX_SINGLE_ERRS: a success takes back its own charge, ``revive`` clears it,
and it goes with the record when compaction expires the strikes. ``!errors``
holds the total for MAX_TOTAL_ERRS, ``!stopped`` holds ``since reason`` once
KILL or an error threshold stopped the service, ``!doors`` indexes the
pending UNDOs (:mod:`.doors`). Keys come from
:mod:`.address` (IPv6 is counted per prefix).

IPv6 strikes also aggregate up the prefix tree (:data:`LEVELS`): a prefix's
record counts, as its ``strikes``, the records of the longer prefixes (or
addresses) just below it, and once FANOUT of them hold strikes it is locked
as a whole, closing every address under it at once. So an attacker holding
a /32 can make at most FANOUT**4 + FANOUT**3 + FANOUT**2 + FANOUT + 1
records (69,905), whatever the IPV6_PREFIX; each IPv4 address is a record
of its own (an attacker's IPv4 addresses are each a host it holds), and
the store takes no new key once it is half full (:meth:`View.full`).
A lock is never dropped to make room.
"""

from .address import prefix_number, supernets
from .store import Store, StoreCorrupt, Transaction, View, number, numeric

TYPE_CHECKING = False
if TYPE_CHECKING:  # a type only: the handler has imported config already
    from collections.abc import Iterator

    from .config import Config
    from .store import Prune, Records

STOPPED = b"!stopped"
ERRORS = b"!errors"
DOORS = b"!doors"  # the pending doors' index: see doors.py
DOOR_PREFIX = b"!door:"  # each door's record: see doors.py
DOORS_GRACE = 2  # seconds a live runner has to close its own door before a sweeper may
MARKED = b"0 KILL proven while the store could not record it"  # what Store.mark stands for
GRACE = 5  # seconds past COMM_TIMEOUT after which an unconfirmed charge is final
LEVELS = (56, 48, 40, 32)  # the IPv6 prefixes that strikes aggregate into
FANOUT = 16  # records with strikes just below a prefix that lock it
FULL = "lockout store full: no new address is tracked, so none is served, until records expire"


class Entry:
    """One address's (or IPv6 prefix's) record."""

    __slots__ = ("strikes", "errors", "locked_since", "last_seen")

    def __init__(self, raw: bytes | None = None) -> None:
        if raw is None:
            self.strikes = self.errors = self.locked_since = self.last_seen = 0
            return
        parts = raw.split(b" ")
        if len(parts) != 4 or not all(map(numeric, parts)):
            raise StoreCorrupt(f"lockout record does not parse: {raw[:60]!r}")
        self.strikes, self.errors, self.locked_since, self.last_seen = map(int, parts)

    def encode(self) -> bytes:
        """Return the record's stored form."""
        return b"%d %d %d %d" % (self.strikes, self.errors, self.locked_since, self.last_seen)

    def lock_ran_out(self, expire: int, now: int) -> bool:
        """True for a lock ``expire`` (LOCKOUT_EXPIRE; 0: never) seconds old or older."""
        return bool(self.locked_since and expire and now - self.locked_since >= expire)

    def locked_out(self, max_bad: int, expire: int = 0, now: int = 0) -> bool:
        """True when connections from this address are closed at once.

        A lock that ran out (see :meth:`lock_ran_out`) no longer counts: the
        address's next connection is charged afresh.
        """
        if self.lock_ran_out(expire, now):
            return False
        return bool(self.locked_since) or self.strikes >= max_bad


def refusal(
    view: View | Transaction | None, key: bytes, max_bad: int, expire: int = 0, now: int = 0
) -> str | None:
    """Return why ``key`` must be closed at once (stopped, locked), or None.

    A read, never a write: the hot path of a locked client. ``expire`` and
    ``now``: see :meth:`Entry.locked_out`.
    """
    if view is None:
        return None
    stopped = view.get(STOPPED)
    if stopped is None and view.marked:
        stopped = MARKED
    if stopped is not None:
        return "service stopped: " + stopped.partition(b" ")[2].decode(errors="replace")
    if Entry(view.get(key)).locked_out(max_bad, expire, now):
        return "locked out"
    for prefix in reversed(above(key)):  # the widest first: under a flood, it is the one locked
        if Entry(view.get(prefix)).locked_out(FANOUT, expire, now):
            return f"locked out with all of {prefix.decode()}"
    return None


def above(key: bytes, levels: tuple[int, ...] = LEVELS) -> list[bytes]:
    """Return the prefixes of ``levels`` holding ``key``, longest first (none for IPv4)."""
    try:
        return supernets(key, levels)
    except (OSError, ValueError):
        raise StoreCorrupt(f"record key is neither address nor prefix: {key[:60]!r}") from None


def aggregate(key: bytes, cfg: "Config") -> bool:
    """True for the record of a prefix that strikes below it aggregate into."""
    bits = key.partition(b"/")[2]
    return bits.isdigit() and len(bits) <= 3 and int(bits) in LEVELS and int(bits) < cfg.ipv6_prefix


def locked(key: bytes, entry: Entry, cfg: "Config", now: int) -> bool:
    """True when the handler closes ``key``'s connections at once for its own record."""
    limit = FANOUT if aggregate(key, cfg) else cfg.max_bad_conns
    return entry.locked_out(limit, cfg.lockout_expire, now)


def count_up(tx: Transaction, key: bytes, cfg: "Config", now: int) -> list[bytes]:
    """Count ``key``'s new record in the prefixes above it; return those this locked.

    A prefix with no record above it was never counted there (a compaction
    dropped that record meanwhile): it is counted in too.
    """
    newly = []
    counting = True  # the record just below is not counted in this prefix yet
    for prefix in above(key):
        raw = tx.get(prefix)
        if not counting and raw is not None:
            break  # counted there when it was new, and so was everything above
        entry = Entry(raw)
        if entry.lock_ran_out(cfg.lockout_expire, now):
            entry.locked_since = 0  # its children still count, as compaction counts them
        entry.strikes += 1
        entry.last_seen = now
        if entry.strikes >= FANOUT and not entry.locked_since:
            entry.locked_since = now
            newly.append(prefix)
        tx.put(prefix, entry.encode())
        counting = raw is None
    return newly


def count_down(tx: Transaction, key: bytes) -> None:
    """Take ``key``'s deleted record out of the count of the prefixes above it."""
    for prefix in above(key):
        raw = tx.get(prefix)
        if raw is None:
            return
        entry = Entry(raw)
        entry.strikes = max(0, entry.strikes - 1)
        if entry.strikes or entry.locked_since:
            tx.put(prefix, entry.encode())
            return
        tx.put(prefix, None)


def total_errors(view: View | Transaction) -> int:
    """Return the error total (MAX_TOTAL_ERRS counts it)."""
    return number(view.get(ERRORS) or b"0", "the error total")


def parse_doors(raw: bytes | None) -> tuple[int, list[bytes]]:
    """Return (the earliest close, the door keys) of the doors' index record."""
    if raw is None:
        return 0, []
    earliest, *keys = raw.split(b" ")
    if not all(k.startswith(DOOR_PREFIX) for k in keys):
        raise StoreCorrupt(f"door index does not parse: {raw[:60]!r}")
    return number(earliest, "the door index"), keys


def doors_due(view: View | None, now: int) -> bool:
    """True when a door is past its close by DOORS_GRACE: a read on every connection's path."""
    if view is None:
        return False
    earliest, keys = parse_doors(view.get(DOORS))
    return bool(keys) and 0 < earliest <= now - DOORS_GRACE  # 0: only failed doors are left


def stop(tx: Transaction, now: int, reason: str) -> None:
    """Put the service in the stopped state (idempotent: the first reason stays)."""
    if tx.get(STOPPED) is None:
        tx.put(STOPPED, b"%d %s" % (now, reason.encode()))


class Charge:
    """What :func:`charge` did: ``refused`` why the connection is closed instead (None:
    charged), ``stopped`` why this very charge stopped the service, ``locked`` the
    prefixes it locked."""

    __slots__ = ("refused", "stopped", "locked")

    def __init__(self, refused: str | None = None, stopped: str | None = None) -> None:
        self.refused = refused
        self.stopped = stopped
        self.locked: list[bytes] = []


def charge(store: Store, key: bytes, cfg: "Config", now: int) -> Charge:
    """Charge one attempt to ``key`` before any salt is sent."""
    with store.lock() as tx:
        why = refusal(tx, key, cfg.max_bad_conns, cfg.lockout_expire, now)
        if why is not None:
            return Charge(why)
        raw = tx.get(key)
        entry = Entry(raw)
        if entry.locked_since or now - entry.last_seen > cfg.strike_expire:
            entry.strikes = entry.locked_since = 0  # strikes expired, or a lock ran out
        if raw is None:  # a new record: not below a prefix whose lock ran out, still struck
            for prefix in above(key):
                if Entry(tx.get(prefix)).strikes >= FANOUT:
                    return Charge(f"locked out with all of {prefix.decode()}")
        if raw is None and tx.v.full():
            return Charge(FULL)
        if raw is None and cfg.exit_on_ipcache_full:
            tracked = tx.v.count()
            if tracked >= cfg.ipcache_size:
                reason = f"address table full ({tracked} records, EXIT_ON_IPCACHE_FULL)"
                stop(tx, now, reason)
                return Charge("service stopped: " + reason, reason)
        entry.strikes += 1
        entry.errors += 1
        entry.last_seen = now
        tx.put(key, entry.encode())
        tx.put(ERRORS, b"%d" % (total_errors(tx) + 1))
        done = Charge()
        if raw is None:
            done.locked = count_up(tx, key, cfg, now)
    return done


def refund(tx: Transaction, key: bytes, clear: bool = False) -> None:
    """Take back one charge of ``key`` (``clear``: and every strike), in ``tx``.

    Only the charge: a lock made meanwhile (``ostiary-lockout lock``) stays,
    and so does a record that still holds a strike, an error or a lock.
    """
    raw = tx.get(key)
    entry = Entry(raw)
    entry.strikes = 0 if clear else max(0, entry.strikes - 1)
    entry.errors = max(0, entry.errors - 1)
    if entry.strikes or entry.errors or entry.locked_since:
        tx.put(key, entry.encode())
    elif raw is not None:
        tx.put(key, None)
        count_down(tx, key)
    tx.put(ERRORS, b"%d" % max(0, total_errors(tx) - 1))


def succeed(store: Store, key: bytes) -> None:
    """Refund the charge of a proven passphrase and clear the address's strikes.

    Not synced to disk: a refund lost in a power cut leaves one strike too
    many, a false negative at worst.
    """
    with store.lock(durable=False) as tx:
        refund(tx, key, clear=True)


def uncharge(store: Store, key: bytes) -> None:
    """Take back a charge whose connection got no salt through our own failure."""
    with store.lock() as tx:
        refund(tx, key)


def kill(store: Store, key: bytes, now: int, reason: str) -> None:
    """Record the stopped state first (synced), then refund KILL's charge with it."""
    with store.lock() as tx:
        stop(tx, now, reason)
        refund(tx, key, clear=True)


def fail(store: Store, key: bytes, cfg: "Config", now: int) -> tuple[bool, str | None]:
    """Make a failed attempt's charge final.

    Returns (became_locked, stop_reason): ``became_locked`` is True exactly once
    per lock, so LOCKOUT_ACTION runs once; ``stop_reason`` names a threshold
    this failure passed (the service is then stopped).
    """
    with store.lock() as tx:
        entry = Entry(tx.get(key))
        locked = False
        if entry.strikes >= cfg.max_bad_conns and not entry.locked_since:
            entry.locked_since = now
            tx.put(key, entry.encode())
            locked = True
        reason = None
        total = total_errors(tx)
        if cfg.max_single_errs and entry.errors > cfg.max_single_errs:
            reason = f"{key.decode()} passed MAX_SINGLE_ERRS ({entry.errors} errors)"
        elif cfg.max_total_errs and total > cfg.max_total_errs:
            reason = f"all addresses passed MAX_TOTAL_ERRS ({total} errors)"
        if reason is not None:
            stop(tx, now, reason)
    return locked, reason


def stale_charge(view: View | None, key: bytes, cfg: "Config", now: int) -> bool:
    """True when ``key`` is at its limit through a charge whose handler died unconfirmed."""
    if view is None:
        return False
    entry = Entry(view.get(key))
    return (
        not entry.locked_since
        and entry.strikes >= cfg.max_bad_conns
        and now - entry.last_seen > cfg.comm_timeout + GRACE
    )


def pruner(cfg: "Config", now: int) -> "Prune":
    """Return what a compaction keeps, ``prune(records)``, for the config's expiry.

    Strikes of an address never locked expire STRIKE_EXPIRE seconds after it
    was last seen; a lock expires LOCKOUT_EXPIRE seconds after it began (0:
    never); ``!`` records (the stopped state, the error total) stay. A
    prefix's record lives while a record below it does, its strikes counted
    again from them, or while it is locked. Two passes over the records:
    memory grows with the prefixes only.
    """

    def lives(entry: Entry) -> bool:
        if entry.locked_since:
            return not entry.lock_ran_out(cfg.lockout_expire, now)
        return now - entry.last_seen <= cfg.strike_expire

    def prune(records: "Records") -> "Iterator[tuple[bytes, bytes]]":
        below: dict[tuple[int, int], list[int]] = {}  # prefix -> [live records below, newest]
        prefixes: list[tuple[int, bytes, Entry]] = []
        for key, value in records():
            if key.startswith(b"!"):
                continue
            entry = Entry(value)
            if aggregate(key, cfg):
                prefixes.append((-int(key.partition(b"/")[2]), key, entry))
            elif b"/" in key and lives(entry):
                tally(below, key, entry.last_seen)
        kept: dict[bytes, bytes] = {}
        for _, key, entry in sorted(prefixes):  # the longest prefixes first
            count, seen = below.get(network(key), (0, 0))
            if entry.lock_ran_out(cfg.lockout_expire, now):
                entry.locked_since = 0
            if count >= FANOUT and not entry.locked_since:
                entry.locked_since = now  # struck below as much as a lock takes
            if count or entry.locked_since:
                entry.strikes, entry.last_seen = count, max(seen, entry.last_seen)
                kept[key] = entry.encode()
                tally(below, key, entry.last_seen)
        dropped = {key for _, key, _ in prefixes if key not in kept}
        for key, value in records():  # expiry again: memory for the prefixes only
            if key in kept:
                yield key, kept[key]
            elif key.startswith(b"!") or (key not in dropped and lives(Entry(value))):
                yield key, value

    return prune


def network(key: bytes) -> tuple[int, int]:
    """Return (prefix length, network number) of IPv6 key ``key``."""
    try:
        n, bits = prefix_number(key)
    except (OSError, ValueError):
        raise StoreCorrupt(f"record key is neither address nor prefix: {key[:60]!r}") from None
    return bits, n >> (128 - bits)


def tally(below: dict[tuple[int, int], list[int]], key: bytes, seen: int) -> None:
    """Count a surviving record under the prefix of :data:`LEVELS` just above it, in ``below``."""
    bits, n = network(key)
    for level in LEVELS:  # the longest first
        if level < bits:
            counted = below.setdefault((level, n >> (bits - level)), [0, 0])
            counted[0] += 1
            counted[1] = max(counted[1], seen)
            return


def unlock(store: Store, key: bytes) -> Entry | None:
    """Forget ``key`` (strikes, errors, lock); return its record, None if it had none.

    For a prefix, the records under it go too: the operator trusts it again.
    """
    with store.lock() as tx:
        raw = tx.get(key)
        if raw is not None:
            if b"/" in key:
                for below in [k for k in tx.items() if key in above(k)]:
                    tx.put(below, None)
            tx.put(key, None)
            count_down(tx, key)
    return None if raw is None else Entry(raw)


def lock(store: Store, key: bytes, cfg: "Config", now: int) -> int:
    """Lock ``key`` out from ``now`` on; if it was locked already, return since when (else 0)."""
    with store.lock() as tx:
        raw = tx.get(key)
        entry = Entry(raw)
        if entry.locked_since:
            return entry.locked_since
        entry.locked_since = now
        tx.put(key, entry.encode())
        if raw is None:
            count_up(tx, key, cfg, now)
    return 0


def revive(store: Store, cfg: "Config") -> bytes | None:
    """Leave the stopped state; return it (``since reason``), None if not stopped.

    The error total, and the errors of addresses past MAX_SINGLE_ERRS, start
    again from 0, or the next error would stop the service again.
    """
    with store.lock() as tx:
        stopped = tx.get(STOPPED)
        if stopped is None and tx.marked:
            stopped = MARKED
        if stopped is None:
            return None
        tx.unmark()
        tx.put(STOPPED, None)
        tx.put(ERRORS, None)
        if cfg.max_single_errs:
            for key, raw in tx.items().items():
                if not key.startswith(b"!"):
                    entry = Entry(raw)
                    if entry.errors > cfg.max_single_errs:
                        entry.errors = 0
                        tx.put(key, entry.encode())
    return stopped
