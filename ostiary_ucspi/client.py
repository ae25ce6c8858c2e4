"""ostiary-client: prove a passphrase to an Ostiary server; Ostiary 4.0's ostclient, compatible.

usage: ostiary-client -a host[:port] [-p port] [-f fd | --secret-file path |
                      --secret-command cmd] [--timeout seconds]
                      [--connect [host:]port | --wait-open [host:]port]
                      [--wait seconds] [-v]
       ostiary-client TARGET [--config path] [any option above]

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
  --secret-command cmd run cmd with /bin/sh -c, standard input /dev/null, and
                       take the first line of its output as the passphrase
                       (trailing whitespace dropped), e.g. 'pass show ostiary/box'
  --timeout seconds    give up connecting to an address, or waiting for the
                       salt, after this long (default 10)
  --connect [host:]port
                       after the knock, connect to host:port, retrying with a
                       short back-off until it accepts or --wait runs out,
                       then relay standard input and output to it until both
                       sides have closed, passing on each side's half-close;
                       for an ssh ProxyCommand. host defaults to the address
                       the knock reached; an IPv6 host may be bracketed,
                       [2001:db8::1]:22, or bare, 2001:db8::1:22 (the port is
                       what follows the last colon)
  --wait-open [host:]port
                       after the knock, wait the same way until host:port
                       accepts a connection, close it and exit 0
  --wait seconds       how long --connect and --wait-open keep trying after
                       the knock (default 10)
  --config path        the file of targets (default: see below)
  -v                   print the address, the salt and the response in hex on
                       stderr (never the passphrase)
  -h, --help           print this text
  --version            print the version

Without -f, --secret-file or --secret-command the passphrase is asked for on
the controlling terminal (/dev/tty) with echo off, as ssh and ostclient do,
and read up to the newline exactly as typed; under ssh's ProxyCommand the
prompt still reaches the terminal. There is no option to give it in argv.

The client resolves the host, gets the passphrase, connects, reads the 32-byte
salt, sends HMAC-SHA256(passphrase, salt) and closes. Ostiary servers never
answer: nothing tells the client whether the passphrase was right or a
command ran. --wait-open tells only that host:port accepted a TCP connection
within --wait seconds of the knock: a port that was open already passes
whatever the passphrase, and a wrong passphrase, an action that is slow or
fails, a firewall that drops the knock's effect or a different door all look
the same (status 108). Standard output carries nothing but the relayed bytes.

Targets. ostiary-client TARGET takes the settings of stanza [TARGET] of the
first of $XDG_CONFIG_HOME/ostiary/client.conf (default ~/.config/...) and
DIR/ostiary/client.conf for each DIR of $XDG_CONFIG_DIRS (default /etc/xdg)
that exists, or of --config path; options on the command line override them,
and --connect or --wait-open without a value use its connect target. No file
is read unless a TARGET is named. The file, line by line:
  # a comment (a whole line only)
  [box]                           a stanza: letters, digits, . _ @ -
  host = box.example.org:7000     as -a
  port = 7000                     as -p
  secret-file = ~/.ostiary/box    as --secret-file (absolute, or ~/...)
  secret-command = pass show ostiary/box
  secret = the passphrase itself  only in a file nobody else can read
  connect = 22                    the target of --connect and --wait-open
  wait = 20                       as --wait
  timeout = 5                     as --timeout
A stanza holds at most one secret source and each key once. The file is
refused when it is not owned by its reader (or root), when its group or others
may write it, and, when it holds a secret inline, when they may read it.

Exit status:
  0    the response was handed to the network (that is all it means); with
       --connect, the relay ended with both sides closed or the reader of
       standard output gone; with --wait-open, the port accepted
  100  usage error, or a TARGET no file of targets holds
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
  108  knocked, but the port never opened: --connect or --wait-open found
       host:port closed for --wait seconds
  109  the relayed connection failed: reset, or an error reading standard
       input or writing the connection
  110  the secret command failed: it cannot be run, exited non-zero or on a
       signal, or printed nothing
  111  the file of targets cannot be used: unreadable, a bad line, owned by
       someone else, writable by group or others, or an inline secret
       readable by them
  130  interrupted
When every address of a name fails, the status is that of the last one tried.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import time

from . import fail
from .protocol import SALT_LEN, response

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    T = TypeVar("T")

PROG = "ostiary-client"
PROMPT = b"Enter command secret: "
DEFAULT_TIMEOUT = 10.0
DEFAULT_WAIT = 10.0
SYNOPSIS = (
    "ostiary-client -a host[:port] [-p port] [-f fd | --secret-file path"
    " | --secret-command cmd] [--timeout seconds] [--connect [host:]port"
    " | --wait-open [host:]port] [--wait seconds] [-v]"
    " | ostiary-client TARGET [--config path] [option ...]"
)
# --help prints the docstring's usage and all after it (the synopsis, without docstrings).
USAGE = (__doc__ or "usage: " + SYNOPSIS).split("usage: ", 1)[1].rstrip("\n")

EXIT_USAGE = fail.USAGE
EXIT_SECRET = 101
EXIT_RESOLVE = 102
EXIT_REFUSED = 103
EXIT_TIMEOUT = 104
EXIT_CLOSED = 105
EXIT_SEND = 106
EXIT_CONNECT = 107
EXIT_NEVER_OPENED = 108
EXIT_RELAY = 109
EXIT_COMMAND = 110
EXIT_CONFIG = fail.FATAL
EXIT_INTERRUPTED = 130
EXITS: dict[int, str] = {
    0: "the response was handed to the network (that is all it means); with --connect, "
    "the relay ended with both sides closed or the reader of standard output gone; "
    "with --wait-open, the port accepted",
    EXIT_USAGE: "usage error, or a TARGET no file of targets holds",
    EXIT_SECRET: "no passphrase: the secret file cannot be read or is readable by group or "
    "others, the descriptor cannot be read, there is no terminal to ask on, or "
    "the passphrase is empty",
    EXIT_RESOLVE: "the host name cannot be resolved",
    EXIT_REFUSED: "connection refused",
    EXIT_TIMEOUT: "timed out, connecting or waiting for the salt",
    EXIT_CLOSED: "the server closed the connection before a full salt arrived: what a server "
    "does when this address is locked out or denied by its rules, or when it "
    "is stopping",
    EXIT_SEND: "sending the response failed",
    EXIT_CONNECT: "cannot connect for another reason (network or host unreachable, ...)",
    EXIT_NEVER_OPENED: "knocked, but the port never opened: --connect or --wait-open found "
    "host:port closed for --wait seconds",
    EXIT_RELAY: "the relayed connection failed: reset, or an error reading standard input "
    "or writing the connection",
    EXIT_COMMAND: "the secret command failed: it cannot be run, exited non-zero or on a "
    "signal, or printed nothing",
    EXIT_CONFIG: "the file of targets cannot be used: unreadable, a bad line, owned by "
    "someone else, writable by group or others, or an inline secret readable "
    "by them",
    EXIT_INTERRUPTED: "interrupted",
}

WHITESPACE = b" \t\n\r\v\f"
# Command-line options: does each take a value? (OPTIONAL: only a [host:]port word.)
NONE, REQUIRED, OPTIONAL = 0, 1, 2
SHORT = {"a": REQUIRED, "p": REQUIRED, "f": REQUIRED, "v": NONE, "h": NONE}
LONG = {
    "secret-file": REQUIRED,
    "secret-command": REQUIRED,
    "timeout": REQUIRED,
    "connect": OPTIONAL,
    "wait-open": OPTIONAL,
    "wait": REQUIRED,
    "config": REQUIRED,
    "help": NONE,
    "version": NONE,
}
# client.conf's keys, each the option it stands for (an inline secret has none).
KEYS = {
    "host": "-a",
    "port": "-p",
    "secret-file": "--secret-file",
    "secret-command": "--secret-command",
    "secret": "secret",
    "connect": "--connect",
    "wait": "--wait",
    "timeout": "--timeout",
}
KEY_OF = {flag: key for key, flag in KEYS.items()}
SOURCES = ("-f", "--secret-file", "--secret-command", "secret")
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0  # pauses between tries after the knock
TRY_FIRST = 1.0  # the first try's connect limit; doubled after each time-out, up to --timeout


class Options:
    """What to do: the command line over the target's stanza over the defaults."""

    def __init__(self) -> None:
        self.host = ""
        self.port = 0
        self.numeric = False
        self.source = ""  # "", or one of SOURCES: where the passphrase comes from
        self.fd = 0
        self.secret_file = ""
        self.secret_command = ""
        self.secret = bytearray()
        self.timeout = DEFAULT_TIMEOUT
        self.wait = DEFAULT_WAIT
        self.mode = "knock"  # knock, connect or wait-open
        self.door: tuple[str | None, int, bool] | None = None  # the [host:]port to reach
        self.verbose = False


