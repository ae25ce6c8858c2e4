"""ostiary-client: prove a passphrase to an Ostiary server; Ostiary 4.0's ostclient, compatible.

usage: ostiary-client -a host[:port] [-p port] [-f fd | --secret-file path]
                      [--timeout seconds] [-v]

  -a host[:port]       the server: a host name, an IPv4 address, or an IPv6
                       address ([::1]:7050, or -a ::1 -p 7050); every address
                       a name has is tried in turn
  -p port              the server's port; Ostiary has no default port, so it
                       must be given here or in -a
  -f fd                read the passphrase from descriptor fd, up to the first
                       newline, trailing whitespace dropped (for scripts:
                       -f 3 3<file, or -f 0 for standard input)
  --secret-file path   read the passphrase the same way from path, which must
                       not be readable by its group or by others
  --timeout seconds    give up connecting to an address, or waiting for the
                       salt, after this long (default 10)
  -v                   print the address, the salt and the response in hex on
                       stderr (never the passphrase)
  -h, --help           print this text

Without -f or --secret-file the passphrase is asked for on the controlling
terminal (/dev/tty) with echo off, as ssh and ostclient do, and read up to the
newline exactly as typed. There is no option to give it in argv.

The client resolves the host, gets the passphrase, connects, reads the 32-byte
salt, sends HMAC-SHA256(passphrase, salt) and closes. Ostiary servers never
answer: nothing tells the client whether the passphrase was right or a
command ran.

Exit status:
  0    the response was handed to the network; that is all it means
  100  usage error
  101  no passphrase: the secret file cannot be read or is readable by group
       or others, the descriptor cannot be read, there is no terminal to ask
       on, or the passphrase is empty
  102  the host name cannot be resolved
  103  connection refused
  104  timed out, connecting or waiting for the salt
  105  the server closed the connection before a full salt arrived: what a
       server does when this address is locked out or denied by its rules,
       or when it is stopping
  106  sending the response failed
  107  cannot connect for another reason (network or host unreachable, ...)
  130  interrupted
When every address of a name fails, the status is that of the last one tried.
"""
from __future__ import annotations

import os
import socket
import stat
import sys
import time

from .protocol import SALT_LEN, response

PROMPT = b"Enter command secret: "
DEFAULT_TIMEOUT = 10.0
USAGE = ("usage: ostiary-client -a host[:port] [-p port] [-f fd | --secret-file path]"
         " [--timeout seconds] [-v]")

EXIT_USAGE = 100
EXIT_SECRET = 101
EXIT_RESOLVE = 102
EXIT_REFUSED = 103
EXIT_TIMEOUT = 104
EXIT_CLOSED = 105
EXIT_SEND = 106
EXIT_CONNECT = 107
EXIT_INTERRUPTED = 130

WHITESPACE = b" \t\n\r\v\f"


class Failure(Exception):
    """A fatal error: print ``text`` and exit with ``code``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Options:
    """The parsed command line."""

    def __init__(self) -> None:
        self.host = ""
        self.port = 0
        self.numeric = False
        self.fd: int | None = None
        self.secret_file: str | None = None
        self.timeout = DEFAULT_TIMEOUT
        self.verbose = False
        self.help = False


def say(text: str) -> None:
    """Write one ``ostiary-client: text`` line on stderr."""
    sys.stderr.write(f"ostiary-client: {text}\n")
    sys.stderr.flush()


def usage(text: str) -> Failure:
    """Return the usage Failure for ``text``."""
    return Failure(EXIT_USAGE, f"{text}; {USAGE}")


def parse_port(text: str) -> int:
    """Parse a port number, 1 to 65535."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise usage(f"bad port {text!r}: give a number from 1 to 65535")
    return int(text)


