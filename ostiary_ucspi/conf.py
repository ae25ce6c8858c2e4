"""ostiary-conf: create a daemontools service directory for ostiary-handle.

Usage: ``ostiary-conf ACCOUNT LOGACCOUNT DIR [CONFIG] [IP] [PORT]``, as root,
in the tradition of dnscache-conf. Defaults: CONFIG /etc/ostiary.cfg, IP 0
(every IPv4 address of the host), PORT 7050. DIR must not exist yet; make it
outside /service, then ``ln -s DIR /service``. It holds:

``run``, ``log/run``     the same scripts as the project's service/ostiary
``env/``                 IP PORT CONFIG CONCURRENCY RULES ACCOUNT PATH, for envdir
``log/main/``            multilog's directory, owned by LOGACCOUNT
``tcprules/``            rules file ``ostiary``, its ``Makefile``, ``ostiary.cdb``
``state/``               for the lockout store, owned by ACCOUNT, mode 700

CONFIG is left alone if it exists; otherwise a skeleton with random
passphrases is written there (owned by ACCOUNT, mode 600, LOCKOUT_DB in
``DIR/state``). ACCOUNT is who ostiary-handle runs as: ``root`` when actions
must run as root (firewall scripts); then each action runs as its own uid/gid.
For any other account DIR is made group-writable by the account's group
(sticky, so the account can add ``down`` but not touch another file) and
``supervise/control`` is the account's, so that KILL can take the service down.

Exit status: 0 created, 100 usage error, 111 anything else (DIR exists, no
such account, cannot create a file). A failure can leave DIR half made: remove
it and run again.
"""
from __future__ import annotations

import os
import pwd
import secrets
import sys
import sysconfig

PROG = "ostiary-conf"
USAGE = f"usage: {PROG} ACCOUNT LOGACCOUNT DIR [CONFIG] [IP] [PORT]"
DEFAULT_CONFIG = "/etc/ostiary.cfg"
DEFAULT_IP = "0"
DEFAULT_PORT = "7050"
DEFAULT_CONCURRENCY = "10"
SHIPPED_LOGACCOUNT = "ostiarylog"  # what the project's service/ostiary/log/run names

RUN = """\
#!/bin/sh
# ostiary under daemontools (or runit): tcpserver listens, and runs
# ostiary-handle once per connection. Settings: one file each in ./env, the
# first line is the value (see the comments in each file).
exec 2>&1
exec envdir ./env sh -c '
fatal() {
  echo "run: fatal: $*: not serving (next try in 5 seconds)"
  sleep 5
  exit 111
}
[ -n "${IP:-}" ] || fatal "env/IP is missing or empty"
[ -n "${PORT:-}" ] || fatal "env/PORT is missing or empty"
[ -n "${CONFIG:-}" ] || fatal "env/CONFIG is missing or empty"
[ -n "${CONCURRENCY:-}" ] || fatal "env/CONCURRENCY is missing or empty"
ACCOUNT=${ACCOUNT:-root}
# For KILL: ostiary-handle creates $OSTIARY_SERVICE/down and tells supervise to stop.
OSTIARY_SERVICE=$PWD
export OSTIARY_SERVICE

if [ "$ACCOUNT" = root ]; then set --; else set -- setuidgid "$ACCOUNT"; fi
"$@" ostiary-handle --check -c "$CONFIG" || fatal "$CONFIG does not pass ostiary-handle --check"

if command -v tcpserver >/dev/null; then server=tcpserver; else server=ostiary-tcpserver; fi
set -- "$server" -v -HRl0 -c "$CONCURRENCY"
if [ -n "${RULES:-}" ]; then set -- "$@" -x "$RULES"; fi
if [ "$ACCOUNT" != root ]; then set -- envuidgid "$ACCOUNT" "$@" -U; fi
exec "$@" "$IP" "$PORT" ostiary-handle -c "$CONFIG"
'
"""

