"""ostiary-handle: serve one Ostiary 4.0 connection on descriptors 0 and 1, then exit.

Usage: ``ostiary-handle [-c FILE]`` (default: the first of config.SEARCH), run by
tcpserver, tcpsvd, s6-tcpserver or inetd once per connection;
``ostiary-handle --check [-c FILE]`` validates FILE and prints what would run.

The client gets the 32-byte salt and nothing else, ever. Exit status: 0 the
connection was handled (whatever the client proved), 100 usage, 111 a
configuration, address or lockout-store problem (the client got nothing).
"""
import os
import sys
import time

from . import log as logmod
from .address import parse as parse_address
from .config import Config, ConfigError, find, load
from .policy import charge, fail, keeper, refusal, stale_charge, stop, succeed
from .store import Store, StoreCorrupt, StoreError
from .supervise import take_down

USAGE = "usage: ostiary-handle [-c FILE] [--check]"
LIMIT = 32  # never read more than a response's length


def parse_args(argv: list[str]) -> tuple[str | None, bool]:
    """Return (config path, None: search; check mode); raise ValueError on a bad command line."""
    path, check = None, False
    args = argv[1:]
    while args:
        a = args.pop(0)
        if a == "--check":
            check = True
        elif a == "-c" and args:
            path = args.pop(0)
        elif a.startswith("-c") and len(a) > 2:
            path = a[2:]
        else:
            raise ValueError(a)
    return path, check


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


def exchange(salt: bytes, timeout: int) -> tuple[bytes, str]:
    """Send the salt, read at most 32 bytes before one deadline.

    Returns (what was read, why it is incomplete or '').
    """
    import select

    deadline = time.monotonic() + timeout
    try:
        os.write(1, salt)
    except OSError as e:
        return b"", f"unable to send the salt: {e.strerror}"
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


def start(cfg: Config, action, what: str, ip: str, log: logmod.Log) -> None:
    """Start ``action`` (and its undo) for ``ip`` in a detached runner."""
    from .actions import ActionRefused, prepare, spawn

    try:
        uid, gid = prepare(cfg.ids(action), action.command, action.undo)
    except ActionRefused as e:
        log(logmod.ERR, f"{ip} {what} {action.command} refused: {e}")
        return
    jobs = [(what, action.command, 0)]
    if action.undo:
        jobs.append(("undo", action.undo, action.undo_delay))
    log(logmod.NOTICE, f"{ip} {what} {action.command} starting as uid {uid} gid {gid}"
        + (f", undo in {action.undo_delay}s" if action.undo else ""))
    spawn(jobs, ip, uid, gid, log)


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
    store = Store(cfg.lockout_db, keep=keeper(cfg, now))
    try:
        return knock(cfg, store, key, ip, log, inetd, now)
    except StoreCorrupt as e:
        hangup(inetd)
        log(logmod.ALERT,
            f"{ip} refused: lockout store is corrupt, refusing everyone until it is repaired: {e}")
        return 111
    except StoreError as e:
        hangup(inetd)
        log(logmod.FATAL, f"{ip} refused: lockout store: {e}")
        return 111


def knock(cfg: Config, store: Store, key: bytes, ip: str, log: logmod.Log, inetd: bool,
          now: int) -> int:
    """Refuse, or charge, send the salt, judge the response and act on it.

    Store errors propagate: whatever has not happened yet (an action
    included) does not happen.
    """
    view = store.view()
    why, stopped_now = refusal(view, key, cfg.max_bad_conns, cfg.lockout_expire, now), None
    if not why:
        why, stopped_now = charge(store, key, cfg, now)
    if why:
        hangup(inetd)
        log(logmod.INFO, f"{ip} closed at once: {why}")
        if stopped_now:
            log(logmod.ALERT, f"service stopped: {stopped_now}")
            take_down(log)
        if stale_charge(view, key, cfg, now):
            finish_failure(cfg, store, key, ip, log, "its last attempt never finished")
        return 0

    from .protocol import match, new_salt

    salt = new_salt()
    answer, problem = exchange(salt, cfg.comm_timeout)
    hangup(inetd)
    secrets = [cfg.kill] + [a.secret for a in cfg.actions]
    found = match(answer, salt, secrets)
    log(logmod.DEBUG, f"{ip} salt {salt.hex()} response {answer.hex()}")
    if found < 0:
        finish_failure(cfg, store, key, ip, log, problem or "wrong response")
    elif found == 0:
        log(logmod.ALERT, f"{ip} proved KILL: service stopped until 'ostiary-lockout revive'")
        try:
            succeed(store, key)
            with store.lock() as tx:
                stop(tx, now, f"KILL from {ip}")
        finally:  # even when the store cannot record it, supervise can stop the service
            take_down(log)
    else:
        succeed(store, key)
        start(cfg, cfg.actions[found - 1], f"action {found}", ip, log)
    if cfg.delay:
        time.sleep(cfg.delay)
    return 0


def finish_failure(cfg: Config, store: Store, key: bytes, ip: str, log: logmod.Log,
                   problem: str) -> None:
    """Make a failed attempt final: lock, LOCKOUT_ACTION, error thresholds."""
    locked, stop_reason = fail(store, key, cfg, int(time.time()))
    log(logmod.NOTICE, f"{ip} failed: {problem}")
    if locked:
        log(logmod.NOTICE, f"{ip} locked out after {cfg.max_bad_conns} bad connections")
        if cfg.lockout_action is not None:
            start(cfg, cfg.lockout_action, "lockout action", ip, log)
    if stop_reason:
        log(logmod.ALERT,
            f"service stopped: {stop_reason}")
        take_down(log)


def main(argv: list[str] | None = None, inetd: bool | None = None) -> int:
    """Entry point of ostiary-handle; ``inetd``: descriptor 2 was the client's socket."""
    argv = sys.argv if argv is None else argv
    try:
        path, check = parse_args(argv)
    except ValueError:
        os.write(2, f"ostiary-handle: {USAGE}\n".encode())
        return 100
    if check:
        from .check import check_main
        return check_main(path)
    if path is None:
        path = find()
    if inetd is None:
        inetd = logmod.stderr_is_socket()
    log = logmod.Log("ostiary-handle", use_syslog=inetd)
    try:
        cfg = load(path)
    except ConfigError as e:
        hangup(inetd)
        log(logmod.FATAL, str(e))
        return 111
    log.level = cfg.min_loglevel
    from .cpython import alarm

    alarm(cfg.comm_timeout + cfg.delay + 30)  # a backstop: nothing may hang the handler
    try:
        return serve(cfg, log, inetd)
    except Exception as e:  # one log line, and never a traceback on an inetd socket
        hangup(inetd)
        log(logmod.FATAL, f"internal error: {type(e).__name__}: {e}")
        return 111
