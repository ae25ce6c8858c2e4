"""ostiary-tcpserver: ucspi-tcp 0.88's tcpserver, in pure Python.

Usage: ostiary-tcpserver [ -1UXpPhHrRoOdDqQv ] [ -c limit ] [ -x rules.cdb ]
[ -B banner ] [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ]
[ -t timeout ] [ -F module ] host port program [ arg ... ]

Options, defaults, environment, log lines and messages are tcpserver's (see
tcpserver(1)); messages are written as ``tcpserver: ...`` so that log readers
written for tcpserver keep working. For each connection a child process does
tcpserver's per-connection work (banner, DNS, ident, rules), then execs
``program`` with the socket as descriptors 0 and 1. With no look-up and no
banner to do (``-HRl0``, the usual case) the server reads the rules itself and
starts an allowed connection's program with posix_spawn, which costs far less
than forking a Python process; the ``pid`` and ``ok`` lines are then written
just after the program starts rather than just before. The listening socket
and every other descriptor the server opens are close-on-exec: ``program``
gets only what the server itself inherited, plus descriptors 0 and 1. Like
tcpserver, the server lets go of its own descriptors 0 and 1 once it listens
(it points them at /dev/null).

The forking mode, ``-F module`` (not tcpserver's): the server imports Python
``module`` once, after dropping privileges, and for each connection forks a
child that, with exactly what ``program`` would have had (descriptors 0 and
1 the connection and no other above 2, the same environment, the signal
dispositions of a freshly started Python and none blocked), calls
``module.main([program, arg ...])``
instead of exec'ing ``program``; its return value is the child's exit status.
Modules the module names in ``PRELOAD`` are imported once too. With nothing
to look up (``-HRl0``) the parent reads the rules and builds an allowed
connection's environment before it forks, so that the child copies fewer of
its pages; a denied connection is left to the child, as without -F. No exec and no
interpreter start per connection, at the price of isolation: every child is a
copy of the server's memory (see SECURITY.md).

Like tcpserver, look-ups use djbdns's method, not the C library's
(``dns.py``), and ident (-r) asks port 113 of the client (``ident.py``).

IPv6, which ucspi-tcp 0.88 lacks (``tcpserver: fatal: no IP address for ::1``):
``host`` may be an IPv6 address; ``::`` accepts IPv6 and IPv4 clients. A native
IPv6 connection gets, as the IPv6-patched tcpservers give it, PROTO=TCP6 and
TCP6LOCALIP, TCP6LOCALPORT, TCP6LOCALHOST, TCP6REMOTEIP, TCP6REMOTEPORT,
TCP6REMOTEHOST, TCP6REMOTEINFO, TCP6INTERFACE (link-local only), and also the
TCP* variables with the same values, so that programs reading TCPREMOTEIP
(ostiary-handle does) work unchanged. An IPv4 client of ``::`` gets exactly
what an IPv4 connection gets: PROTO=TCP and dotted quads. In -v lines the
colons of an IPv6 address show as ``?``, as every field's colons do in
tcpserver, so each line keeps its four colon-separated fields.

Known differences from tcpserver 0.88: a DNS server that refuses (ICMP port
unreachable) is skipped at once rather than waited on for 11 s in the third
round; truncated DNS answers are not retried over TCP; a host *name* on the
command line is resolved by the C library (IPv4 addresses only); a port
above 65535 is refused rather than reduced modulo 65536; an unreadable rules
file (a directory, say) drops the connection instead of crashing the child.

Exit codes: :data:`EXITS`. Each child exits 100 when the rules deny the
connection, 111 when it drops it (rules file missing or unreadable, banner
unwritable, program not runnable); otherwise it becomes ``program`` (with
-F, exits with what ``module.main`` returns).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import sys

from .. import fail
from ..fail import Fatal, Usage
from .dns import dns_name, dns_servers, name_matches
from .ident import remote_info
from .rules import unmapped

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

PROG = "ostiary-tcpserver"
# Usage and fatal lines name this program; log lines (status, ok, end, deny,
# warning) say "tcpserver:" as 0.88's do, for whatever reads the log.
USAGE = (
    "ostiary-tcpserver [ -1UXpPhHrRoOdDqQv ] [ -c limit ] [ -x rules.cdb ] "
    "[ -B banner ] [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ] "
    "[ -t timeout ] [ -F module ] host port program"
)
OPTIONS = "dDvqQhHrR1UXx:t:u:g:l:b:B:c:F:pPoO"
DROP = "tcpserver: warning: dropping connection, "
EXITS = {
    0: "stopped by SIGTERM (the server); --help, --version",
    100: "usage: a bad option, or host, port or program missing; "
    "a child: the rules deny the connection",
    111: "the port or host is unknown, or the socket cannot be created, bound or listened on, "
    "or the gid or uid cannot be set, or the -F module cannot be imported; "
    "a child: the connection was dropped",
}

# djb's error_str() wording for the errors tcpserver can meet.
ERRORS = {
    errno.EINTR: "interrupted system call",
    errno.ENOMEM: "out of memory",
    errno.ENOENT: "file does not exist",
    errno.ETXTBSY: "text busy",
    errno.EIO: "input/output error",
    errno.EEXIST: "file already exists",
    errno.ETIMEDOUT: "timed out",
    errno.EINPROGRESS: "operation in progress",
    errno.EAGAIN: "temporary failure",
    errno.EPIPE: "broken pipe",
    errno.EPERM: "permission denied",
    errno.EACCES: "access denied",
    errno.ENXIO: "device not configured",
    errno.EPROTO: "protocol error",
    errno.EISDIR: "is a directory",
    errno.ECONNREFUSED: "connection refused",
    errno.E2BIG: "argument list too long",
    errno.ENOEXEC: "exec format error",
    errno.EBADF: "file descriptor not open",
    errno.EFAULT: "bad address",
    errno.ENOTDIR: "not a directory",
    errno.EINVAL: "invalid argument",
    errno.ENFILE: "system cannot open more files",
    errno.EMFILE: "process cannot open more files",
    errno.ENOSPC: "out of disk space",
    errno.EROFS: "read-only file system",
    errno.ENOTSOCK: "not a socket",
    errno.EPROTONOSUPPORT: "protocol not supported",
    errno.EAFNOSUPPORT: "address family not supported",
    errno.EADDRINUSE: "address already used",
    errno.EADDRNOTAVAIL: "address not available",
    errno.ENETDOWN: "network down",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNABORTED: "connection aborted",
    errno.ECONNRESET: "connection reset",
    errno.ENOBUFS: "out of buffer space",
    errno.ENOTCONN: "not connected",
    errno.ELOOP: "symbolic link loop",
    errno.ENAMETOOLONG: "file name too long",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENOSYS: "system call not available",
}


def error_text(e: BaseException) -> str:
    """Return djb's wording for an OSError's errno ("unknown error" otherwise)."""
    return ERRORS.get(getattr(e, "errno", None) or 0, "unknown error")


def scan_ulong(text: str) -> tuple[int, int]:
    """Read leading decimal digits like djb's scan_ulong: (value, digits used)."""
    n = 0
    while n < len(text) and "0" <= text[n] <= "9":
        n += 1
    return (int(text[:n]) if n else 0), n