def split_address(text: str) -> tuple[str, int | None, bool]:
    """Split ``-a``'s value into (host, port or None, bracketed).

    ``[addr]`` and ``[addr]:port`` hold a literal address; ``name:port`` has
    exactly one colon; anything with more colons is a bare IPv6 address.
    """
    bracketed = text.startswith("[")
    port: str | None = None
    if bracketed:
        end = text.find("]")
        if end < 0:
            raise usage(f"missing ] in -a {text}")
        host, tail = text[1:end], text[end + 1:]
        if tail:
            if not tail.startswith(":"):
                raise usage(f"unexpected {tail!r} after ] in -a {text}")
            port = tail[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if not host:
        raise usage(f"no host in -a {text!r}")
    return host, None if port is None else parse_port(port), bracketed


def parse_args(args: list[str]) -> Options:
    """Parse the command line (without the program name)."""
    import getopt

    try:
        pairs, rest = getopt.getopt(args, "a:p:f:vh", ["secret-file=", "timeout=", "help"])
    except getopt.GetoptError as e:
        raise usage(e.msg) from None
    if rest:
        raise usage(f"unexpected argument {rest[0]!r}")
    opts = Options()
    seen: set[str] = set()
    port_a: int | None = None
    port_p: int | None = None
    for flag, value in pairs:
        if flag == "-v":
            opts.verbose = True
            continue
        if flag in ("-h", "--help"):
            opts.help = True
            continue
        if flag in seen:
            raise usage(f"{flag} given twice")
        seen.add(flag)
        if flag == "-a":
            opts.host, port_a, opts.numeric = split_address(value)
        elif flag == "-p":
            port_p = parse_port(value)
        elif flag == "-f":
            if not (value.isascii() and value.isdigit()):
                raise usage(f"-f takes a descriptor number, not {value!r}")
            opts.fd = int(value)
        elif flag == "--secret-file":
            opts.secret_file = value
        else:
            try:
                opts.timeout = float(value)
            except ValueError:
                opts.timeout = 0.0
            if not 0 < opts.timeout < float("inf"):
                raise usage(f"--timeout takes a positive number of seconds, not {value!r}")
    if opts.help:
        return opts
    if not opts.host:
        raise usage("-a host[:port] is required")
    if port_a is not None and port_p is not None and port_a != port_p:
        raise usage(f"two different ports: {port_a} in -a, {port_p} in -p")
    port = port_a if port_a is not None else port_p
    if port is None:
        raise usage("no port: Ostiary has no default port, give -a host:port or -p port")
    opts.port = port
    if opts.fd is not None and opts.secret_file is not None:
        raise usage("-f and --secret-file both name a passphrase: give one")
    return opts


def resolve(host: str, port: int, numeric: bool) -> list[tuple]:
    """Return getaddrinfo's TCP addresses for host, in its order."""
    flags = socket.AI_NUMERICHOST if numeric else 0
    try:
        return socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as e:
        if numeric:
            raise Failure(EXIT_RESOLVE, f"[{host}] is not an IP address: brackets in -a hold "
                                        "a numeric address, as in [::1]:7050") from None
        raise Failure(EXIT_RESOLVE, f"unable to resolve {host}: {e.strerror}") from None
    except UnicodeError:
        raise Failure(EXIT_RESOLVE, f"unable to resolve {host}: not a valid host name") from None


def read_line(fd: int) -> bytearray:
    """Read fd a byte at a time up to the first newline or end of file; drop the newline.

    Reading no further than the newline leaves the rest of a shared descriptor
    to whoever reads it next, as the shell's ``read`` does.
    """
    line = bytearray()
    byte = bytearray(1)
    while os.readv(fd, [byte]) == 1 and byte != b"\n":
        line += byte
    byte[0] = 0
    return line


def strip_trailing(secret: bytearray) -> None:
    """Drop trailing whitespace (CR included) in place, as ostclient does for -f."""
    while secret and secret[-1] in WHITESPACE:
        del secret[-1]


def from_fd(fd: int) -> bytearray:
    """Return the passphrase read from descriptor ``fd``."""
    try:
        secret = read_line(fd)
    except OSError as e:
        raise Failure(EXIT_SECRET, f"unable to read the passphrase from descriptor {fd}: "
                                   f"{e.strerror}") from None
    strip_trailing(secret)
    return secret


def from_file(path: str) -> bytearray:
    """Return the passphrase in ``path``, refusing a file others can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except OSError as e:
        raise Failure(EXIT_SECRET, f"unable to open {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            raise Failure(EXIT_SECRET, f"refusing {path}: it is readable by its group or by "
                                       f"others (mode {stat.S_IMODE(mode):04o}); chmod 600 it")
        secret = read_line(fd)
    except OSError as e:
        raise Failure(EXIT_SECRET, f"unable to read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    strip_trailing(secret)
    return secret


def from_terminal() -> bytearray:
    """Ask for the passphrase on /dev/tty with echo off; return it as typed."""
    import termios

    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        raise Failure(EXIT_SECRET, f"no terminal to ask for the passphrase ({e.strerror}): "
                                   "use -f fd or --secret-file path") from None
    try:
        saved = termios.tcgetattr(fd)
        quiet = termios.tcgetattr(fd)
        quiet[3] &= ~(termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL)
        termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
        try:
            os.write(fd, PROMPT)
            return read_line(fd)
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
            os.write(fd, b"\n")
    except (OSError, termios.error) as e:
        raise Failure(EXIT_SECRET, f"unable to read the passphrase from the terminal: "
                                   f"{e.args[-1]}") from None
    finally:
        os.close(fd)


def get_passphrase(opts: Options) -> bytearray:
    """Return the passphrase from -f, --secret-file or the terminal; refuse an empty one."""
    if opts.fd is not None:
        secret = from_fd(opts.fd)
    elif opts.secret_file is not None:
        secret = from_file(opts.secret_file)
    else:
        secret = from_terminal()
    if not secret:
        raise Failure(EXIT_SECRET, "empty passphrase")
    return secret


def where(ip: str, port: int) -> str:
    """Name an address and port for messages."""
    return f"{ip} port {port}"


def connect(opts: Options, addresses: list[tuple]) -> tuple[socket.socket, str]:
    """Connect to the first address that accepts; return the socket and the peer's name.

    When every address fails, the status is that of the last one tried.
    """
    code, errors = EXIT_CONNECT, []
    for family, kind, proto, _, addr in addresses:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            code = EXIT_CONNECT
            errors.append((addr[0], e.strerror))
            continue
        sock.settimeout(opts.timeout)
        try:
            sock.connect(addr)
            return sock, where(addr[0], addr[1])
        except socket.timeout:
            code = EXIT_TIMEOUT
            errors.append((addr[0], f"timed out after {opts.timeout:g} seconds"))
        except ConnectionRefusedError:
            code = EXIT_REFUSED
            errors.append((addr[0], "connection refused"))
        except OSError as e:
            code = EXIT_CONNECT
            errors.append((addr[0], e.strerror))
        sock.close()
    if len(errors) == 1 and errors[0][0] == opts.host:
        reason = errors[0][1]
    else:
        reason = "; ".join(f"{ip}: {why}" for ip, why in errors)
    raise Failure(code, f"unable to connect to {where(opts.host, opts.port)}: {reason}")


def read_salt(sock: socket.socket, timeout: float, peer: str) -> bytes:
    """Read the 32-byte salt, allowing ``timeout`` seconds for all of it."""
    salt = bytearray(SALT_LEN)
    view = memoryview(salt)
    got, why = 0, ""
    deadline = time.monotonic() + timeout
    try:
        while got < SALT_LEN:
            # A spent deadline still gets a last, instant try, then times out.
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            n = sock.recv_into(view[got:])
            if n == 0:
                break
            got += n
    except socket.timeout:
        raise Failure(EXIT_TIMEOUT, f"timed out after {timeout:g} seconds waiting for the salt "
                                    f"from {peer}: got {got} of {SALT_LEN} bytes") from None
    except OSError as e:
        why = f" ({e.strerror})"
    if got < SALT_LEN:
        raise Failure(EXIT_CLOSED, f"{peer} closed the connection after {got} of {SALT_LEN} salt "
                                   f"bytes{why}: that is what a server does when this address "
                                   "is locked out or denied by its rules, or when it is stopping")
    return bytes(salt)


def knock(opts: Options, addresses: list[tuple], secret: bytearray) -> None:
    """Connect, read the salt, send HMAC-SHA256(secret, salt), close."""
    sock, peer = connect(opts, addresses)
    with sock:
        if opts.verbose:
            say(f"info: connected to {peer}")
        salt = read_salt(sock, opts.timeout, peer)
        answer = response(secret, salt)
        if opts.verbose:
            say(f"info: salt {salt.hex()}")
            say(f"info: response {answer.hex()}")
        try:
            sock.settimeout(opts.timeout)
            sock.sendall(answer)
        except socket.timeout:
            raise Failure(EXIT_SEND, f"unable to send the response to {peer}: timed out") from None
        except OSError as e:
            raise Failure(EXIT_SEND, f"unable to send the response to {peer}: "
                                     f"{e.strerror}") from None
    if opts.verbose:
        say("info: response sent; Ostiary servers never say whether it was accepted")


def run(args: list[str]) -> int:
    """Do what the command line says; raise Failure on any error."""
    opts = parse_args(args)
    if opts.help:
        sys.stdout.write(__doc__ or "")
        return 0
    addresses = resolve(opts.host, opts.port, opts.numeric)
    secret = get_passphrase(opts)
    try:
        knock(opts, addresses, secret)
    finally:
        secret[:] = bytes(len(secret))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` includes the program name, as sys.argv does."""
    args = (sys.argv if argv is None else argv)[1:]
    try:
        return run(args)
    except Failure as f:
        say(f"fatal: {f.text}")
        return f.code
    except KeyboardInterrupt:
        say("fatal: interrupted")
        return EXIT_INTERRUPTED
