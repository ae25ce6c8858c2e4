"""ostiary-handle: serve one Ostiary 4.0 connection on descriptors 0 and 1, then exit.

Usage: ``ostiary-handle [-c FILE]`` (default: the first of config.SEARCH), run by
tcpserver, tcpsvd, s6-tcpserver or inetd once per connection;
``ostiary-handle --check [-c FILE]`` validates FILE and prints what would run.

The client gets the 32-byte salt and nothing else, ever. Exit status: see
:data:`EXITS`.
"""

import os
import sys
import time

from . import log as logmod
from .address import parse as parse_address
from .config import Action, Config, ConfigError, find, load
from .policy import (
    DOORS,
    FANOUT,
    Charge,
    charge,
    doors_due,
    fail,
    kill,
    pruner,
    refusal,
    stale_charge,
    succeed,
    uncharge,
)
from .store import Store, StoreCorrupt, StoreError, View

TYPE_CHECKING = False
if TYPE_CHECKING:  # a type only: collections.abc is no import of the handler's
    from collections.abc import Callable

PROG = "ostiary-handle"
USAGE = "ostiary-handle [-c FILE] [--check] | --help | --version"
EXITS = {
    0: "the connection was handled, whatever the client proved; --check found the config usable",
    100: "usage: a bad command line",
    111: "a configuration, address or lockout-store problem, or an internal error "
    "(the client got nothing); --check found a problem",
}
LIMIT = 32  # never read more than a response's length
# What the handler imports only when it needs it: ostiary-tcpserver -F imports
# these once, before it forks the children that run main().
PRELOAD = (
    "select",
    "ostiary_ucspi.protocol",
    "ostiary_ucspi.actions",
    "ostiary_ucspi.doors",
    "ostiary_ucspi.supervise",
)


def parse_args(argv: list[str]) -> tuple[str | None, str]:
    """Return (config path, None: search; mode: serve, check, help or version).

    Raises ValueError on a bad command line.
    """
    path: str | None = None
    mode = "serve"
    args = argv[1:]
    while args:
        a = args.pop(0)
        if a == "--check":
            mode = "check"
        elif a in ("-h", "--help"):
            return path, "help"
        elif a == "--version":
            return path, "version"
        elif a == "-c":
            if not args:
                raise ValueError("-c needs a FILE")
            path = args.pop(0)
        elif a.startswith("-c") and len(a) > 2:
            path = a[2:]
        else:
            raise ValueError(f"unexpected argument {a!r}")
    return path, mode


def command_line_stop(mode: str, error: str) -> int:
    """Answer --help, --version or a bad command line the djb way; return the exit status.

    Behind a server descriptor 1 is the client's socket: there even --help is
    a usage error on stderr, so nothing but a salt ever reaches a client.
    """
    from . import fail

    stop: BaseException
    if error:
        stop = fail.Usage(f"{error}: {USAGE}")
    elif logmod.is_socket(1):
        stop = fail.Usage(f"--{mode} behind a server: {USAGE}")
    else:
        stop = fail.Help() if mode == "help" else fail.Version()
    return fail.report(PROG, USAGE, stop)


def peer_address() -> str | None:
    """Return the client's address: TCPREMOTEIP (ucspi), REMOTE_ADDR (systemd), getpeername(0)."""
    ip = os.environ.get("TCPREMOTEIP") or os.environ.get("REMOTE_ADDR")
    if ip:
        return ip
    from .cpython import socket

    try:
        s = socket(fileno=0)
    except OSError:
        return None
    try:
        return s.getpeername()[0]
    except (OSError, IndexError, TypeError):
        return None
    finally:
        s.detach()


def hangup(inetd: bool) -> None:
    """Close the connection: descriptors 0, 1 (and 2 under inetd) become /dev/null."""
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2) if inetd else (0, 1):
        os.dup2(null, fd)
    os.close(null)


def exchange(salt: bytes, timeout: int) -> tuple[bytes | None, str]:
    """Send the salt, read at most 32 bytes before one deadline.

    Returns (what was read, None if the salt could not be sent; why it is
    incomplete or '').
    """
    import select

    deadline = time.monotonic() + timeout
    try:
        if os.write(1, salt) != len(salt):
            return None, "the salt was cut short"
    except OSError as e:
        return None, f"unable to send the salt: {e.strerror}"
    got = b""
    poller = select.poll()
    poller.register(0, select.POLLIN)
    while len(got) < LIMIT:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
            return got, f"timeout after {len(got)} bytes"
        try:
            chunk = os.read(0, LIMIT - len(got))
        except OSError as e:
            return got, f"read error after {len(got)} bytes: {e.strerror}"
        if not chunk:
            return got, f"hang-up after {len(got)} bytes"
        got += chunk
    return got, ""


