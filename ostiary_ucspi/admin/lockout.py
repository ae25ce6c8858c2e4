"""ostiary-lockout: see and fix the lockout store, safely while handlers run.

Usage: ``ostiary-lockout [-c FILE] COMMAND`` where FILE (default
/etc/ostiary.cfg) gives the store (LOCKOUT_DB) and the policy, and COMMAND is
one of :data:`COMMANDS`. ADDR is an IPv4 or IPv6 address, or an IPv6 prefix as ``list`` prints it.
Changes take the writers' lock, reads take none, so no handler's update is
lost and no handler waits on a reader.

Exit status: see :data:`EXITS`.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time

from .. import doors
from .. import log as logmod
from ..address import key as address_key
from ..address import parse as parse_canonical
from ..config import SEARCH, Config, ConfigError, find, load
from ..doors import door_key
from ..fail import Fatal, Usage, standard
from ..fail import run as fail_run
from ..policy import (
    ERRORS,
    FANOUT,
    MARKED,
    STOPPED,
    Entry,
    aggregate,
    lock,
    locked,
    pruner,
    revive,
    unlock,
)
from ..store import Store, StoreCorrupt, StoreError, number
from ..supervise import bring_up_advice

PROG = "ostiary-lockout"
# The command table: it drives --help, the argument checks and doc/ostiary-lockout.rst.
# (name, operand, flag, what it does)
COMMANDS = [
    ("list", "", "[--json]", "tracked addresses: strikes, errors, locked since, last seen"),
    ("show", "ADDR", "", "one address's (or IPv6 prefix's) record"),
    ("unlock", "ADDR", "", "forget ADDR's strikes, errors and lock"),
    ("lock", "ADDR", "", "lock ADDR out now"),
    ("revive", "", "", "leave the stopped state (KILL, error thresholds)"),
    ("prune", "", "", "compact the store now, dropping expired strikes and locks"),
    ("export", "", "", "locked-out addresses and prefixes, one a line"),
    ("reset", "", "--force", "move a corrupt store aside, start an empty one"),
    ("doors", "", "[--json]", "open doors: address, action, opened, closes at, attempts"),
    ("close", "ADDR N", "", "close ACTION N's door for ADDR now: run its undo"),
    ("forget", "ADDR N", "", "forget ACTION N's door for ADDR, without running its undo"),
    ("sweep", "", "", "close the doors past their close, wait for the rest (at start-up)"),
]
TABLE = {name: (operand, flag.strip("[]")) for name, operand, flag, _ in COMMANDS}
USAGE = "\n".join(
    [f"{PROG} [-c FILE] COMMAND"]
    + [f"  {' '.join(w for w in (n, f, o) if w):<15} {d}" for n, o, f, d in COMMANDS]
    + [
        f"FILE defaults to the first of {', '.join(SEARCH)} that exists. "
        "Exit 0 done, 100 usage, 111 failure."
    ]
)
EXITS = {
    0: "done",
    100: "usage: a bad command line or a bad address",
    111: "a configuration problem, a missing, unreadable or corrupt store, or another failure",
}


class State:
    """Everything in the store, checked record by record."""

    def __init__(self, store: Store) -> None:
        view = store.view()
        self.now = int(time.time())
        items = {} if view is None else view.items()
        self.entries = {k: Entry(v) for k, v in items.items() if not k.startswith(b"!")}
        self.stopped: tuple[int, str] | None = None
        if STOPPED in items or (view is not None and view.marked):
            self.stopped = parse_stopped(items.get(STOPPED, MARKED))
        self.errors = number(items.get(ERRORS, b"0"), "the error total")


def parse_stopped(raw: bytes) -> tuple[int, str]:
    """Split the stopped state into (since, reason)."""
    since, _, reason = raw.partition(b" ")
    return number(since, "the stopped state"), reason.decode(errors="replace")


def parse_args(argv: list[str]) -> tuple[str, str, list[str]]:
    """Return (config path, command, its arguments); raise Usage."""
    path = find()
    args = argv[1:]
    while args and args[0].startswith("-"):
        a = args.pop(0)
        standard(a)
        if a == "-c" and args:
            path = args.pop(0)
        elif a.startswith("-c") and len(a) > 2:
            path = a[2:]
        else:
            raise Usage(f"unknown option {a!r}\n{USAGE}")
    if not args:
        raise Usage(f"no command\n{USAGE}")
    command, rest = args[0], args[1:]
    if command not in TABLE:
        raise Usage(f"unknown command {command!r}\n{USAGE}")
    operand, flag = TABLE[command]
    options = [a for a in rest if flag and a == flag]
    operands = [a for a in rest if not (flag and a == flag)]
    if len(operands) != len(operand.split()):
        raise Usage(f"{command} takes {operand or 'no argument'}\n{USAGE}")
    return path, command, options + operands


def parse_address(text: str, cfg: Config, shown: bool = False) -> bytes:
    """Return the store key for an address or IPv6 prefix; raise Usage.

    ``shown``: the canonical address itself (a door's name), not its key.
    """
    if shown:
        try:
            return parse_canonical(text, cfg.ipv6_prefix)[0].encode()
        except ValueError:
            raise Usage(f"not an IP address: {text!r}") from None
    addr, slash, bits = text.partition("/")
    prefix = cfg.ipv6_prefix
    if slash:
        if ":" not in addr or not (bits.isdigit() and bits.isascii() and 0 < int(bits) <= 128):
            raise Usage(f"not an IP address or IPv6 prefix: {text!r}")
        prefix = int(bits)
    try:
        return address_key(addr, prefix)
    except ValueError:
        raise Usage(f"not an IP address or IPv6 prefix: {text!r}") from None


def when(t: int) -> str:
    """Format a time of the store for people: local time, '-' for never."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def sort_key(key: bytes) -> tuple[int, int, int]:
    """Order addresses and prefixes numerically, IPv4 first."""
    try:
        net = ipaddress.ip_network(key.decode())
    except ValueError:
        raise StoreCorrupt(f"record key is not an address: {key[:60]!r}") from None
    return net.version, int(net.network_address), net.prefixlen


def cmd_list(store: Store, cfg: Config, as_json: bool) -> None:
    state = State(store)
    rows = sorted(  # a prefix's count of struck prefixes below it shows once it locks
        (
            (k, e)
            for k, e in state.entries.items()
            if not aggregate(k, cfg) or locked(k, e, cfg, state.now)
        ),
        key=lambda kv: (not kv[1].locked_since, -kv[1].locked_since, -kv[1].last_seen),
    )
    locked_out = sum(locked(k, e, cfg, state.now) for k, e in rows)
    if as_json:
        doc = {
            "store": cfg.lockout_db,
            "stopped": None
            if state.stopped is None
            else {"since": state.stopped[0], "reason": state.stopped[1]},
            "total_errors": state.errors,
            "max_bad_conns": cfg.max_bad_conns,
            "addresses": [
                {
                    "address": key.decode(),
                    "strikes": e.strikes,
                    "errors": e.errors,
                    "locked": locked(key, e, cfg, state.now),
                    "locked_since": e.locked_since or None,
                    "last_seen": e.last_seen or None,
                }
                for key, e in rows
            ],
        }
        print(json.dumps(doc))
        return
    print(
        f"{cfg.lockout_db}: {len(rows)} tracked, {locked_out} locked out, "
        f"{state.errors} errors in all (MAX_BAD_CONNS={cfg.max_bad_conns})"
    )
    if state.stopped is not None:
        print(f"SERVICE STOPPED since {when(state.stopped[0])}: {state.stopped[1]}")
    if not rows:
        return
    width = max(15, *(len(key) for key, _ in rows))
    print(f"{'ADDRESS':<{width}}  STRIKES  ERRORS  {'LOCKED SINCE':<19}  LAST SEEN")
    for key, e in rows:
        print(
            f"{key.decode():<{width}}  {e.strikes:>7}  {e.errors:>6}  "
            f"{when(e.locked_since):<19}  {when(e.last_seen)}"
        )


def cmd_show(store: Store, cfg: Config, key: bytes) -> None:
    view = store.view()
    raw = None if view is None else view.get(key)
    e = None if raw is None else Entry(raw)
    stopped = None if view is None else view.get(STOPPED) or (MARKED if view.marked else None)
    stopped = None if stopped is None else parse_stopped(stopped)
    print(f"address       {key.decode()}")
    if stopped is not None:
        print(f"service       STOPPED since {when(stopped[0])}: {stopped[1]}")
    if e is None:
        print("record        none: not locked out")
        return
    if aggregate(key, cfg):
        print(f"strikes       {e.strikes} struck prefixes below it (locked out at {FANOUT})")
    else:
        print(f"strikes       {e.strikes} (locked out at {cfg.max_bad_conns})")
    print(f"errors        {e.errors}")
    print(f"locked since  {when(e.locked_since)}")
    print(f"last seen     {when(e.last_seen)}")
    print(
        f"connections   {'closed at once' if locked(key, e, cfg, int(time.time())) else 'served'}"
    )


def parse_action(text: str) -> int:
    """Return ACTION number ``text`` (1 for the config's first ACTION); raise Usage."""
    if not (text.isascii() and text.isdigit() and len(text) <= 6 and int(text) >= 1):
        raise Usage(f"not an ACTION number: {text!r}")
    return int(text)


def cmd_doors(store: Store, as_json: bool) -> None:
    view = store.view()
    found = sorted(
        doors.doors(view) if view is not None else [],
        key=lambda d: (d.close_at, d.address, d.action),
    )
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "address": d.address,
                        "action": d.action,
                        "opened": d.opened,
                        "closes_at": d.close_at,
                        "attempts": d.attempts,
                        "state": d.state.decode(),
                        "undo": d.undo,
                        "uid": d.uid,
                        "gid": d.gid,
                    }
                    for d in found
                ]
            )
        )
        return
    print(f"{len(found)} open doors" if found else "no open doors")
    if not found:
        return
    width = max(15, *(len(d.address) for d in found))
    print(
        f"{'ADDRESS':<{width}}  ACTION  {'OPENED':<19}  {'CLOSES AT':<19}  ATTEMPTS  STATE    UNDO"
    )
    for d in found:
        print(
            f"{d.address:<{width}}  {d.action:>6}  {when(d.opened):<19}  {when(d.close_at):<19}  "
            f"{d.attempts:>8}  {d.state.decode():<7}  {d.undo}"
        )


