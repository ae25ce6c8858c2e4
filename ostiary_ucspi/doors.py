"""Doors: the pending UNDO of an ACTION, one per (action, address), kept in the lockout store.

A knock that proves an ACTION with an UNDO opens (or re-arms) its door
before the ACTION starts: the record is written with the writers' lock and
fdatasync'd, like every durable store write. Records::

    !door:N:ADDRESS   CLOSE_AT OPENED ATTEMPTS STATE CLAIMANT UID GID UNDO
    !doors            EARLIEST KEY...   (the pending doors, and the earliest close)

N is the ACTION's number in the config, ADDRESS the canonical address the
action was given; UNDO, UID and GID are what was armed, so a config edit does
not change a door already open. STATE is ``open`` (waiting), ``closing``
(CLAIMANT, a pid, is running the undo) or ``failed`` (MAX_ATTEMPTS failures:
left for the operator). Records starting with ``!`` survive compaction.

Exactly once: whoever runs an undo first *claims* its door under the lock
(open and due, or closing by a claimant that is gone), so two processes that
notice the same due door run it once; a re-knock moves CLOSE_AT, and a
runner that wakes for an older deadline finds its claim refused. A success
deletes the record; a failure re-arms it with back-off (:data:`BACKOFF`).

Who closes: the runner that started the ACTION, at CLOSE_AT; if it died,
the first connection after CLOSE_AT + DOORS_GRACE (the handler reads ``!doors``
without a lock, one lookup: :func:`.policy.doors_due`) starts a sweeper;
``ostiary-lockout sweep``, run
by the service's start-up, closes what is due and waits for the rest.
"""

import os
import time

from . import log as logmod
from .policy import DOOR_PREFIX as PREFIX
from .policy import DOORS as INDEX
from .policy import parse_doors as parse_index
from .store import Store, StoreCorrupt, Transaction, View, numeric

BACKOFF = (10, 60, 300, 1800)  # seconds before each retry of a failed undo
MAX_ATTEMPTS = len(BACKOFF) + 1
STATES = (b"open", b"closing", b"failed")


class Door:
    """One door's record."""

    __slots__ = ("key", "close_at", "opened", "attempts", "state", "claimant", "uid", "gid", "undo")

    def __init__(self, key: bytes, raw: bytes) -> None:
        parts = raw.split(b" ", 7)
        numbers = parts[:3] + parts[4:7]
        if (
            len(parts) != 8
            or not all(map(numeric, numbers))
            or parts[3] not in STATES
            or not parts[7].startswith(b"/")
        ):
            raise StoreCorrupt(f"door record does not parse: {key[:60]!r} {raw[:60]!r}")
        self.key = key
        self.close_at, self.opened, self.attempts = (int(p) for p in parts[:3])
        self.state = parts[3]
        self.claimant, self.uid, self.gid = (int(p) for p in parts[4:7])
        self.undo = os.fsdecode(parts[7])

    def encode(self) -> bytes:
        """Return the record's stored form."""
        return b"%d %d %d %s %d %d %d %s" % (
            self.close_at,
            self.opened,
            self.attempts,
            self.state,
            self.claimant,
            self.uid,
            self.gid,
            os.fsencode(self.undo),
        )

    @property
    def action(self) -> int:
        """The ACTION's number in the config."""
        return int(self.key[len(PREFIX) :].split(b":", 1)[0])

    @property
    def address(self) -> str:
        """The address the door was opened for."""
        return self.key[len(PREFIX) :].split(b":", 1)[1].decode()


def door_key(action: int, address: str) -> bytes:
    """Return the store key of ACTION ``action``'s door for ``address``."""
    return b"%s%d:%s" % (PREFIX, action, address.encode())


def doors(tx: "Transaction | View") -> list[Door]:
    """Return every door the index lists (a listed door without a record is corruption)."""
    found = []
    for key in parse_index(tx.get(INDEX))[1]:
        raw = tx.get(key)
        if raw is None:
            raise StoreCorrupt(f"door index lists {key[:60]!r}, which has no record")
        found.append(Door(key, raw))
    return found


def reindex(tx: Transaction, keys: list[bytes]) -> None:
    """Rewrite the index for door ``keys``: the earliest close among those still pending."""
    pending = [
        d for d in (Door(k, tx.get(k) or b"") for k in dict.fromkeys(keys)) if d.state != b"failed"
    ]
    everyone = list(dict.fromkeys(keys))
    if not everyone:
        tx.put(INDEX, None)
        return
    earliest = min((d.close_at for d in pending), default=0)  # 0: nothing to close
    tx.put(INDEX, b" ".join([b"%d" % earliest, *everyone]))


