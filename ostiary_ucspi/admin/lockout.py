"""ostiary-lockout: see and fix the lockout store, safely while handlers run.

Usage: ``ostiary-lockout [-c FILE] COMMAND`` where FILE (default
/etc/ostiary.cfg) gives the store (LOCKOUT_DB) and the policy, and COMMAND is

``list [--json]``   every tracked address or IPv6 prefix: strikes, errors,
                    locked since, last seen (``--json``: one object, for scripts)
``show ADDR``       one address's record (an IPv6 address shows its prefix's)
``unlock ADDR``     forget ADDR's strikes, errors and lock
``lock ADDR``       lock ADDR out now (LOCKOUT_ACTION does not run)
``revive``          leave the stopped state (KILL or an error threshold)
``prune``           compact the store now, dropping expired strikes and locks
``export``          the locked-out addresses and prefixes, one a line
``reset --force``   move a corrupt store aside and start an empty one

ADDR is an IPv4 or IPv6 address, or an IPv6 prefix as ``list`` prints it.
Changes take the writers' lock, reads take none, so no handler's update is
lost and no handler waits on a reader.

Exit status: 0 done; 100 usage or a bad address; 111 a configuration
problem, a missing, unreadable or corrupt store, or another failure.
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
import time

from ..config import SEARCH, Config, ConfigError, find, load
from ..address import key as address_key
from ..policy import ERRORS, STOPPED, Entry, keeper, lock, revive, unlock
from ..supervise import bring_up_advice
from ..store import Store, StoreCorrupt, StoreError

PROG = "ostiary-lockout"
USAGE = f"""usage: {PROG} [-c FILE] COMMAND
  list [--json]   tracked addresses: strikes, errors, locked since, last seen
  show ADDR       one address's (or IPv6 prefix's) record
  unlock ADDR     forget ADDR's strikes, errors and lock
  lock ADDR       lock ADDR out now
  revive          leave the stopped state (KILL, error thresholds)
  prune           compact the store now, dropping expired strikes and locks
  export          locked-out addresses and prefixes, one a line
  reset --force   move a corrupt store aside, start an empty one
FILE defaults to the first of {', '.join(SEARCH)} that exists. Exit 0 done, 100 usage, 111 failure."""
ARITY = {"list": 0, "show": 1, "unlock": 1, "lock": 1, "revive": 0, "prune": 0,
         "export": 0, "reset": 0}


class Usage(Exception):
    """A bad command line or address: exit 100."""


class Fatal(Exception):
    """Anything else that stops the command: exit 111."""


class State:
    """Everything in the store, checked record by record."""

    def __init__(self, store: Store) -> None:
        view = store.view()
        self.now = int(time.time())
        items = {} if view is None else view.items()
        self.entries = {k: Entry(v) for k, v in items.items() if not k.startswith(b"!")}
        self.stopped: tuple[int, str] | None = None
        if STOPPED in items:
            self.stopped = parse_stopped(items[STOPPED])
        errors = items.get(ERRORS, b"0")
        if not errors.isdigit():
            raise StoreCorrupt(f"error total does not parse: {errors[:60]!r}")
        self.errors = int(errors)


def parse_stopped(raw: bytes) -> tuple[int, str]:
    """Split the stopped state into (since, reason)."""
    since, _, reason = raw.partition(b" ")
    if not since.isdigit():
        raise StoreCorrupt(f"stopped state does not parse: {raw[:60]!r}")
    return int(since), reason.decode(errors="replace")


def parse_args(argv: list[str]) -> tuple[str, str, list[str]]:
    """Return (config path, command, its arguments); raise Usage."""
    path = find()
    args = argv[1:]
    while args and args[0].startswith("-"):
        a = args.pop(0)
        if a == "-c" and args:
            path = args.pop(0)
        elif a.startswith("-c") and len(a) > 2:
            path = a[2:]
        else:
            raise Usage(f"unknown option {a!r}\n{USAGE}")
    if not args:
        raise Usage(f"no command\n{USAGE}")
    command, rest = args[0], args[1:]
    if command not in ARITY:
        raise Usage(f"unknown command {command!r}\n{USAGE}")
    flags = {"list": "--json", "reset": "--force"}.get(command)
    options = [a for a in rest if a == flags]
    operands = [a for a in rest if a != flags]
    if len(operands) != ARITY[command]:
        raise Usage(f"{command} takes {'ADDR' if ARITY[command] else 'no argument'}\n{USAGE}")
    return path, command, options + operands


def parse_address(text: str, cfg: Config) -> bytes:
    """Return the store key for an address or IPv6 prefix; raise Usage."""
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


def is_locked(e: Entry, cfg: Config, now: int) -> bool:
    """True when the handler closes this address's connections at once."""
    return e.locked_out(cfg.max_bad_conns, cfg.lockout_expire, now)


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
    rows = sorted(state.entries.items(),
                  key=lambda kv: (not kv[1].locked_since, -kv[1].locked_since, -kv[1].last_seen))
    locked = sum(is_locked(e, cfg, state.now) for e in state.entries.values())
    if as_json:
        doc = {
            "store": cfg.lockout_db,
            "stopped": None if state.stopped is None
            else {"since": state.stopped[0], "reason": state.stopped[1]},
            "total_errors": state.errors,
            "max_bad_conns": cfg.max_bad_conns,
            "addresses": [{
                "address": key.decode(), "strikes": e.strikes, "errors": e.errors,
                "locked": is_locked(e, cfg, state.now),
                "locked_since": e.locked_since or None, "last_seen": e.last_seen or None,
            } for key, e in rows],
        }
        print(json.dumps(doc))
        return
    print(f"{cfg.lockout_db}: {len(rows)} tracked, {locked} locked out, "
          f"{state.errors} errors in all (MAX_BAD_CONNS={cfg.max_bad_conns})")
    if state.stopped is not None:
        print(f"SERVICE STOPPED since {when(state.stopped[0])}: {state.stopped[1]}")
    if not rows:
        return
    width = max(15, *(len(key) for key, _ in rows))
    print(f"{'ADDRESS':<{width}}  STRIKES  ERRORS  {'LOCKED SINCE':<19}  LAST SEEN")
    for key, e in rows:
        print(f"{key.decode():<{width}}  {e.strikes:>7}  {e.errors:>6}  "
              f"{when(e.locked_since):<19}  {when(e.last_seen)}")