LOG_RUN = """\
#!/bin/sh
# ostiary's log: multilog stamps each line (TAI64N; read with tai64nlocal)
# and keeps ./main/current plus up to 19 old files of 1 MB each.
# It runs as the log account, the owner of ./main, when that account exists.
account={logaccount}
if id "$account" >/dev/null 2>&1; then
  exec setuidgid "$account" multilog t s1000000 n20 ./main
fi
exec multilog t s1000000 n20 ./main
"""

ENV = {
    "IP": """\
{ip}
# IP: the address tcpserver listens on. 0 means every IPv4 address of this
# host, which a knock port needs: it must be reachable from wherever you knock
# (127.0.0.1 would only serve this machine). Put one address here to listen
# on one interface only, e.g. the public one.
""",
    "PORT": """\
{port}
# PORT: the TCP port to listen on. Ostiary has no standard port; 7050 is this
# project's example. ostiary-client needs it: ostiary-client -a host:PORT
""",
    "CONFIG": """\
{config}
# CONFIG: the absolute path of ostiary.cfg (mode 600: it holds the passphrases).
# Checked with ostiary-handle --check before tcpserver starts; read again by
# ostiary-handle for every connection, so edits take effect at once.
""",
    "CONCURRENCY": """\
{concurrency}
# CONCURRENCY: at most this many connections are handled at once (tcpserver
# -c). Each handler stays DELAY seconds (ostiary.cfg) after its exchange, so
# at most CONCURRENCY/DELAY knocks a second get an answer; the rest wait.
""",
    "RULES": """\
{rules}
# RULES: a tcprules CDB for tcpserver -x; an empty first line means none.
# Denied addresses are dropped before ostiary-handle runs. ostiary-conf keeps
# the rules in tcprules/ here: edit tcprules/ostiary, then run make there;
# tcpserver reads the new CDB at the next connection.
""",
    "ACCOUNT": """\
{account}
# ACCOUNT: the account ostiary-handle runs as. root lets actions run as root
# (firewall scripts), each action as its own uid/gid (DEFAULT_UID, else
# nobody). Another account needs CONFIG and the LOCKOUT_DB directory as its
# own, write access to this directory (for down), and supervise/control as its
# own (for svc -d): ostiary-conf sets that up.
""",
    "PATH": """\
{path}
# PATH: where run, tcpserver and ostiary-handle find their programs
# (ostiary-handle, tcpserver, envdir, setuidgid, envuidgid, svc).
""",
}

# The same files as the project's tcprules/ (tests check that they agree).
RULES_FILE = """\
# tcpserver rules for the Ostiary knock port.
#
# Compile with `make` in this directory (or by hand:
#   tcprules ostiary.cdb ostiary.tmp < ostiary
# ostiary-tcprules takes the same arguments), then run
#   tcpserver -x /etc/tcp/ostiary.cdb ...
# Format: tcprules(1). One rule a line, no spaces: ADDRESS:allow or ADDRESS:deny,
# optionally followed by ,VAR="value" items. Lines starting with # are comments.
#
# tcpserver picks ONE rule per connection, the most specific that exists, in
# this order: ident@ip, ident@=host, the exact ip, =host, ip prefixes ending in
# a dot (longest first), =.domain suffixes, =, and last the empty address.
# The order of the lines below does not matter, except that when the same
# address appears twice, the first line wins.

# The machine itself, for tests and for local scripts.
127.0.0.1:allow
127.:allow

# A network the admin works from (192.0.2.0/24 is a documentation range:
# replace it with your own office or VPN addresses).
192.0.2.:allow

# A network that has no business knocking (198.51.100.0/24 is a
# documentation range too). tcpserver drops these connections before
# ostiary-handle even starts, so they cost nothing and never reach the lockout.
198.51.100.:deny

# Ranges expand to one rule per address: 203.0.113.10 to 203.0.113.20.
203.0.113.10-20:deny

# Default: allow.
# A knock port exists so that the admin can open the door from wherever they
# happen to be: a hotel, a phone, a friend's network. Their address is not
# known in advance, so denying by default would lock the admin out exactly when
# the knock is needed. The passphrase (HMAC challenge/response) is the real
# gate, and the lockout stops guessing; these rules only shed known-bad
# networks early. If every client comes from fixed addresses, deny by default
# instead: list those addresses above with :allow, and replace the line below
# with
#   :deny
:allow
"""

