"""The service's supervisor: ``$OSTIARY_SERVICE``, its ``down`` file and ``supervise/control``.

The one place that knows how KILL takes a daemontools or runit service down
and how the operator brings it back. ``run`` exports ``OSTIARY_SERVICE``, the
service directory; without it (inetd, xinetd, systemd) the stopped state in
the lockout store alone refuses everyone, and the superserver (or
``ostiary.socket``) keeps accepting: ``revive`` alone serves again.
"""

import errno
import os

from . import log as logmod

ENV = "OSTIARY_SERVICE"


def service_dir() -> str | None:
    """Return the service directory the handler runs under, None when there is none."""
    return os.environ.get(ENV) or None


def take_down(log: logmod.Log) -> None:
    """Mark the service down and tell supervise to stop it, what ``svc -d`` does.

    Without trusting svc's exit status (0 even when it cannot reach
    supervise): write ``d`` to supervise/control, a FIFO that only a running
    supervise (or runsv) holds open for reading.
    """
    service = service_dir()
    if service is None:
        return
    try:
        open(os.path.join(service, "down"), "a").close()
    except OSError as e:
        log(logmod.ERR, f"unable to create {service}/down: {e.strerror}")
    control = os.path.join(service, "supervise", "control")
    try:
        fd = os.open(control, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        why = "supervise is not running" if e.errno == errno.ENXIO else e.strerror
        log(logmod.ERR, f"unable to take {service} down: {control}: {why}")
        return
    try:
        os.write(fd, b"d")
    except OSError as e:
        log(logmod.ERR, f"unable to take {service} down: {control}: {e.strerror}")
        return
    finally:
        os.close(fd)
    log(logmod.NOTICE, f"{service}: supervise told to take the service down (svc -d)")


# Where the operator's revive looks for what runs the handler (ROOT: for tests).
ROOT = "/"
SCAN_DIRS = ("etc/service", "service", "var/service", "etc/sv")
SOCKET_UNITS = (
    "etc/systemd/system/ostiary.socket",
    "lib/systemd/system/ostiary.socket",
    "usr/lib/systemd/system/ostiary.socket",
)
XINETD = "etc/xinetd.d/ostiary"
INETD = "etc/inetd.conf"


def service_dirs(config: str) -> list[str]:
    """Return the service directories (under SCAN_DIRS) whose env/CONFIG is ``config``."""
    found = []
    want = os.path.realpath(config)
    for base in SCAN_DIRS:
        base = os.path.join(ROOT, base)
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for name in names:
            service = os.path.join(base, name)
            try:
                with open(os.path.join(service, "env", "CONFIG")) as f:
                    value = f.readline().strip()
            except (OSError, UnicodeDecodeError):
                continue
            real = os.path.realpath(service)
            if value and os.path.realpath(value) == want and real not in found:
                found.append(real)
    return found


def superservers() -> list[str]:
    """Return which of systemd's ostiary.socket, xinetd and inetd are set up to run the handler."""
    found = []
    if any(os.path.exists(os.path.join(ROOT, u)) for u in SOCKET_UNITS):
        found.append("systemd")
    if os.path.exists(os.path.join(ROOT, XINETD)):
        found.append("xinetd")
    try:
        with open(os.path.join(ROOT, INETD), errors="replace") as f:
            if any("ostiary-handle" in line and not line.lstrip().startswith("#") for line in f):
                found.append("inetd")
    except OSError:
        pass
    return found


def bring_up_advice(config: str) -> str:
    """Return what the operator does, after a revive, to serve ``config`` again."""
    service = service_dir()
    services = [service] if service else service_dirs(config)
    lines = [
        f"{s} was also taken down; bring it up: rm {s}/down; svc -u {s} (runit: sv up {s})"
        for s in services
    ]
    for name in superservers():
        if name == "systemd":
            lines.append(
                "systemd: ostiary.socket kept accepting; serving again now "
                "(if you stopped it: systemctl start ostiary.socket)"
            )
        else:
            lines.append(f"{name}: it kept accepting; serving again now")
    if not lines:
        lines.append(
            "under daemontools or runit the service was also taken down; bring it up: "
            "rm SERVICEDIR/down; svc -u SERVICEDIR (runit: sv up SERVICEDIR); "
            "under inetd, xinetd or systemd: serving again now"
        )
    return "\n".join(lines)
