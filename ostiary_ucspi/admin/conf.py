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

Exit status: see :data:`EXITS`. Only root can give files to another account:
without root that is refused before anything is created. A later failure can
leave DIR half made: remove it and run again.
"""

from __future__ import annotations

import os
import pwd
import secrets
import sys
import sysconfig

from ..fail import Fatal, Usage, run, standard

PROG = "ostiary-conf"
USAGE = f"{PROG} ACCOUNT LOGACCOUNT DIR [CONFIG] [IP] [PORT]"
EXITS = {
    0: "the service directory was created; --help, --version",
    100: "usage: a bad command line",
    111: "DIR exists, no such account, or a file could not be created",
}
DEFAULT_CONFIG = "/etc/ostiary.cfg"
DEFAULT_IP = "0"
DEFAULT_PORT = "7050"
DEFAULT_CONCURRENCY = "10"
SHIPPED_LOGACCOUNT = "ostiarylog"  # what the project's service/ostiary/log/run names

# env/PATH is the only file ostiary-conf writes that service/ostiary lacks:
# the shipped directory inherits svscan's PATH.
PATH_FILE = """\
{path}
# PATH: where run, tcpserver and ostiary-handle find their programs
# (ostiary-handle, tcpserver, envdir, setuidgid, envuidgid, svc, and python3
# for run's bind probe).
"""
ENV_NAMES = ("IP", "PORT", "CONFIG", "CONCURRENCY", "RULES", "ACCOUNT")


def skel(package: str, name: str) -> str:
    """Return a file of the shipped service/ or tcprules/ (package data)."""
    from importlib.resources import files

    return files(f"ostiary_ucspi.skel.{package}").joinpath(name).read_text()


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


def service_files(
    account: str, logaccount: str, config: str, ip: str, port: str, rules: str, path: str | None
) -> dict[str, str]:
    """Return {relative path: text} of a service directory's run scripts and env files.

    The shipped service/ostiary with this directory's values: each env file's
    first line, log/run's account. ``path`` None leaves env/PATH out (run
    inherits svscan's PATH).
    """
    values = {
        "IP": ip,
        "PORT": port,
        "CONFIG": config,
        "CONCURRENCY": DEFAULT_CONCURRENCY,
        "RULES": rules,
        "ACCOUNT": account,
    }
    log_run = skel("service", "ostiary/log/run")
    shipped = f"account={SHIPPED_LOGACCOUNT}\n"
    files = {
        "run": skel("service", "ostiary/run"),
        "log/run": log_run.replace(shipped, f"account={logaccount}\n", 1),
    }
    for name in ENV_NAMES:
        comment = skel("service", f"ostiary/env/{name}").partition("\n")[2]
        files[f"env/{name}"] = f"{values[name]}\n{comment}"
    if path is not None:
        files["env/PATH"] = PATH_FILE.format(path=path)
    return files


def default_path() -> str:
    """Return the PATH for env/PATH: this installation's scripts first."""
    dirs = [
        sysconfig.get_path("scripts"),
        "/usr/local/bin",
        "/usr/local/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/bin",
        "/sbin",
    ]
    return ":".join(dict.fromkeys(dirs))


def account(name: str) -> pwd.struct_passwd:
    """Return the passwd entry of ``name``."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise Fatal(f"no such account: {name}") from None


def parse_args(args: list[str]) -> tuple[str, str, str, str, str, str]:
    """Return (account, logaccount, dir, config, ip, port); raise Usage when wrong."""
    if args[:1] in (["-h"], ["--help"], ["--version"]):
        standard(args[0])
    if not 3 <= len(args) <= 6:
        raise Usage(USAGE)
    acct, logacct, target = args[:3]
    config = args[3] if len(args) > 3 else DEFAULT_CONFIG
    ip = args[4] if len(args) > 4 else DEFAULT_IP
    port = args[5] if len(args) > 5 else DEFAULT_PORT
    for what, value in (("DIR", target), ("CONFIG", config)):
        if not value.startswith("/"):
            raise Usage(f"{what} must be an absolute path, not {value!r}")
    for value in (acct, logacct, target, config, ip):
        if not value or any(c.isspace() or not c.isprintable() or c in '"\\' for c in value):
            raise Usage(f"blank, quote, backslash or control character in {value!r}")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise Usage(f"PORT must be a number from 1 to 65535, not {port!r}")
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
    from ..cdb import write_cdb
    from ..ucspi.tcprules import parse_rules

    with open(os.path.join(directory, "ostiary"), "rb") as f:
        records = parse_rules(f.read())
    with open(os.path.join(directory, "ostiary.cdb"), "wb") as out:
        write_cdb(out, records)


def create(acct: str, logacct: str, target: str, config: str, ip: str, port: str) -> bool:
    """Make the service directory; return True when a config skeleton was written."""
    user, loguser = account(acct), account(logacct)
    me = os.geteuid()
    others = [u.pw_name for u in (user, loguser) if u.pw_uid != me]
    if me != 0 and others:
        raise Fatal(
            f"must be run as root to give files to {', '.join(dict.fromkeys(others))}: "
            "nothing created"
        )
    root = user.pw_uid == 0
    if os.path.lexists(target):
        raise Fatal(f"{target} exists: refusing to touch it")
    try:
        # Sticky: daemontools 0.70 and older pair DIR with DIR/log only then.
        make_dir(target, 0o1755 if root else 0o1775, gid=-1 if root else user.pw_gid)
        make_dir(f"{target}/log", 0o755)
        make_dir(f"{target}/env", 0o755)
        rules = f"{target}/tcprules/ostiary.cdb"
        for name, text in service_files(
            acct, logacct, config, ip, port, rules, default_path()
        ).items():
            write(f"{target}/{name}", text, 0o755 if name.endswith("run") else 0o644)
        make_dir(f"{target}/log/main", 0o755, loguser.pw_uid, loguser.pw_gid)
        make_dir(f"{target}/state", 0o700, user.pw_uid, user.pw_gid)
        make_dir(f"{target}/tcprules", 0o755)
        write(f"{target}/tcprules/ostiary", skel("tcprules", "ostiary"), 0o644)
        write(f"{target}/tcprules/Makefile", skel("tcprules", "Makefile"), 0o644)
        compile_rules(f"{target}/tcprules")
        if not root:
            # supervise keeps an existing supervise/control: the account may then svc -d.
            make_dir(f"{target}/supervise", 0o755)
            os.mkfifo(f"{target}/supervise/control", 0o600)
            os.chown(f"{target}/supervise/control", user.pw_uid, user.pw_gid)
        if os.path.lexists(config):
            return False
        skeleton = SKELETON.format(
            config=config,
            dir=target,
            account=acct,
            kill=secrets.token_urlsafe(24),
            action=secrets.token_urlsafe(24),
        )
        write(config, skeleton, 0o600)
        os.chown(config, user.pw_uid, user.pw_gid)
        return True
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise Fatal(f"unable to create{where}: {e.strerror}") from None


def body(argv: list[str]) -> None:
    """Make the service directory argv asks for."""
    acct, logacct, target, config, ip, port = parse_args(argv[1:])
    if create(acct, logacct, target, config, ip, port):
        print(
            f"{PROG}: wrote {config} with random passphrases: edit it, then "
            f"ostiary-handle --check -c {config}"
        )
    else:
        print(f"{PROG}: {config} exists: left as it is")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ostiary-conf; ``argv`` is the whole command line (sys.argv)."""
    return run(PROG, USAGE, body, sys.argv if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