MAKEFILE = """\
# Rebuilds ostiary.cdb from the rules in ostiary, only when they changed:
#   make            compile with tcprules if installed, else ostiary-tcprules
#   make TCPRULES=ostiary-tcprules    choose the compiler
#   make clean      remove ostiary.cdb (tcpserver -x then drops every connection)
# Both compilers write the same bytes and replace ostiary.cdb atomically.

.POSIX:

all: ostiary.cdb

ostiary.cdb: ostiary
\t@tcprules='$(TCPRULES)'; \\
\tif [ -z "$$tcprules" ]; then \\
\t\ttcprules=`command -v tcprules || echo ostiary-tcprules`; \\
\tfi; \\
\techo "$$tcprules ostiary.cdb ostiary.tmp < ostiary"; \\
\t"$$tcprules" ostiary.cdb ostiary.tmp < ostiary

clean:
\trm -f ostiary.cdb ostiary.tmp
"""

SKELETON = """\
# {config}: written by ostiary-conf for {dir}.
# Keep it mode 600 and owned by {account}: it holds the passphrases.
# The two passphrases below are random and known to nobody: replace them, and
# the ACTION's command, with your own. Format: examples/ostiary.cfg.
# After every edit: ostiary-handle --check -c {config}

# Proving KILL takes the service down until the operator revives it.
KILL="{kill}"

# ACTION="passphrase","/absolute/command"[,uid[,gid]]: runs COMMAND ADDRESS.
# /bin/echo only writes the knocking address to the log.
ACTION="{action}","/bin/echo"

MIN_LOGLEVEL=LOG_INFO
LOCKOUT_DB="{dir}/state/lockout.cdb"
"""