def start(
    cfg: Config, action: Action, what: str, ip: str, log: logmod.Log, store: Store, number: int = 0
) -> None:
    """Start ``action`` for ``ip`` in a detached runner; with an UNDO, open its door first.

    ``number``: the ACTION's number in the config (its door's name). The door
    is on disk before the action starts; a store error leaves both undone.
    """
    from .actions import ActionRefused, prepare, spawn

    try:
        uid, gid = prepare(cfg.ids(action), action.command, action.undo)
    except ActionRefused as e:
        log(logmod.ERR, f"{ip} {what} {action.command} refused: {e}")
        return
    view = store.last_view
    then = None
    if action.undo or (view is not None and view.get(DOORS) is not None):
        from . import doors  # only now: with no doors' index there is no door to read

        doors.doors(view)  # a damaged door record: no action runs (StoreCorrupt)
        if action.undo:
            close_at = doors.arm(
                store, number, ip, action.undo, action.undo_delay, uid, gid, time.time()
            )
            key = doors.door_key(number, ip)
            then = lambda: doors.keep_closing(store, key, close_at, log)  # noqa: E731
    try:
        spawn(what, action.command, ip, uid, gid, log, then)
    except OSError as e:  # no runner, no action (its door closes when due)
        log(logmod.ERR, f"{ip} {what} {action.command} not started: unable to fork: {e.strerror}")
        return
    log(
        logmod.NOTICE,
        f"{ip} {what} {action.command} starting as uid {uid} gid {gid}"
        + (f", undo in {action.undo_delay}s" if action.undo else ""),
    )


def close_due_doors(store: Store, view: View | None, log: logmod.Log, now: int) -> None:
    """After the connection: if a door is overdue (its runner died), start a sweeper.

    One lookup in a view already read when nothing is due. Never costs the
    client anything: the connection is closed already, and a store error here
    is only logged.
    """
    try:
        if not doors_due(view, now):
            return
    except StoreError as e:
        log(logmod.ERR, f"unable to check for doors to close: {e}")
        return
    from . import doors

    log(logmod.NOTICE, "a door is past its close (its runner is gone): sweeping")
    background(lambda: doors.sweep(store, log, wait=False), "a sweeper", log)


def background(job: "Callable[[], object]", what: str, log: logmod.Log) -> None:
    """Run ``job`` in a detached child once the client is gone; a failed fork is one line.

    What it would have done is done by a later connection's child.
    """
    from .actions import detach

    try:
        detach(job, log)
    except OSError as e:
        log(logmod.ERR, f"unable to fork {what}, left to a later connection: {e.strerror}")


def serve(cfg: Config, log: logmod.Log, inetd: bool) -> int:
    """Handle the connection on descriptors 0 and 1; return the exit status."""
    ip = peer_address()
    if not ip:
        hangup(inetd)
        log(logmod.ERR, "no client address (no TCPREMOTEIP, descriptor 0 is not a socket): closed")
        return 111
    try:
        ip, key = parse_address(ip, cfg.ipv6_prefix)  # from here on only the canonical form
    except ValueError as e:
        hangup(inetd)
        log(logmod.ERR, f"{e}: closed")
        return 111
    now = int(time.time())
    store = Store(cfg.lockout_db, prune=pruner(cfg, now), editor=cfg.editor)
    try:
        status = knock(cfg, store, key, ip, log, inetd, now)
        close_due_doors(store, store.last_view, log, now)
    except StoreCorrupt as e:
        hangup(inetd)
        log(
            logmod.ALERT,
            f"{ip} refused: lockout store is corrupt, refusing everyone until it is repaired: {e}",
        )
        return 111
    except StoreError as e:
        hangup(inetd)
        log(logmod.FATAL, f"{ip} refused: lockout store: {e}")
        return 111
    if store.due:  # the client is gone; a child compacts, so that no server slot waits either
        background(lambda: compact(store, log), "a compaction", log)
    return status


def compact(store: Store, log: logmod.Log) -> None:
    """Compact the store if a write of ours made it due (in a detached child)."""
    try:
        store.compact_due()
    except StoreError as e:
        log(logmod.ERR, f"unable to compact the lockout store, which serves on: {e}")


def admit(cfg: Config, store: Store, key: bytes, now: int) -> tuple[View | None, Charge]:
    """Everything a connection waits for before its salt: a lock-free look, then the charge.

    Returns the view read (None: no store yet) and what the charge did.
    """
    view = store.view()
    why = refusal(view, key, cfg.max_bad_conns, cfg.lockout_expire, now)
    return view, Charge(why) if why else charge(store, key, cfg, now)