def cmd_show(store: Store, cfg: Config, key: bytes) -> None:
    view = store.view()
    raw = None if view is None else view.get(key)
    e = None if raw is None else Entry(raw)
    stopped = None if view is None else view.get(STOPPED)
    stopped = None if stopped is None else parse_stopped(stopped)
    print(f"address       {key.decode()}")
    if stopped is not None:
        print(f"service       STOPPED since {when(stopped[0])}: {stopped[1]}")
    if e is None:
        print("record        none: not locked out")
        return
    print(f"strikes       {e.strikes} (locked out at {cfg.max_bad_conns})")
    print(f"errors        {e.errors}")
    print(f"locked since  {when(e.locked_since)}")
    print(f"last seen     {when(e.last_seen)}")
    print(f"connections   {'closed at once' if is_locked(e, cfg, int(time.time())) else 'served'}")


def cmd_unlock(store: Store, key: bytes) -> None:
    e = unlock(store, key) if store.view() is not None else None
    if e is None:
        print(f"{key.decode()}: no record, nothing to unlock")
    else:
        print(f"{key.decode()}: unlocked (had {e.strikes} strikes, {e.errors} errors, "
              f"locked since {when(e.locked_since)})")


def cmd_lock(store: Store, key: bytes, now: int) -> None:
    since = lock(store, key, now)
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
    if store.view() is None:
        print("the store is empty: nothing to prune")
        return
    with store.lock() as tx:
        before = len(tx.items())
        kept = tx.compact()
        internal = sum(1 for k in tx.items() if k.startswith(b"!"))
    print(f"pruned: {before - kept} expired records dropped, {kept - internal} kept")


def cmd_export(store: Store, cfg: Config) -> None:
    state = State(store)
    locked = [k for k, e in state.entries.items() if is_locked(e, cfg, state.now)]
    sys.stdout.write("".join(k.decode() + "\n" for k in sorted(locked, key=sort_key)))


def cmd_reset(store: Store, force: bool) -> None:
    if not force:
        raise Usage("reset forgets every strike, lock and the stopped state: "
                    "run 'reset --force' to move a corrupt store aside")
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
    print("every strike, lock and the stopped state are forgotten; "
          "the next connection starts an empty store")


def run(argv: list[str]) -> None:
    """Carry out one command line; raise Usage, Fatal, StoreError."""
    path, command, args = parse_args(argv)
    try:
        cfg = load(path)
    except ConfigError as e:
        raise Fatal(str(e)) from None
    now = int(time.time())
    store = Store(cfg.lockout_db, keep=keeper(cfg, now))
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
            raise Usage(f"IPv6 strikes count per /{cfg.ipv6_prefix} (IPV6_PREFIX): "
                        f"lock an address or a /{cfg.ipv6_prefix} prefix")
        cmd_lock(store, key, now)
    elif command == "revive":
        cmd_revive(store, cfg)
    elif command == "prune":
        cmd_prune(store)
    elif command == "export":
        cmd_export(store, cfg)
    else:
        cmd_reset(store, "--force" in args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ostiary-lockout; ``argv`` is the whole command line (sys.argv)."""
    argv = sys.argv if argv is None else argv
    if len(argv) == 2 and argv[1] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        run(argv)
    except Usage as e:
        print(f"{PROG}: fatal: {e}", file=sys.stderr)
        return 100
    except StoreCorrupt as e:
        print(f"{PROG}: fatal: the lockout store is corrupt: {e}; every connection is "
              f"refused until it is repaired; '{PROG} reset --force' moves it aside "
              "and starts afresh (forgetting every lock)", file=sys.stderr)
        return 111
    except StoreError as e:
        print(f"{PROG}: fatal: lockout store: {e}", file=sys.stderr)
        return 111
    except Fatal as e:
        print(f"{PROG}: fatal: {e}", file=sys.stderr)
        return 111
    except BrokenPipeError:  # list | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