def door_log() -> logmod.Log:
    """Where the undos this command runs write their lines: stderr."""
    return logmod.Log(PROG, logmod.INFO)


def cmd_close(store: Store, key: bytes) -> None:
    door = doors.claim(store, key, int(time.time()), None, force=True)
    if door is None:
        raise Fatal(
            f"no door {key.decode()[len(doors.PREFIX) :]} to close (see doors), or its "
            "undo is running now"
        )
    outcome = doors.close(store, door, door_log())
    if outcome != "closed":
        raise Fatal(f"the undo of {door.address} failed ({outcome}): see the line above and doors")
    print(f"{door.address}: action {door.action}'s door closed ({door.undo} ran)")


def cmd_forget(store: Store, key: bytes) -> None:
    door = doors.forget(store, key) if store.view() is not None else None
    if door is None:
        print(f"{key.decode()[len(doors.PREFIX) :]}: no such door, nothing to forget")
    else:
        print(f"{door.address}: action {door.action}'s door forgotten; {door.undo} did not run")


def cmd_sweep(store: Store) -> None:
    closed = doors.sweep(store, door_log(), wait=True)
    view = store.view()
    waiting = [d for d in (doors.doors(view) if view is not None else []) if d.state == b"open"]
    print(f"swept: {closed} doors past their close closed or tried, {len(waiting)} waiting")