def knock(
    cfg: Config, store: Store, key: bytes, ip: str, log: logmod.Log, inetd: bool, now: int
) -> int:
    """Refuse, or charge, send the salt, judge the response and act on it.

    Store errors propagate: whatever has not happened yet (an action
    included) does not happen.
    """
    view, charged = admit(cfg, store, key, now)
    why, stopped_now = charged.refused, charged.stopped
    for prefix in charged.locked:
        log(logmod.NOTICE, f"{prefix.decode()} locked out: {FANOUT} prefixes below it struck")
    if why:
        hangup(inetd)
        log(logmod.INFO, f"{ip} closed at once: {why}")
        if stopped_now:
            log(logmod.ALERT, f"service stopped: {stopped_now}")
            from .supervise import take_down

            take_down(log)
        if stale_charge(view, key, cfg, now):
            finish_failure(cfg, store, key, ip, log, "its last attempt never finished")
        return 0

    try:
        from .protocol import match, new_salt

        salt = new_salt()
        answer, problem = exchange(salt, cfg.comm_timeout)
    except BaseException:  # our failure: the client got no salt, so no charge either
        hangup(inetd)
        uncharge(store, key)
        raise
    hangup(inetd)
    if answer is None:  # no salt, no guess: nothing to charge
        uncharge(store, key)
        log(logmod.INFO, f"{ip} closed: {problem}")
        return 0
    secrets = [cfg.kill] + [a.secret for a in cfg.actions]
    found = match(answer, salt, secrets)
    log(logmod.DEBUG, f"{ip} salt {salt.hex()} response {answer.hex()}")
    if found < 0:
        finish_failure(cfg, store, key, ip, log, problem or "wrong response")
    elif found == 0:
        log(logmod.ALERT, f"{ip} proved KILL: service stopped until 'ostiary-lockout revive'")
        try:
            kill(store, key, now, f"KILL from {ip}")
        except StoreCorrupt:
            raise
        except StoreError:  # no room for a journal line, say: an empty file needs no block
            store.mark()
            raise
        finally:  # even when the store cannot record it, supervise can stop the service
            from .supervise import take_down

            take_down(log)
    else:
        succeed(store, key)
        start(cfg, cfg.actions[found - 1], f"action {found}", ip, log, store, found)
    if cfg.delay:
        time.sleep(cfg.delay)
    return 0


def finish_failure(
    cfg: Config, store: Store, key: bytes, ip: str, log: logmod.Log, problem: str
) -> None:
    """Make a failed attempt final: lock, LOCKOUT_ACTION, error thresholds."""
    locked, stop_reason = fail(store, key, cfg, int(time.time()))
    log(logmod.NOTICE, f"{ip} failed: {problem}")
    if locked:
        log(logmod.NOTICE, f"{ip} locked out after {cfg.max_bad_conns} bad connections")
        if cfg.lockout_action is not None:
            start(cfg, cfg.lockout_action, "lockout action", ip, log, store)
    if stop_reason:
        log(logmod.ALERT, f"service stopped: {stop_reason}")
        from .supervise import take_down

        take_down(log)


def main(argv: list[str] | None = None, inetd: bool | None = None) -> int:
    """Entry point of ostiary-handle; ``inetd``: descriptor 2 was the client's socket."""
    argv = sys.argv if argv is None else argv
    try:
        path, mode = parse_args(argv)
    except ValueError as e:
        return command_line_stop("", str(e))
    if mode in ("help", "version"):
        return command_line_stop(mode, "")
    if mode == "check":
        from .check import check_main

        return check_main(path)
    if path is None:
        path = find()
    if inetd is None:
        inetd = logmod.stderr_is_socket()
    log = logmod.Log(PROG, use_syslog=inetd)
    try:
        cfg = load(path)
    except ConfigError as e:
        hangup(inetd)
        log(logmod.FATAL, str(e))
        return 111
    log.level = cfg.min_loglevel
    from .cpython import SIGALRM, alarm, signal

    limit = cfg.comm_timeout + cfg.delay + 30

    def timed_out(signum: int, frame: object) -> None:
        log(logmod.FATAL, f"still running after {limit}s: exiting")
        os._exit(111)

    signal(SIGALRM, timed_out)
    alarm(limit)  # a backstop: nothing may hang the handler
    try:
        return serve(cfg, log, inetd)
    except Exception as e:  # one log line, and never a traceback on an inetd socket
        hangup(inetd)
        log(logmod.FATAL, f"internal error: {type(e).__name__}: {e}")
        return 111