def say(text: str) -> None:
    """Write one ``ostiary-client: text`` line on stderr."""
    fail.say(PROG, "", text)


def usage(text: str) -> fail.Usage:
    """Return the Usage for ``text``: one line, the synopsis after it."""
    return fail.Usage(f"{text}; usage: {SYNOPSIS}")


def parse_port(text: str) -> int:
    """Parse a port number, 1 to 65535; raise ValueError."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r}: give a number from 1 to 65535")
    return int(text)


def parse_seconds(text: str, what: str) -> float:
    """Parse a positive, finite number of seconds; raise ValueError."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{what} takes a positive number of seconds, not {text!r}")
    return value


def split_address(text: str, what: str = "-a") -> tuple[str, int | None, bool]:
    """Split ``-a``'s value into (host, port or None, bracketed); raise ValueError.

    ``[addr]`` and ``[addr]:port`` hold a literal address; ``name:port`` has
    exactly one colon; anything with more colons is a bare IPv6 address.
    """
    bracketed = text.startswith("[")
    port: str | None = None
    if bracketed:
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ] in {what} {text}")
        host, tail = text[1:end], text[end + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"unexpected {tail!r} after ] in {what} {text}")
            port = tail[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if not host:
        raise ValueError(f"no host in {what} {text!r}")
    return host, None if port is None else parse_port(port), bracketed


def looks_like_door(word: str) -> bool:
    """Is ``word`` a value for --connect/--wait-open ([host:]port), not a TARGET?"""
    return word.isdigit() or ":" in word


def parse_door(text: str, what: str = "--connect") -> tuple[str | None, int, bool]:
    """Parse ``[host:]port`` into (host or None for the knocked one, port, bracketed).

    The port is required, so an unbracketed IPv6 host is all before the last colon.
    """
    if text.startswith("["):
        host, port, bracketed = split_address(text, what)
        if port is None:
            raise ValueError(f"no port in {what} {text}")
        return host, port, bracketed
    host, _, port_text = text.rpartition(":")
    return host or None, parse_port(port_text), False


def long_name(name: str) -> str:
    """Return the long option ``name`` abbreviates (exactly, or as getopt's unique prefix)."""
    if name in LONG:
        return name
    found = [x for x in LONG if x.startswith(name)]
    if len(found) != 1:
        raise usage(f"option --{name} {'not a unique prefix' if found else 'not recognized'}")
    return found[0]


def options(args: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Split the command line into ([(flag, value)], operands), getopt-style, options anywhere.

    --connect and --wait-open take the next word only when it is a [host:]port.
    """
    args = list(args)
    pairs: list[tuple[str, str | None]] = []
    rest: list[str] = []
    while args:
        a = args.pop(0)
        if a == "--":
            rest += args
            break
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            name = long_name(name)
            kind = LONG[name]
            if kind == NONE and eq:
                raise usage(f"option --{name} must not have an argument")
            if kind == REQUIRED and not eq:
                if not args:
                    raise usage(f"option --{name} requires argument")
                value = args.pop(0)
            if kind == OPTIONAL and not eq:
                value = args.pop(0) if args and looks_like_door(args[0]) else ""
            pairs.append(("--" + name, value if kind != NONE else None))
        elif a.startswith("-") and a != "-":
            for i, c in enumerate(a[1:], 2):
                if c not in SHORT:
                    raise usage(f"option -{c} not recognized")
                if SHORT[c] == NONE:
                    pairs.append(("-" + c, None))
                    continue
                if i < len(a):
                    pairs.append(("-" + c, a[i:]))
                elif args:
                    pairs.append(("-" + c, args.pop(0)))
                else:
                    raise usage(f"option -{c} requires argument")
                break
        else:
            rest.append(a)
    return pairs, rest


class Settings:
    """One layer of settings by option name: the command line's, or a stanza of ``path``'s."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.values: dict[str, str] = {}
        self.lines: dict[str, int] = {}  # a stanza's: the line each value is on

    def name(self, flag: str) -> str:
        """What the user wrote for ``flag``: the option, or the stanza's key."""
        return flag if self.path is None else KEY_OF[flag]

    def wrong(self, flag: str, why: str) -> fail.Failure:
        """The failure for a bad value: usage on the command line, path:line in a file."""
        if self.path is None:
            return usage(why)
        return fail.Fatal(f"{self.path}:{self.lines[flag]}: {why}", EXIT_CONFIG)

    def check(self, flag: str, parse: Callable[..., T], *args: object) -> T | None:
        """Return parse(flag's value, *args), or None when flag is not set here."""
        if flag not in self.values:
            return None
        try:
            return parse(self.values[flag], *args)
        except ValueError as e:
            raise self.wrong(flag, str(e)) from None


def parse_args(args: list[str]) -> Options:
    """Parse the command line (without the program name), reading the TARGET's stanza if named."""
    pairs, rest = options(args)
    line = Settings()
    verbose = False
    for flag, value in pairs:
        fail.standard(flag)
        if flag == "-v":
            verbose = True
            continue
        if flag in line.values:
            raise usage(f"{flag} given twice")
        line.values[flag] = value or ""
    if len(rest) > 1:
        raise usage(f"unexpected argument {rest[1]!r}")
    modes = [m for m in ("--connect", "--wait-open") if m in line.values]
    if len(modes) > 1:
        raise usage("--connect and --wait-open both say what to do after the knock: give one")
    if "--wait" in line.values and not modes:
        raise usage("--wait says how long --connect or --wait-open try: give one of them")
    if "-f" in line.values and not (line.values["-f"].isascii() and line.values["-f"].isdigit()):
        raise usage(f"-f takes a descriptor number, not {line.values['-f']!r}")
    if "--config" in line.values and not rest:
        raise usage("--config names a file of targets: name a TARGET too")
    stanza = load_target(rest[0], line.values.get("--config")) if rest else None
    layers = [line] if stanza is None else [line, stanza]
    opts = Options()
    opts.verbose = verbose
    server(opts, layers)
    passphrase_source(opts, layers)
    for flag, attr in (("--timeout", "timeout"), ("--wait", "wait")):
        value = next(
            (v for x in layers if (v := x.check(flag, parse_seconds, x.name(flag))) is not None),
            None,
        )
        if value is not None:
            setattr(opts, attr, value)
    if modes:
        mode = modes[0]
        opts.mode = mode[2:]
        if line.values[mode]:
            opts.door = line.check(mode, parse_door, mode)
        elif stanza is not None and "--connect" in stanza.values:
            opts.door = stanza.check("--connect", parse_door, "connect")
        else:
            raise usage(f"{mode} needs [host:]port here, or a TARGET whose stanza sets connect")
    return opts


def server(opts: Options, layers: list[Settings]) -> None:
    """Set the server's host and its port, each from the first layer that gives it."""
    for layer in layers:
        host = layer.check("-a", split_address, layer.name("-a"))
        port_p = layer.check("-p", parse_port)
        port_a = None if host is None else host[1]
        if port_a is not None and port_p is not None and port_a != port_p:
            raise layer.wrong(
                "-p",
                f"two different ports: {port_a} in {layer.name('-a')}, "
                f"{port_p} in {layer.name('-p')}",
            )
        if host is not None and not opts.host:
            opts.host, opts.numeric = host[0], host[2]
        port = port_a if port_a is not None else port_p
        if port is not None and not opts.port:
            opts.port = port
    if not opts.host:
        raise usage("-a host[:port] (or a TARGET) is required")
    if not opts.port:
        raise usage("no port: Ostiary has no default port, give -a host:port or -p port")


def passphrase_source(opts: Options, layers: list[Settings]) -> None:
    """Take the passphrase's source from the first layer that names one (at most one each)."""
    for layer in layers:
        given = [x for x in SOURCES if x in layer.values]
        if len(given) > 1:
            raise layer.wrong(
                given[1],
                f"{layer.name(given[0])} and {layer.name(given[1])} "
                "both name a passphrase: give one",
            )
        if given:
            opts.source = source = given[0]
            value = layer.values[source]
            if source == "-f":
                opts.fd = int(value)
            elif source == "--secret-file":
                opts.secret_file = value
            elif source == "--secret-command":
                opts.secret_command = value
            else:
                opts.secret = bytearray(value.encode())
            return


# --- the file of targets ----------------------------------------------------


# Each key's check, with the name its messages use.
CHECKS: dict[str, tuple] = {
    "-a": (split_address, "host"),
    "-p": (parse_port,),
    "--timeout": (parse_seconds, "timeout"),
    "--wait": (parse_seconds, "wait"),
    "--connect": (parse_door, "connect"),
}


def config_paths() -> list[str]:
    """Where a file of targets may be, most important first (XDG base directories)."""
    home = os.environ.get("XDG_CONFIG_HOME", "")
    if not home.startswith("/"):
        home = os.path.join(os.path.expanduser("~"), ".config")
    dirs = [d for d in os.environ.get("XDG_CONFIG_DIRS", "").split(":") if d.startswith("/")]
    return [os.path.join(d, "ostiary", "client.conf") for d in [home, *(dirs or ["/etc/xdg"])]]


def load_target(name: str, path: str | None) -> Settings:
    """Return the settings of stanza [name] of the file of targets; refuse an unsafe file."""
    if path is None:
        found = [p for p in config_paths() if os.path.lexists(p)]
        if not found:
            raise usage(f"no target {name!r}: there is no {config_paths()[0]}")
        path = found[0]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise fail.Fatal(f"unable to open {path}: {e.strerror}", EXIT_CONFIG) from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise fail.Fatal(f"refusing {path}: not a regular file", EXIT_CONFIG)
        if st.st_uid not in (os.geteuid(), 0):
            raise fail.Fatal(
                f"refusing {path}: it belongs to uid {st.st_uid}, neither you nor root", EXIT_CONFIG
            )
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise fail.Fatal(
                f"refusing {path}: its group or others may write it (mode "
                f"{mode:04o}); chmod go-w it",
                EXIT_CONFIG,
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            text = f.read()
    except OSError as e:
        raise fail.Fatal(f"unable to read {path}: {e.strerror}", EXIT_CONFIG) from None
    finally:
        os.close(fd)
    stanzas = parse_config(path, text)
    if mode & (stat.S_IRGRP | stat.S_IROTH) and any("secret" in x.values for x in stanzas.values()):
        raise fail.Fatal(
            f"refusing {path}: it holds a secret inline and its group or others "
            f"may read it (mode {mode:04o}); chmod 600 it",
            EXIT_CONFIG,
        )
    if name not in stanzas:
        raise usage(f"no target {name!r}: {path} has no [{name}] stanza")
    return stanzas[name]


def parse_config(path: str, text: bytes) -> dict[str, Settings]:
    """Parse a file of targets into {name: settings}, checking every value (errors: path:line)."""
    stanzas: dict[str, Settings] = {}
    current: Settings | None = None
    number = 0

    def bad(why: str) -> fail.Fatal:
        return fail.Fatal(f"{path}:{number}: {why}", EXIT_CONFIG)

    for number, raw in enumerate(text.split(b"\n"), 1):
        try:
            line = raw.decode().strip()
        except UnicodeDecodeError:
            raise bad("not UTF-8") from None
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            name = line[1:-1] if line.endswith("]") else ""
            if not name or not set(name) <= NAME_CHARS or name.isdigit():
                raise bad(
                    f"bad stanza line {line!r}: give [name], a name of letters, digits, "
                    ". _ @ - (not digits alone)"
                )
            if name in stanzas:
                raise bad(f"a second [{name}] stanza")
            current = stanzas[name] = Settings(path)
            continue
        key, eq, value = (x.strip() for x in line.partition("="))
        if not eq:
            raise bad(f"expected key = value or [name], not {line!r}")
        if current is None:
            raise bad(f"{key} before any [name] stanza")
        if key not in KEYS:
            raise bad(f"unknown key {key!r}: the keys are {', '.join(KEYS)}")
        flag = KEYS[key]
        if flag in current.values:
            raise bad(f"{key} given twice in this stanza")
        if not value:
            raise bad(f"{key} is empty")
        if key == "secret-file":
            value = os.path.expanduser(value)
            if not value.startswith("/"):
                raise bad("secret-file must be an absolute path or start with ~/")
        current.values[flag], current.lines[flag] = value, number
        given = [KEY_OF[x] for x in SOURCES if x in current.values]
        if len(given) > 1:
            raise bad(f"{given[0]} and {given[1]} both name a passphrase: give one")
        if flag in CHECKS:
            parse, *what = CHECKS[flag]
            current.check(flag, parse, *what)
    return stanzas


# --- the passphrase ---------------------------------------------------------


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
        raise fail.Fatal(
            f"unable to read the passphrase from descriptor {fd}: {e.strerror}", EXIT_SECRET
        ) from None
    strip_trailing(secret)
    return secret


def from_file(path: str) -> bytearray:
    """Return the passphrase in ``path``, refusing a file others can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except OSError as e:
        raise fail.Fatal(f"unable to open {path}: {e.strerror}", EXIT_SECRET) from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            raise fail.Fatal(
                f"refusing {path}: it is readable by its group or by others "
                f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it",
                EXIT_SECRET,
            )
        secret = read_line(fd)
    except OSError as e:
        raise fail.Fatal(f"unable to read {path}: {e.strerror}", EXIT_SECRET) from None
    finally:
        os.close(fd)
    strip_trailing(secret)
    return secret


def from_command(command: str) -> bytearray:
    """Run ``sh -c command`` (stdin /dev/null); return its first line of output, stripped.

    The rest of its output is read and dropped, so it never dies of a broken pipe.
    """
    import subprocess

    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
    except OSError as e:
        raise fail.Fatal(
            f"unable to run the secret command {command!r}: {e.strerror}", EXIT_COMMAND
        ) from None
    line, chunk = bytearray(), bytearray(4096)
    printed = complete = False
    assert proc.stdout is not None
    with proc.stdout:
        while (n := os.readv(proc.stdout.fileno(), [chunk])) > 0:
            printed = True
            if not complete:
                end = chunk.find(b"\n", 0, n)
                complete = end >= 0
                line.extend(memoryview(chunk)[: end if complete else n])
        chunk[:] = bytes(len(chunk))
    status = proc.wait()
    if status or not printed:
        line[:] = bytes(len(line))
        why = (
            f"was killed by signal {-status}"
            if status < 0
            else f"exited with status {status}"
            if status
            else "printed nothing"
        )
        raise fail.Fatal(f"the secret command {command!r} {why}", EXIT_COMMAND)
    strip_trailing(line)
    return line


def from_terminal() -> bytearray:
    """Ask for the passphrase on /dev/tty with echo off; return it as typed."""
    import termios

    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        raise fail.Fatal(
            f"no terminal to ask for the passphrase ({e.strerror}): use -f fd, "
            "--secret-file path or --secret-command cmd",
            EXIT_SECRET,
        ) from None
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
        raise fail.Fatal(
            f"unable to read the passphrase from the terminal: {e.args[-1]}", EXIT_SECRET
        ) from None
    finally:
        os.close(fd)


def get_passphrase(opts: Options) -> bytearray:
    """Return the passphrase from its source, else the terminal; refuse an empty one."""
    if opts.source == "-f":
        secret = from_fd(opts.fd)
    elif opts.source == "--secret-file":
        secret = from_file(opts.secret_file)
    elif opts.source == "--secret-command":
        secret = from_command(opts.secret_command)
    elif opts.source == "secret":
        secret = opts.secret
    else:
        secret = from_terminal()
    if not secret:
        raise fail.Fatal("empty passphrase", EXIT_SECRET)
    return secret


# --- the network ------------------------------------------------------------


def resolve(host: str, port: int, numeric: bool) -> list[tuple]:
    """Return getaddrinfo's TCP addresses for host, in its order."""
    flags = socket.AI_NUMERICHOST if numeric else 0
    try:
        return socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as e:
        if numeric:
            raise fail.Fatal(
                f"[{host}] is not an IP address: brackets hold a numeric address, as in [::1]:7050",
                EXIT_RESOLVE,
            ) from None
        raise fail.Fatal(f"unable to resolve {host}: {e.strerror}", EXIT_RESOLVE) from None
    except UnicodeError:
        raise fail.Fatal(f"unable to resolve {host}: not a valid host name", EXIT_RESOLVE) from None


def where(ip: str, port: int) -> str:
    """Name an address and port for messages."""
    return f"{ip} port {port}"


def connect(opts: Options, addresses: list[tuple]) -> socket.socket:
    """Connect to the first address that accepts; return the socket.

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
            return sock
        except TimeoutError:
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
    raise fail.Fatal(f"unable to connect to {where(opts.host, opts.port)}: {reason}", code)


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
    except TimeoutError:
        raise fail.Fatal(
            f"timed out after {timeout:g} seconds waiting for the salt from "
            f"{peer}: got {got} of {SALT_LEN} bytes",
            EXIT_TIMEOUT,
        ) from None
    except OSError as e:
        why = f" ({e.strerror})"
    if got < SALT_LEN:
        raise fail.Fatal(
            f"{peer} closed the connection after {got} of {SALT_LEN} salt "
            f"bytes{why}: that is what a server does when this address is locked "
            "out or denied by its rules, or when it is stopping",
            EXIT_CLOSED,
        )
    return bytes(salt)


def knock(opts: Options, addresses: list[tuple], secret: bytearray) -> tuple:
    """Connect, read the salt, send HMAC-SHA256(secret, salt), close; return the peer's address."""
    sock = connect(opts, addresses)
    with sock:
        peer_addr = sock.getpeername()
        peer = where(peer_addr[0], peer_addr[1])
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
        except TimeoutError:
            raise fail.Fatal(
                f"unable to send the response to {peer}: timed out", EXIT_SEND
            ) from None
        except OSError as e:
            raise fail.Fatal(
                f"unable to send the response to {peer}: {e.strerror}", EXIT_SEND
            ) from None
    if opts.verbose:
        say("info: response sent; Ostiary servers never say whether it was accepted")
    return peer_addr


def door_addresses(opts: Options, knocked: tuple | None) -> list[tuple]:
    """The addresses to reach after the knock: the knocked address at the door's port,
    unless the door names another host (resolved before the knock: ``knocked`` is None)."""
    assert opts.door is not None
    host, port, numeric = opts.door
    if host is None or host == opts.host:
        if knocked is None:
            return []
        family = socket.AF_INET6 if len(knocked) == 4 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 0, "", (knocked[0], port, *knocked[2:]))]
    return resolve(host, port, numeric)


def reach(opts: Options, addresses: list[tuple]) -> socket.socket:
    """Try the addresses in turn, with a growing pause between rounds, until one accepts
    or --wait seconds pass; return the connected socket."""
    deadline = time.monotonic() + opts.wait
    pause, limit, last = BACKOFF_FIRST, min(TRY_FIRST, opts.timeout), ""
    name = where(addresses[0][4][0], addresses[0][4][1])
    while True:
        timed_out = False
        for family, kind, proto, _, addr in addresses:
            sock = socket.socket(family, kind, proto)
            sock.settimeout(max(min(deadline - time.monotonic(), limit), 0.001))
            try:
                sock.connect(addr)
                if opts.verbose:
                    say(f"info: {where(addr[0], addr[1])} is open")
                return sock
            except TimeoutError:
                timed_out, last = True, "timed out"
            except OSError as e:
                last = e.strerror or str(e)
            sock.close()
        if timed_out:
            limit = min(limit * 2, opts.timeout)
        left = deadline - time.monotonic()
        if left <= 0:
            raise fail.Fatal(
                f"knocked, but {name} did not open within {opts.wait:g} seconds "
                f"(last try: {last}); a wrong passphrase, a slow or failing "
                "action and a door that opens elsewhere all look like this",
                EXIT_NEVER_OPENED,
            )
        time.sleep(min(pause, left))
        pause = min(pause * 2, BACKOFF_MAX)


def relay(sock: socket.socket) -> None:
    """Copy stdin to ``sock`` and ``sock`` to stdout until both directions have ended.

    Each end-of-file is passed on as a half-close: stdin's as shutdown(SHUT_WR),
    the socket's by closing stdout. Standard input and output stay blocking
    (others may share them); nothing is read before the last read is written,
    and stdout gets at most PIPE_BUF bytes after each POLLOUT, so no write blocks
    for long. A reader of stdout that has gone away ends the relay quietly.
    """
    import errno
    import select

    sock.setblocking(False)
    s = sock.fileno()
    up, down = bytearray(), bytearray()  # stdin -> socket, socket -> stdout
    up_eof = down_eof = up_done = down_done = False
    ready = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL
    while not (up_done and down_done):
        want: dict[int, int] = {}
        if not up_done:
            if up:
                want[s] = select.POLLOUT
            else:
                want[0] = select.POLLIN
        if not down_done:
            if down:
                want[1] = select.POLLOUT
            else:
                want[s] = want.get(s, 0) | select.POLLIN
        poll = select.poll()
        for fd, events in want.items():
            poll.register(fd, events)
        events = dict(poll.poll())
        try:
            if events.get(0, 0) & ready:
                data = os.read(0, 65536)
                up_eof, up[:] = not data, data
        except OSError as e:
            raise fail.Fatal(f"unable to read standard input: {e.strerror}", EXIT_RELAY) from None
        try:
            if s in events and not down and not down_done:
                try:
                    data = sock.recv(65536)
                    down_eof, down[:] = not data, data
                except BlockingIOError:
                    pass
            if s in events and up:
                try:
                    del up[: sock.send(up)]
                except BlockingIOError:
                    pass
        except OSError as e:
            if not (down_eof and e.errno in (errno.EPIPE, errno.ECONNRESET)):
                raise fail.Fatal(
                    f"the relayed connection failed: {e.strerror}", EXIT_RELAY
                ) from None
            up_eof, up_done = True, True  # the far end has closed both ways: nothing to send to
            up.clear()
        if events.get(1, 0):
            try:
                del down[: os.write(1, down[: select.PIPE_BUF])]
            except OSError as e:
                if e.errno == errno.EPIPE:
                    return
                raise fail.Fatal(
                    f"unable to write standard output: {e.strerror}", EXIT_RELAY
                ) from None
        if up_eof and not up and not up_done:
            up_done = True
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # the far end is gone already: its end of file will say so
                pass
        if down_eof and not down and not down_done:
            down_done = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


# --- the program ------------------------------------------------------------


def run(args: list[str]) -> int:
    """Do what the command line says; raise fail's exceptions on any error."""
    opts = parse_args(args)
    addresses = resolve(opts.host, opts.port, opts.numeric)
    doors = door_addresses(opts, None) if opts.door else []
    secret = get_passphrase(opts)
    try:
        knocked = knock(opts, addresses, secret)
    finally:
        secret[:] = bytes(len(secret))
    if opts.mode == "knock":
        return 0
    sock = reach(opts, doors or door_addresses(opts, knocked))
    with sock:
        if opts.mode == "connect":
            relay(sock)
    return 0


def body(argv: list[str]) -> int:
    """The program, ^C included."""
    try:
        return run(argv[1:])
    except KeyboardInterrupt:
        raise fail.Fatal("interrupted", EXIT_INTERRUPTED) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` includes the program name, as sys.argv does."""
    return fail.run(PROG, USAGE, body, sys.argv if argv is None else argv)
