"""One way to fail, djb's: ``prog: usage: ...`` exits 100, ``prog: fatal: ...`` 111.

A program's body raises :class:`Usage` or :class:`Fatal` (or :class:`Help`,
for ``--help``); :func:`run` prints the one line and returns the status. A
leaf: it imports nothing of the package but its version, on demand.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an re and enum import at start-up
    from collections.abc import Callable

USAGE = 100
FATAL = 111


class Failure(Exception):
    """Stop the program: ``prog: KIND: text`` on stderr, exit ``status``."""

    kind = "fatal"

    def __init__(self, text: str, status: int = FATAL) -> None:
        super().__init__(text)
        self.text = text
        self.status = status


class Usage(Failure):
    """A bad command line: ``prog: usage: text``, exit 100."""

    kind = "usage"

    def __init__(self, text: str) -> None:
        super().__init__(text, USAGE)


class Fatal(Failure):
    """Anything else that stops the program: ``prog: fatal: text``, exit 111 (or ``status``)."""


class Help(Exception):
    """``--help`` (or ``-h``): print the usage on stdout, exit 0."""


class Version(Exception):
    """``--version``: print ``prog VERSION`` on stdout, exit 0."""


def unable(verb_thing: str, error: "OSError | str") -> Fatal:
    """Return ``Fatal('unable to VERB THING: reason')`` for an OSError (or a reason)."""
    reason = error if isinstance(error, str) else (error.strerror or str(error))
    return Fatal(f"unable to {verb_thing}: {reason}")


def say(prog: str, kind: str, text: str) -> None:
    """Write ``prog: kind: text`` to stderr; undecodable bytes (os.fsdecode) go out as they came."""
    line = f"{prog}: {kind}: {text}\n" if kind else f"{prog}: {text}\n"
    try:
        sys.stderr.flush()
        sys.stderr.buffer.write(line.encode("utf-8", "surrogateescape"))
        sys.stderr.buffer.flush()
    except (AttributeError, OSError, ValueError):  # no stderr, or closed: nowhere to say it
        pass


def report(prog: str, usage: str, stop: BaseException) -> int:
    """Say what ``stop`` (Help, Version, a Failure, BrokenPipeError) means; return the status."""
    if isinstance(stop, Help):
        sys.stdout.write(f"{prog}: usage: {usage}\n")
        return 0
    if isinstance(stop, Version):
        from . import __version__

        sys.stdout.write(f"{prog} {__version__}\n")
        return 0
    if isinstance(stop, Failure):
        sys.stdout.flush()
        say(prog, stop.kind, stop.text)
        return stop.status
    if isinstance(stop, BrokenPipeError):  # prog | head: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    raise stop


STOPS = (Help, Version, Failure, BrokenPipeError)


def run(prog: str, usage: str, body: "Callable[[list[str]], int | None]", argv: list[str]) -> int:
    """Call ``body(argv)`` and turn what it raises into djb's lines and exit codes.

    ``usage`` is the text after ``prog: usage: ``; ``body`` returns the exit
    status (None: 0).
    """
    try:
        status = body(argv)
    except STOPS as e:
        return report(prog, usage, e)
    return 0 if status is None else status


def standard(arg: str) -> None:
    """Raise Help or Version for ``--help``/``-h`` or ``--version``; else nothing."""
    if arg in ("-h", "--help"):
        raise Help
    if arg == "--version":
        raise Version