def number(text: str) -> int:
    """An option's number, as tcpserver reads it: leading digits, else 0."""
    return scan_ulong(text)[0]


def getopt(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Split argv like djb's getopt: ([(option, argument)], operands)."""
    found: list[tuple[str, str]] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg[:1] != "-" or arg == "-":
            break
        j = 1
        while j < len(arg):
            opt = arg[j]
            k = OPTIONS.find(opt)
            if opt == ":" or k < 0:
                raise Usage(f"illegal option -- {opt}")
            if OPTIONS[k + 1 : k + 2] != ":":
                found.append((opt, ""))
                j += 1
                continue
            value = arg[j + 1 :]
            if not value:
                i += 1
                if i == len(argv):
                    raise Usage(f"option requires an argument -- {opt}")
                value = argv[i]
            found.append((opt, value))
            break
        i += 1
    return found, argv[i:]


class Options:
    """tcpserver's settings; the defaults are ucspi-tcp 0.88's."""

    def __init__(self) -> None:
        self.verbosity = 1
        self.limit = 40
        self.backlog = 20
        self.rules: str | None = None
        self.allow_norules = False
        self.banner = b""
        self.delay = True
        self.killopts = True
        self.remotehost = True
        self.paranoid = False
        self.remoteinfo = True
        self.localhost: bytes | None = None
        self.timeout = 26
        self.uid = 0
        self.gid = 0
        self.print_port = False
        self.fork_module: str | None = None

    def set(self, opt: str, value: str) -> None:
        """Apply one option, in command-line order (so -U and -u override each other)."""
        flags = {
            "d": ("delay", True),
            "D": ("delay", False),
            "v": ("verbosity", 2),
            "q": ("verbosity", 0),
            "Q": ("verbosity", 1),
            "h": ("remotehost", True),
            "H": ("remotehost", False),
            "r": ("remoteinfo", True),
            "R": ("remoteinfo", False),
            "p": ("paranoid", True),
            "P": ("paranoid", False),
            "o": ("killopts", False),
            "O": ("killopts", True),
            "1": ("print_port", True),
            "X": ("allow_norules", True),
        }
        numbers = {"c": "limit", "b": "backlog", "t": "timeout", "u": "uid", "g": "gid"}
        if opt in flags:
            setattr(self, *flags[opt])
        elif opt in numbers:
            setattr(self, numbers[opt], number(value))
        elif opt == "x":
            self.rules = value
        elif opt == "B":
            self.banner = os.fsencode(value)
        elif opt == "l":
            self.localhost = os.fsencode(value)
        elif opt == "F":
            self.fork_module = value
        elif opt == "U":
            if "UID" in os.environ:
                self.uid = number(os.environ["UID"])
            if "GID" in os.environ:
                self.gid = number(os.environ["GID"])


def parse(argv: list[str]) -> tuple[Options, list[str]]:
    """Return the options and the operands (host, port, program...); raise Usage."""
    found, operands = getopt(argv)
    opts = Options()
    for opt, value in found:
        opts.set(opt, value)
    return opts, operands


def original_environment() -> dict[bytes, bytes]:
    """The environment this process was started with.

    Python may add LC_CTYPE to its own (PEP 538); tcpserver passes its
    environment on untouched, so read the one the kernel recorded.
    """
    try:
        with open("/proc/self/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return dict(os.environb)
    env: dict[bytes, bytes] = {}
    for entry in entries:
        name, eq, value = entry.partition(b"=")
        if eq and name not in env:
            env[name] = value
    return env


def exec_candidates(program: str, env: dict[bytes, bytes]) -> list[bytes]:
    """Paths to try, as djb's pathexec: as given if it has a slash, else along $PATH."""
    prog = os.fsencode(program)
    if b"/" in prog:
        return [prog]
    path = env.get(b"PATH", b"/bin:/usr/bin")
    return [(d or b".") + b"/" + prog for d in path.split(b":")]


def safe(text: bytes | str | None) -> str:
    """A log field as tcpserver writes it: controls, non-ASCII and ':' become '?'."""
    if text is None:
        return ""
    data = os.fsencode(text) if isinstance(text, str) else text
    out = "".join("?" if b < 33 or b > 126 or b in b":%" else chr(b) for b in data[:100])
    return out + "..." if len(data) >= 100 else out  # djb's loop stops at 100 either way


def split_address(address: tuple, family: int) -> tuple[str, int, bool, str]:
    """(ip, port, native IPv6?, interface) of a socket address; v4-mapped is IPv4."""
    ip, port = address[0], address[1]
    if family != socket.AF_INET6:
        return ip, port, False, ""
    ip, _, interface = ip.partition("%")
    plain = unmapped(ip)
    if plain != ip:
        return plain, port, False, ""
    return ip, port, True, interface


def resolve_host(host: str) -> tuple[int, tuple]:
    """(family, socket address with port 0) for the host argument."""
    if host in ("", "0"):
        return socket.AF_INET, ("0.0.0.0", 0)
    try:
        infos = socket.getaddrinfo(host, 0, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        try:
            infos = socket.getaddrinfo(host, 0, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as e:
            if e.errno == socket.EAI_AGAIN:
                raise Fatal(
                    f"temporarily unable to figure out IP address for {host}: temporary failure"
                ) from None
            infos = []
    if not infos:
        raise Fatal(f"no IP address for {host}")
    return infos[0][0], infos[0][4]


def resolve_port(port: str) -> int:
    """The port argument: a number (empty is 0) or a name from /etc/services."""
    value, used = scan_ulong(port)
    if used < len(port):
        try:
            value = socket.getservbyname(port, "tcp")
        except OSError:
            raise Fatal(f"unable to figure out port number for {port}") from None
    if value > 65535:
        raise Fatal(f"unable to figure out port number for {port}")
    return value


def open_listener(opts: Options, host: str, port: str) -> socket.socket:
    """Bind and listen, drop privileges, then (-1) print the port and close 0 and 1."""
    number = resolve_port(port)
    family, address = resolve_host(host)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise Fatal(f"unable to create socket: {error_text(e)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # "::" takes IPv4 clients too
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address[0], number) + tuple(address[2:]))
    except OSError as e:
        raise Fatal(f"unable to bind: {error_text(e)}") from None
    try:
        number = sock.getsockname()[1]
    except OSError as e:
        raise Fatal(f"unable to get local address: {error_text(e)}") from None
    try:
        sock.listen(min(opts.backlog, 0x7FFFFFFF))
    except OSError as e:
        raise Fatal(f"unable to listen: {error_text(e)}") from None
    sock.setblocking(False)
    try:
        if opts.gid:
            os.setgroups([opts.gid])
            os.setgid(opts.gid)
    except (OSError, OverflowError) as e:
        raise Fatal(f"unable to set gid: {error_text(e)}") from None
    try:
        if opts.uid:
            os.setuid(opts.uid)
    except (OSError, OverflowError) as e:
        raise Fatal(f"unable to set uid: {error_text(e)}") from None
    if opts.print_port:
        try:
            os.write(1, b"%d\n" % number)
        except OSError:
            pass
    # tcpserver closes 0 and 1; /dev/null in their place keeps accepted
    # sockets off them (a reader of -1's output sees end of file all the same).
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in (0, 1):
        if fd != null:
            os.dup2(null, fd, inheritable=False)
    if null > 1:
        os.close(null)
    return sock


def endpoint(address: tuple, ip: str, v6: bool) -> tuple:
    """A socket address for ``ip`` with ``address``'s port (and IPv6 flow and scope)."""
    return (ip,) + tuple(address[1:]) if v6 else (ip, address[1])


class Drop(Exception):
    """The connection is dropped: the child logs why and exits 111."""


class Server:
    """The accept loop, the children, and what happens before ``program`` runs.

    Without look-ups or banner (-H -R -l name, no -B: the usual ``-HRl0``) the
    parent reads the rules itself and starts an allowed connection's program
    with posix_spawn, much cheaper than forking a Python process. Everything
    else, deny and drop included, goes to a forked child that does
    tcpserver's work step by step, so the log lines are tcpserver's.
    """

    def __init__(
        self,
        opts: Options,
        program: list[str],
        sock: socket.socket,
        entry: Callable[[list[str]], int] | None = None,
    ) -> None:
        """``entry``: -F's ``module.main``, called in each child instead of exec'ing ``program``."""
        self.opts = opts
        self.entry = entry
        self.program = program
        self.sock = sock
        self.family = sock.family
        self.env = original_environment()
        self.candidates = exec_candidates(program[0], self.env)
        self.running = 0
        self.verbose = opts.verbosity >= 2
        quick = (  # nothing to look up or send: the parent can do a connection's work itself
            opts.localhost is not None
            and not opts.remotehost
            and not opts.remoteinfo
            and not opts.banner
        )
        self.spawn = quick and entry is None
        self.early = quick and entry is not None
        self.resets: list[int] = []  # -F: the signals a child puts back to their default
        self.rules = None
        if opts.rules is not None:
            from . import rules

            self.rules = rules

    def say(self, line: str) -> None:
        """Write an error message unless -q."""
        if self.opts.verbosity:
            try:
                os.write(2, os.fsencode(line + "\n"))
            except OSError:
                pass

    def status(self) -> None:
        """Log ``status: running/limit``."""
        if self.verbose:
            self.say(f"tcpserver: status: {self.running}/{self.opts.limit}")

    def verdict(self, pid: int, deny: bool, fields: tuple) -> None:
        """Log ``ok`` or ``deny`` and the connection's names and addresses, as -v does."""
        if self.verbose:
            localhost, local_ip, local_port, remotehost, remote_ip, info, remote_port = fields
            self.say(
                f"tcpserver: {'deny' if deny else 'ok'} {pid} "
                f"{safe(localhost)}:{safe(local_ip)}:{local_port} "
                f"{safe(remotehost)}:{safe(remote_ip)}:{safe(info)}:{remote_port}"
            )

    def serve(self) -> NoReturn:
        """Accept connections for ever, at most -c children at a time."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        both = select.poll()
        both.register(wake_r, select.POLLIN)
        both.register(self.sock.fileno(), select.POLLIN)
        wake_only = select.poll()
        wake_only.register(wake_r, select.POLLIN)
        accept = self.sock._accept
        limit = self.opts.limit
        if self.entry is not None:  # as the children will inherit them, set once and for all
            self.resets = not_default_signals()
        self.status()
        while True:
            for fd, _event in (both if self.running < limit else wake_only).poll():
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except OSError:
                        pass
                    self.reap()
                    continue
                if self.running >= limit:
                    continue
                try:
                    conn, peer = accept()
                except OSError:  # gone already, or out of descriptors
                    continue
                self.running += 1
                self.status()
                if not (self.spawn and self.started(conn, peer)):
                    self.fork(conn, peer)
                os.close(conn)

    def reap(self) -> None:
        """Collect every finished child, logging ``end PID status WSTAT``."""
        while True:
            try:
                pid, wstat = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.verbose:
                self.say(f"tcpserver: end {pid} status {wstat}")
            if self.running:
                self.running -= 1
            self.status()

    def fork(self, fd: int, peer: tuple) -> None:
        """Hand the connection to a child that does all of tcpserver's work.

        With -F and nothing to look up, the parent first prepares an allowed
        connection itself (see :meth:`allowed`): what a child does is then only
        what it must, and it copies fewer of the parent's pages.
        """
        found = self.allowed(fd, peer) if self.early else None
        ready = None if found is None else (environment_changes(found[0]), found[1])
        try:
            pid = os.fork()
        except OSError as e:
            self.say(f"{DROP}unable to fork: {error_text(e)}")
            self.running -= 1
            self.status()
            return
        if pid:
            return
        code = 111
        try:
            code = self.child(fd, peer, ready)
        except Exception as e:  # never back into the accept loop
            self.say(f"{DROP}internal error: {type(e).__name__}: {e}")
        finally:
            os._exit(code)

    def started(self, fd: int, peer: tuple) -> bool:
        """Fast path, in the parent: start an allowed connection's program.

        Returns False when :meth:`allowed` found none, or no spawn worked.
        """
        found = self.allowed(fd, peer)
        if found is None:
            return False
        env, fields = found
        actions = [(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)]
        for path in self.candidates:
            if len(self.candidates) > 1 and not os.path.exists(path):
                continue
            try:
                pid = os.posix_spawn(
                    path,
                    self.program,
                    env,
                    file_actions=actions,
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                )
            except OSError:
                continue
            if self.verbose:
                self.say(f"tcpserver: pid {pid} from {fields[4]}")
                self.verdict(pid, False, fields)
            return True
        return False

    def allowed(self, fd: int, peer: tuple) -> tuple[dict[bytes, bytes], tuple] | None:
        """In the parent: an allowed connection's environment and log fields.

        None, having changed nothing the child would see, when the connection
        is denied or something fails: a forked child then does it all again
        and logs it as tcpserver does.
        """
        try:
            conn = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
            try:
                values, deny, fields = self.prepare(conn, peer)
            finally:
                conn.detach()
        except Exception:  # Drop, or anything unexpected: the child reports it
            return None
        return None if deny else (self.environment(values), fields)

    def child(self, fd: int, peer: tuple, ready: tuple[Changes, tuple] | None = None) -> int:
        """In a forked child: tcpserver's per-connection work, then exec.

        ``ready``: the environment changes and log fields the parent found
        (:meth:`allowed`), so not found again.
        Returns the exit code when the connection is denied (100) or dropped (111).
        """
        self.sock.close()
        pid = os.getpid()
        if self.verbose:
            self.say(f"tcpserver: pid {pid} from {split_address(peer, self.family)[0]}")
        if ready is None:
            conn = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
            try:
                values, deny, fields = self.prepare(conn, peer)
            except Drop as e:
                self.say(f"{DROP}{e}")
                return 111
            self.verdict(pid, deny, fields)
            if deny:
                return 100
            env = self.environment(values)
            changes = environment_changes(env) if self.entry is not None else ([], [])
        else:
            changes, fields = ready
            self.verdict(pid, False, fields)
        try:
            os.dup2(fd, 0)
            os.dup2(fd, 1)  # fd itself is close-on-exec
        except OSError as e:
            self.say(f"{DROP}unable to set up descriptors: {error_text(e)}")
            return 111
        if self.entry is not None:
            return self.call(changes)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        saved: OSError | None = None
        last: OSError | None = None
        for path in self.candidates:  # djb's pathexec
            try:
                os.execve(path, self.program, env)
            except OSError as e:
                last = e
                if e.errno != errno.ENOENT:
                    saved = e
                    if e.errno not in (errno.EACCES, errno.EPERM, errno.EISDIR):
                        break
        self.say(f"{DROP}unable to run {self.program[0]}: {error_text(saved or last)}")
        return 111

    def call(self, changes: Changes) -> int:
        """-F, in the child: become what exec'ing ``program`` would have made, then run it.

        Descriptors 0, 1 and 2 only, the environment ``changes`` make and nothing else, no signal
        blocked and every one at its default but those a starting Python sets
        (SIGPIPE and SIGXFSZ ignored, SIGINT KeyboardInterrupt): what a Python
        program exec'd by a server started cleanly would have. Returns
        ``entry``'s status.
        """
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the listening socket, the wake-up pipe
        signal.set_wakeup_fd(-1)
        for sig in self.resets:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):  # SIGKILL, SIGSTOP, the C library's own
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        unset, changed = changes
        environ = os.environb
        for name in unset:
            del environ[name]
        for name, value in changed:
            environ[name] = value
        sys.argv = list(self.program)
        status = self.entry(list(self.program))  # type: ignore[misc]
        sys.stdout.flush()
        return status

    def prepare(
        self, conn: socket.socket, peer: tuple
    ) -> tuple[list[tuple[bytes, bytes | None]], bool, tuple]:
        """Socket options, banner, look-ups and rules, in tcpserver's order.

        Returns the variables to set (None: unset), whether the rules deny the
        connection, and the names and addresses for the log line; raises Drop.
        """
        o = self.opts
        remote_ip, remote_port, v6, _ = split_address(peer, self.family)
        if o.killopts and self.family == socket.AF_INET:
            try:
                conn.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"")
            except OSError:
                pass
        if not o.delay:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if o.banner:
            try:
                conn.sendall(o.banner)
            except OSError as e:
                raise Drop(f"unable to print banner: {error_text(e)}") from None
        try:
            local = conn.getsockname()
        except OSError as e:
            raise Drop(f"unable to get local address: {error_text(e)}") from None
        local_ip, local_port, _, interface = split_address(local, self.family)

        servers: list[str] = []
        localhost = o.localhost
        if localhost is None:
            servers = dns_servers(self.env)
            name = dns_name(servers, local_ip, v6)
            localhost = None if name is None else name.encode()
        remotehost = None
        if o.remotehost:
            servers = servers or dns_servers(self.env)
            name = dns_name(servers, remote_ip, v6)
            if name is not None and (not o.paranoid or name_matches(servers, name, remote_ip, v6)):
                remotehost = name
        info = None
        if o.remoteinfo:
            family = socket.AF_INET6 if v6 else socket.AF_INET
            info = remote_info(
                family, endpoint(local, local_ip, v6), endpoint(peer, remote_ip, v6), o.timeout
            )

        values: list[tuple[bytes, bytes | None]] = [
            (b"TCPLOCALIP", local_ip.encode()),
            (b"TCPLOCALPORT", b"%d" % local_port),
            (b"TCPLOCALHOST", localhost),
            (b"TCPREMOTEIP", remote_ip.encode()),
            (b"TCPREMOTEPORT", b"%d" % remote_port),
            (b"TCPREMOTEHOST", None if remotehost is None else remotehost.encode()),
            (b"TCPREMOTEINFO", info),
        ]
        if v6:
            values += [(b"TCP6" + name[3:], value) for name, value in values]
            values.append((b"TCP6INTERFACE", interface.encode() or None))
        values.insert(0, (b"PROTO", b"TCP6" if v6 else b"TCP"))

        deny = False
        path = o.rules
        if self.rules is not None and path is not None:
            try:
                found = self.rules.lookup(
                    path, remote_ip, remotehost, None if info is None else os.fsdecode(info)
                )
            except self.rules.RulesMissing:
                if not o.allow_norules:
                    raise Drop(f"unable to read {path}: file does not exist") from None
                found = None
            except self.rules.RulesError as e:
                cause = e.__cause__
                if isinstance(cause, OSError) and cause.errno:
                    raise Drop(f"unable to read {path}: {error_text(cause)}") from None
                raise Drop(str(e)) from None
            if found is not None:
                deny = not found[0]
                values += [(os.fsencode(k), os.fsencode(v)) for k, v in found[1].items()]
        fields = (localhost, local_ip, local_port, remotehost, remote_ip, info, remote_port)
        return values, deny, fields

    def environment(self, values: list[tuple[bytes, bytes | None]]) -> dict[bytes, bytes]:
        """The server's own environment with ``values`` set (None: removed)."""
        env = dict(self.env)
        for name, value in values:
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env


Changes = tuple[list[bytes], list[tuple[bytes, bytes]]]


def environment_changes(env: dict[bytes, bytes]) -> Changes:
    """What makes this process's environment ``env``: the names to unset, those to set."""
    environ = os.environb
    unset = [name for name in environ if name not in env]
    return unset, [(name, value) for name, value in env.items() if environ.get(name) != value]


def not_default_signals() -> list[int]:
    """The signals this process catches or ignores, as the kernel says (/proc/self/status).

    Every signal where /proc cannot say: resetting one already at its
    default changes nothing, but costs a system call each.
    """
    everything = list(signal.valid_signals())
    try:
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        masks = [
            int(line.split()[1], 16)
            for line in status.split(b"\n")
            if line.startswith((b"SigIgn:", b"SigCgt:"))
        ]
    except (OSError, ValueError, IndexError):
        return everything
    if len(masks) != 2:
        return everything
    bits = masks[0] | masks[1]
    return [sig for sig in everything if bits >> (sig - 1) & 1]


def preload(name: str) -> Callable[[list[str]], int]:
    """-F: import ``name`` (and what its ``PRELOAD`` names) once; return its ``main``.

    Runs after the privileges are dropped. The objects it made are frozen out
    of the garbage collector, so children do not copy the pages it would touch.
    """
    import gc
    import importlib

    try:
        module = importlib.import_module(name)
        for extra in getattr(module, "PRELOAD", ()):
            importlib.import_module(extra)
        entry = module.main
    except Exception as e:  # ImportError, or whatever the module raised
        raise Fatal(f"unable to import {name}: {type(e).__name__}: {e}") from None
    gc.collect()
    gc.freeze()
    return entry  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` includes the program name, as sys.argv does."""
    argv = sys.argv if argv is None else argv
    if argv[1:2] in (["--help"], ["--version"]):  # -h is tcpserver's: look up the remote name
        return fail.report(PROG, USAGE, fail.Help() if argv[1] == "--help" else fail.Version())
    try:
        opts, operands = parse(argv)
    except Usage as e:
        name = os.path.basename(argv[0]) if argv else PROG  # as djb's getopt: argv[0]
        os.write(2, os.fsencode(f"{name}: {e.text}\n"))
        fail.say(PROG, "usage", USAGE)
        return fail.USAGE
    if len(operands) < 3:
        if opts.verbosity:
            fail.say(PROG, "usage", USAGE)
        return fail.USAGE
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as tcpserver: no traceback, just gone
    try:
        sock = open_listener(opts, operands[0], operands[1])
        entry = None if opts.fork_module is None else preload(opts.fork_module)
    except Fatal as e:
        if opts.verbosity:
            fail.say(PROG, "fatal", e.text)
        return fail.FATAL
    Server(opts, operands[2:], sock, entry).serve()
