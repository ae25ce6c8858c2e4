"""One line per event: on stderr for multilog, or to syslog when stderr is the socket.

Lines read ``prog: level: text``; no timestamps (multilog adds them). Under
inetd descriptor 2 is the client's connection, so the handler notices a
socket there (:func:`stderr_is_socket`) and sends everything to syslog
(LOG_AUTH) instead.
"""

import os
import stat

NAMES = ("emerg", "alert", "crit", "error", "warning", "notice", "info", "debug")
ALERT, FATAL, ERR, WARNING, NOTICE, INFO, DEBUG = 1, 2, 3, 4, 5, 6, 7


def is_socket(fd: int) -> bool:
    """True when descriptor ``fd`` is a socket, or closed."""
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return True


def stderr_is_socket() -> bool:
    """True when descriptor 2 is a socket (inetd, xinetd) or closed."""
    return is_socket(2)


class Log:
    """Write events at or above a syslog threshold."""

    def __init__(self, prog: str, level: int = NOTICE, use_syslog: bool = False) -> None:
        self.prog = prog
        self.level = level
        self.syslog = None
        if use_syslog:
            import syslog

            syslog.openlog(prog, syslog.LOG_PID, syslog.LOG_AUTH)
            self.syslog = syslog

    def __call__(self, level: int, text: str) -> None:
        """Log ``text`` at syslog ``level`` (FATAL, ERR, ..., DEBUG)."""
        if level > self.level and level != FATAL:
            return
        text = text.replace("\n", " ")
        if self.syslog is not None:
            self.syslog.syslog(level, text)
            return
        name = "fatal" if level == FATAL else NAMES[level]
        try:
            os.write(2, f"{self.prog}: {name}: {text}\n".encode("utf-8", "replace"))
        except OSError:
            pass