def cmd_unlock(store: Store, key: bytes) -> None:
    e = unlock(store, key) if store.view() is not None else None
    if e is None:
        print(f"{key.decode()}: no record, nothing to unlock")
    else:
        print(
            f"{key.decode()}: unlocked (had {e.strikes} strikes, {e.errors} errors, "
            f"locked since {when(e.locked_since)})"
        )


def cmd_lock(store: Store, cfg: Config, key: bytes, now: int) -> None:
    since = lock(store, key, cfg, now)
    if since:
        print(f"{key.decode()}: locked out already, since {when(since)}")
    else:
        print(f"{key.decode()}: locked out")


def cmd_revive(store: Store, cfg: Config) -> None:
    stopped = revive(store, cfg) if store.view() is not None else None
    if stopped is None:
        print("the service is not stopped")
        return
    since, reason = parse_stopped(stopped)
    print(f"revived: stopped since {when(since)}: {reason}")
    print(bring_up_advice(cfg.path))


def cmd_prune(store: Store) -> None:
    before = store.view()
    if before is None:
        print("the store is empty: nothing to prune")
        return
    store.compact()
    after = store.view()
    if after is None:
        raise StoreError("the store vanished while it was pruned")
    kept = after.count()
    print(f"pruned: {before.count() - kept} expired records dropped, {kept} kept")