def arm(
    store: Store, action: int, address: str, undo: str, delay: int, uid: int, gid: int, now: float
) -> int:
    """Open (or re-arm) a door to close ``delay`` seconds from ``now``; return when it closes.

    Whole seconds, rounded up: never early. Durable before it returns, so the
    ACTION starts only once its undo is on disk.
    """
    key = door_key(action, address)
    close_at = -int(-(now + delay) // 1)
    with store.lock() as tx:
        raw = tx.get(key)
        opened = Door(key, raw).opened if raw is not None else int(now)
        record = b"%d %d 0 open 0 %d %d %s" % (close_at, opened, uid, gid, os.fsencode(undo))
        tx.put(key, record)
        reindex(tx, parse_index(tx.get(INDEX))[1] + [key])
    return close_at


def alive(pid: int) -> bool:
    """True when process ``pid`` exists (it may be another's: then it is left to finish)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def claimable(door: Door, now: int, expect: int | None) -> bool:
    """True when this process may run ``door``'s undo now.

    ``expect``: the close this process armed (a runner); None for a sweeper or
    the operator, who take any due door, or one whose claimant is gone.
    """
    if door.state == b"open":
        return door.close_at <= now and (expect is None or door.close_at == expect)
    return door.state == b"closing" and expect is None and not alive(door.claimant)


def claim(
    store: Store, key: bytes, now: int, expect: int | None, force: bool = False
) -> Door | None:
    """Claim ``key``'s door for this process; None when it is not ours to close.

    ``force`` (the operator's ``close``): an open or failed door, due or not.
    """
    with store.lock() as tx:
        raw = tx.get(key)
        if raw is None:
            return None
        door = Door(key, raw)
        if not (claimable(door, now, expect) or (force and door.state != b"closing")):
            return None
        door.state, door.claimant = b"closing", os.getpid()
        tx.put(key, door.encode())
    return door


def finish(store: Store, door: Door, ok: bool, now: int) -> str:
    """Record how ``door``'s undo ended; return ``closed``, ``retry`` (at door.close_at),
    ``failed`` (MAX_ATTEMPTS reached) or ``rearmed`` (a knock or the operator changed it
    meanwhile: theirs now).
    """
    with store.lock() as tx:
        raw = tx.get(door.key)
        if raw is None or Door(door.key, raw).claimant != door.claimant:
            return "rearmed"
        keys = parse_index(tx.get(INDEX))[1]
        if ok:
            tx.put(door.key, None)
            keys = [k for k in keys if k != door.key]
            outcome = "closed"
        else:
            door.attempts += 1
            door.claimant = 0
            if door.attempts >= MAX_ATTEMPTS:
                door.state, outcome = b"failed", "failed"
            else:
                door.state, door.close_at = b"open", now + BACKOFF[door.attempts - 1]
                outcome = "retry"
            tx.put(door.key, door.encode())
        reindex(tx, keys)
    return outcome


def forget(store: Store, key: bytes) -> Door | None:
    """Drop ``key``'s door without running its undo; return it, None if there was none."""
    with store.lock() as tx:
        raw = tx.get(key)
        if raw is None:
            return None
        tx.put(key, None)
        reindex(tx, [k for k in parse_index(tx.get(INDEX))[1] if k != key])
    return Door(key, raw)


def close(store: Store, door: Door, log: logmod.Log) -> str:
    """Run a claimed door's undo as it was armed and record the outcome (see :func:`finish`).

    On ``retry``, ``door.close_at`` is when.
    """
    from .actions import ActionRefused, check_file, describe, run

    what = f"{door.address} undo {door.undo}"  # as run_logged says it
    try:
        check_file(door.undo, door.uid)
        status = run(door.undo, door.address, door.uid, door.gid, log)
        ok, outcome = status == 0, describe(status)
    except ActionRefused as e:
        ok, outcome = False, f"refused: {e}"
    result = finish(store, door, ok, int(time.time()))
    if ok:
        log(logmod.NOTICE, f"{what} finished: {outcome}")
    elif result == "retry":
        log(
            logmod.ERR,
            f"{what} failed ({outcome}), attempt {door.attempts} of {MAX_ATTEMPTS}: "
            f"retried in {door.close_at - int(time.time())}s",
        )
    elif result == "failed":
        log(
            logmod.ERR,
            f"{what} failed ({outcome}) {door.attempts} times: the door stays open, "
            "marked failed (ostiary-lockout doors)",
        )
    else:
        log(logmod.ERR, f"{what} failed ({outcome}); the door was re-armed meanwhile")
    return result


def keep_closing(store: Store, key: bytes, close_at: int, log: logmod.Log) -> None:
    """Wait for ``close_at`` and close the door if it is still ours, retrying on failure."""
    expect: int | None = close_at
    while expect is not None:
        time.sleep(max(0, expect - time.time()))
        door = claim(store, key, int(time.time()), expect)
        if door is None:
            return  # re-armed by a later knock (whose runner closes it), or closed already
        expect = door.close_at if close(store, door, log) == "retry" else None


def sweep(store: Store, log: logmod.Log, wait: bool) -> int:
    """Close every due door (and retry what fails); return how many were closed or tried.

    ``wait``: also wait for the doors not yet due (the service's start-up:
    their runners died with the machine), each in a detached process.
    """
    from .actions import detach

    view = store.view()
    now = int(time.time())
    count = 0
    for door in doors(view) if view is not None else []:
        if door.state == b"failed":
            continue
        if claimable(door, now, None):
            claimed = claim(store, door.key, now, None)
            if claimed is not None:
                count += 1
                if close(store, claimed, log) == "retry":
                    retry = claimed.close_at
                    detach(lambda k=door.key, r=retry: keep_closing(store, k, r, log), log)
        elif wait and door.state == b"open":
            detach(lambda k=door.key, c=door.close_at: keep_closing(store, k, c, log), log)
    return count
