"""The service's supervisor: ``$OSTIARY_SERVICE``, its ``down`` file and ``supervise/control``.

The one place that knows how KILL takes a daemontools or runit service down
and how the operator brings it back. ``run`` exports ``OSTIARY_SERVICE``, the
service directory; without it (inetd, xinetd, systemd) the stopped state in
the lockout store alone refuses everyone.
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


def bring_up_advice() -> str:
    """Return what the operator runs, after a revive, to serve again."""
    service = service_dir()
    if service:
        return f"the service was also taken down; bring it up: rm {service}/down; svc -u {service}"
    return ("under daemontools or runit the service was also taken down; bring it up: "
            "rm SERVICEDIR/down; svc -u SERVICEDIR")