def cmd_export(store: Store, cfg: Config) -> None:
    state = State(store)
    out = [k for k, e in state.entries.items() if locked(k, e, cfg, state.now)]
    sys.stdout.write("".join(k.decode() + "\n" for k in sorted(out, key=sort_key)))


def cmd_reset(store: Store, force: bool) -> None:
    if not force:
        raise Usage(
            "reset forgets every strike, lock and the stopped state: "
            "run 'reset --force' to move a corrupt store aside"
        )
    try:
        State(store)
    except StoreCorrupt as e:
        why = str(e)
    else:
        raise Fatal("the store is not corrupt: nothing to reset (see unlock, prune)")
    moved = store.set_aside(time.strftime(".corrupt-%Y%m%dT%H%M%S"))
    print(f"the store was corrupt: {why}")
    for path in moved:
        print(f"moved aside: {path}")
    print(
        "every strike, lock and the stopped state are forgotten; "
        "the next connection starts an empty store"
    )


def run(argv: list[str]) -> None:
    """Carry out one command line; raise Usage, Fatal, StoreError."""
    path, command, args = parse_args(argv)
    try:
        cfg = load(path)
    except ConfigError as e:
        raise Fatal(str(e)) from None
    now = int(time.time())
    store = Store(cfg.lockout_db, prune=pruner(cfg, now), editor=cfg.editor)
    if command != "reset":
        store.check_usable()
    if command == "list":
        cmd_list(store, cfg, "--json" in args)
    elif command == "show":
        cmd_show(store, cfg, parse_address(args[0], cfg))
    elif command == "unlock":
        cmd_unlock(store, parse_address(args[0], cfg))
    elif command == "lock":
        key = parse_address(args[0], cfg)
        if b"/" in key and not key.endswith(b"/%d" % cfg.ipv6_prefix):
            raise Usage(
                f"IPv6 strikes count per /{cfg.ipv6_prefix} (IPV6_PREFIX): "
                f"lock an address or a /{cfg.ipv6_prefix} prefix"
            )
        cmd_lock(store, cfg, key, now)
    elif command == "revive":
        cmd_revive(store, cfg)
    elif command == "prune":
        cmd_prune(store)
    elif command == "export":
        cmd_export(store, cfg)
    elif command == "reset":
        cmd_reset(store, "--force" in args)
    elif command == "doors":
        cmd_doors(store, "--json" in args)
    elif command == "sweep":
        cmd_sweep(store)
    else:
        key = door_key(parse_action(args[1]), parse_address(args[0], cfg, shown=True).decode())
        (cmd_close if command == "close" else cmd_forget)(store, key)
    try:
        store.compact_due()
    except StoreError as e:
        print(
            f"{PROG}: warning: the {command} above took effect, but compacting the store "
            f"after it failed ({e}); 'prune' compacts it once that is fixed",
            file=sys.stderr,
        )


def body(argv: list[str]) -> None:
    """Carry out one command line, the store's errors phrased for the operator."""
    try:
        run(argv)
    except StoreCorrupt as e:
        raise Fatal(
            f"the lockout store is corrupt: {e}; every connection is refused until it "
            f"is repaired; '{PROG} reset --force' moves it aside and starts afresh "
            "(forgetting every lock)"
        ) from None
    except StoreError as e:
        raise Fatal(f"lockout store: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ostiary-lockout; ``argv`` is the whole command line (sys.argv)."""
    return fail_run(PROG, USAGE, body, sys.argv if argv is None else argv)
