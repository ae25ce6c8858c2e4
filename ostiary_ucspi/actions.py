"""Run an action: execve, argv = [path, address], clean environment, dropped privileges.

:func:`spawn` forks a runner in a new session and does not wait for it, so the
handler can exit at once; the runner starts the action, copies its output to the log line
by line, logs its exit status, and, for an action with an UNDO, waits for its
door to close (:mod:`.doors`).
"""

import os
import stat

from . import log as logmod

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ActionRefused(Exception):
    """The action may not run (unsafe file, cannot switch user)."""


def resolve_ids(uid: int | None, gid: int | None) -> tuple[int, int]:
    """Return the (uid, gid) to run as: unset ids mean nobody as root, ourselves otherwise."""
    if os.getuid() == 0:
        if uid is None or gid is None:
            import pwd

            try:
                nobody = pwd.getpwnam("nobody")
            except KeyError:
                raise ActionRefused("no user 'nobody' to run actions as: set DEFAULT_UID") from None
            uid = nobody.pw_uid if uid is None else uid
            gid = nobody.pw_gid if gid is None else gid
        return uid, gid
    me, mygid = os.getuid(), os.getgid()
    if (uid is not None and uid != me) or (gid is not None and gid != mygid):
        raise ActionRefused(f"only root can run actions as uid {uid} gid {gid}")
    return me, mygid


def lookup_chain(path: str) -> list[str]:
    """Every directory the kernel walks to reach ``path``, symlinks followed, then the file."""
    chain, cur, parts, hops = ["/"], "/", path.split("/"), 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            hops += 1
            if hops > 40:
                raise ActionRefused(f"{path}: too many levels of symbolic links")
            target = os.readlink(nxt)
            parts = target.split("/") + parts
            cur = "/" if target.startswith("/") else cur
            continue
        cur = nxt
        chain.append(cur)
    return chain


def check_file(path: str, uid: int) -> None:
    """Refuse an action file that others could change into something else.

    The file and every directory on the way to it (through any symlink) are
    checked, since whoever can rename one of them can swap the file. None may
    be world-writable (a sticky directory may); for an action that runs as
    root each must be root's and writable by root alone (a sticky directory
    of root's excepted).
    """
    chain = lookup_chain(path)
    for p in chain:
        try:
            st = os.stat(p)
        except OSError as e:
            raise ActionRefused(f"{p}: {e.strerror}") from None
        sticky = p != chain[-1] and st.st_mode & stat.S_ISVTX
        if st.st_mode & stat.S_IWOTH and not sticky:
            raise ActionRefused(f"{p} is world-writable")
        shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky
        if uid == 0 and (st.st_uid != 0 or shared):
            raise ActionRefused(
                f"{p} is writable by someone other than root, and the action runs as root"
            )
    if not os.access(path, os.X_OK):
        raise ActionRefused(f"{path} is not executable")


def default_signals() -> None:
    """Every signal at its default disposition and none blocked, as execve should pass on.

    Python ignores SIGPIPE and SIGXFSZ, and a server started with ``nohup`` or
    ``&`` ignores SIGHUP, SIGINT or SIGQUIT: an action must inherit none of it.
    """
    from .cpython import NSIG, SIG_DFL, SIG_SETMASK, pthread_sigmask, signal

    for n in range(1, NSIG):
        try:
            signal(n, SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP, the C library's own
            pass
    pthread_sigmask(SIG_SETMASK, ())


def prepare(
    ids: "tuple[int | None, int | None]", command: str, undo: str | None
) -> tuple[int, int]:
    """Return the (uid, gid) an action runs as, its command and undo checked; raise ActionRefused.

    ``ids`` is what the config asks for (Config.ids). The handler calls this
    before every run, ``--check`` before the service starts.
    """
    uid, gid = resolve_ids(*ids)
    check_file(command, uid)
    if undo:
        check_file(undo, uid)
    return uid, gid


def run(path: str, ip: str, uid: int, gid: int, log: logmod.Log) -> int:
    """Run ``path ip`` as uid/gid, logging its output; return its wait status.

    Raises ActionRefused when it never started: no fork, or the child could
    not switch ids or execve (it says why on a pipe that execve closes).
    """
    rfd, wfd = os.pipe()
    efd, ewfd = os.pipe()  # not inherited: the child's execve closes ewfd
    try:
        pid = os.fork()
    except OSError as e:
        for fd in (rfd, wfd, efd, ewfd):
            os.close(fd)
        raise ActionRefused(f"unable to fork: {e.strerror}") from None
    if pid == 0:
        step = "set up its descriptors"
        try:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(wfd, 1)
            os.dup2(wfd, 2)
            os.closerange(3, ewfd)
            os.closerange(ewfd + 1, max(os.sysconf("SC_OPEN_MAX"), 1 << 16))  # however high
            default_signals()
            if os.getuid() == 0:
                step = f"switch to uid {uid} gid {gid}"
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            step = "execute it"
            os.execve(path, [path, ip], {"PATH": SAFE_PATH})
        except OSError as e:
            os.write(ewfd, f"unable to {step}: {e.strerror}".encode())
        finally:
            os._exit(127)
    os.close(wfd)
    os.close(ewfd)
    with open(efd, "rb") as errors:
        why = errors.read()  # at once at execve; the child's reason if it failed before
    if why:
        os.close(rfd)
        os.waitpid(pid, 0)
        raise ActionRefused(why.decode(errors="replace"))
    with open(rfd, "rb") as out:
        for line in out:
            log(logmod.INFO, f"{ip} {path}: {line.rstrip().decode(errors='replace')}")
    _, status = os.waitpid(pid, 0)
    return status


def describe(status: int) -> str:
    """Return 'exit N' or 'killed by signal N' for a wait status."""
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def run_logged(path: str, ip: str, uid: int, gid: int, log: logmod.Log, what: str) -> None:
    """Run one command and log how it ended (or why it never started)."""
    try:
        status = run(path, ip, uid, gid, log)
    except ActionRefused as e:
        log(logmod.ERR, f"{ip} {what} {path} not started: {e}")
        return
    level = logmod.NOTICE if status == 0 else logmod.ERR
    log(level, f"{ip} {what} {path} finished: {describe(status)}")


def detach(job: "Callable[[], object]", log: logmod.Log) -> None:
    """Run ``job`` in a forked child in a new session; return at once, never wait for it.

    The caller (a handler) exits soon, so init adopts the child, and a long
    wait holds no server slot. The child works in / with umask 022, whatever
    the server was started with, so it holds no directory busy; its stdin and
    stdout are /dev/null (a caller's pipe is not held open), stderr the log.
    """
    if os.fork():
        return
    try:
        import gc

        gc.enable()  # ostiary-handle disables it for its short life; a runner may wait for hours
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        os.chdir("/")
        os.umask(0o022)
        job()
    except BaseException as e:  # the child must never fall back into the handler
        log(logmod.ERR, f"detached child failed: {type(e).__name__}: {e}")
    finally:
        os._exit(0)


def spawn(
    what: str,
    path: str,
    ip: str,
    uid: int,
    gid: int,
    log: logmod.Log,
    then: "Callable[[], object] | None" = None,
) -> None:
    """Run ``path ip`` in a detached runner (see :func:`detach`), then ``then()`` there."""

    def job() -> None:
        run_logged(path, ip, uid, gid, log, what)
        if then is not None:
            then()

    detach(job, log)