class Fatal(Exception):
    """End with ``code`` after printing ``prog: fatal: text``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def service_files(account: str, logaccount: str, config: str, ip: str, port: str,
                  rules: str, path: str | None) -> dict[str, str]:
    """Return {relative path: text} of a service directory's run scripts and env files.

    ``path`` None leaves env/PATH out (run inherits svscan's PATH).
    """
    values = {"ip": ip, "port": port, "config": config, "concurrency": DEFAULT_CONCURRENCY,
              "rules": rules, "account": account, "path": path}
    files = {"run": RUN, "log/run": LOG_RUN.format(logaccount=logaccount)}
    for name, text in ENV.items():
        if name != "PATH" or path is not None:
            files[f"env/{name}"] = text.format(**values)
    return files


def default_path() -> str:
    """Return the PATH for env/PATH: this installation's scripts first."""
    dirs = [sysconfig.get_path("scripts"), "/usr/local/bin", "/usr/local/sbin",
            "/usr/bin", "/usr/sbin", "/bin", "/sbin"]
    return ":".join(dict.fromkeys(dirs))


def account(name: str) -> pwd.struct_passwd:
    """Return the passwd entry of ``name``."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise Fatal(111, f"no such account: {name}") from None


def parse_args(args: list[str]) -> tuple[str, str, str, str, str, str]:
    """Return (account, logaccount, dir, config, ip, port); raise Fatal(100) when wrong."""
    if not 3 <= len(args) <= 6:
        raise Fatal(100, USAGE)
    acct, logacct, target = args[:3]
    config = args[3] if len(args) > 3 else DEFAULT_CONFIG
    ip = args[4] if len(args) > 4 else DEFAULT_IP
    port = args[5] if len(args) > 5 else DEFAULT_PORT
    for what, value in (("DIR", target), ("CONFIG", config)):
        if not value.startswith("/"):
            raise Fatal(100, f"{what} must be an absolute path, not {value!r}")
    for value in (acct, logacct, target, config, ip):
        if not value or any(c.isspace() or not c.isprintable() or c in '"\\' for c in value):
            raise Fatal(100, f"blank, quote, backslash or control character in {value!r}")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise Fatal(100, f"PORT must be a number from 1 to 65535, not {port!r}")
    return acct, logacct, target.rstrip("/") or "/", config, ip, port


def write(path: str, text: str, mode: int) -> None:
    """Create ``path`` (it must not exist) holding ``text``, with ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def make_dir(path: str, mode: int, uid: int = -1, gid: int = -1) -> None:
    """Create directory ``path`` with ``mode`` and owner."""
    os.mkdir(path, 0o700)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def compile_rules(directory: str) -> None:
    """Compile directory/ostiary into directory/ostiary.cdb, as its Makefile does."""
    from .cdbmake import write_cdb
    from .tcprules import parse_rules

    with open(os.path.join(directory, "ostiary"), "rb") as f:
        records = parse_rules(f.read())
    with open(os.path.join(directory, "ostiary.cdb"), "wb") as out:
        write_cdb(out, records)


def create(acct: str, logacct: str, target: str, config: str, ip: str, port: str) -> bool:
    """Make the service directory; return True when a config skeleton was written."""
    user, loguser = account(acct), account(logacct)
    root = user.pw_uid == 0
    if os.path.lexists(target):
        raise Fatal(111, f"{target} exists: refusing to touch it")
    try:
        # Sticky: daemontools 0.70 and older pair DIR with DIR/log only then.
        make_dir(target, 0o1755 if root else 0o1775, gid=-1 if root else user.pw_gid)
        make_dir(f"{target}/log", 0o755)
        make_dir(f"{target}/env", 0o755)
        rules = f"{target}/tcprules/ostiary.cdb"
        for name, text in service_files(acct, logacct, config, ip, port, rules,
                                        default_path()).items():
            write(f"{target}/{name}", text, 0o755 if name.endswith("run") else 0o644)
        make_dir(f"{target}/log/main", 0o755, loguser.pw_uid, loguser.pw_gid)
        make_dir(f"{target}/state", 0o700, user.pw_uid, user.pw_gid)
        make_dir(f"{target}/tcprules", 0o755)
        write(f"{target}/tcprules/ostiary", RULES_FILE, 0o644)
        write(f"{target}/tcprules/Makefile", MAKEFILE, 0o644)
        compile_rules(f"{target}/tcprules")
        if not root:
            # supervise keeps an existing supervise/control: the account may then svc -d.
            make_dir(f"{target}/supervise", 0o755)
            os.mkfifo(f"{target}/supervise/control", 0o600)
            os.chown(f"{target}/supervise/control", user.pw_uid, user.pw_gid)
        if os.path.lexists(config):
            return False
        skeleton = SKELETON.format(config=config, dir=target, account=acct,
                                   kill=secrets.token_urlsafe(24),
                                   action=secrets.token_urlsafe(24))
        write(config, skeleton, 0o600)
        os.chown(config, user.pw_uid, user.pw_gid)
        return True
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise Fatal(111, f"unable to create{where}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ostiary-conf."""
    args = sys.argv[1:] if argv is None else argv
    try:
        acct, logacct, target, config, ip, port = parse_args(args)
        if create(acct, logacct, target, config, ip, port):
            print(f"{PROG}: wrote {config} with random passphrases: edit it, then "
                  f"ostiary-handle --check -c {config}")
        else:
            print(f"{PROG}: {config} exists: left as it is")
    except Fatal as e:
        sys.stdout.flush()
        prefix = "" if e.code == 100 and str(e) == USAGE else "fatal: "
        print(f"{PROG}: {prefix}{e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
