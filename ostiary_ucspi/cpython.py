"""CPython's private modules that the handler's start-up relies on, each with a public fallback.

The handler starts once per connection, so it avoids what the public modules
cost: ``hmac`` and ``hashlib`` load OpenSSL (3.5 MB, 2-3 ms), ``socket`` and
``signal`` import ``enum``. The private names are CPython's and may change in
any release; when one is missing, the public module serves, slower but the
same. ``OSTIARY_PUBLIC_IMPORTS=1`` forces the public ones (tests/test_cpython.py
runs the protocol and handler tests that way).

Names load on first use (``from .cpython import sha256`` imports ``_sha2``
then, not before), so a locked-out connection loads no hash and no socket
module. This is the only module that imports a private name of CPython.
"""

import os
import sys

PUBLIC = os.environ.get("OSTIARY_PUBLIC_IMPORTS") == "1"

TYPE_CHECKING = False
if TYPE_CHECKING:  # what a type checker sees: the public names, which the private ones equal
    from hashlib import sha256 as sha256
    from hmac import compare_digest as compare_digest
    from signal import NSIG as NSIG
    from signal import SIG_DFL as SIG_DFL
    from signal import SIG_SETMASK as SIG_SETMASK
    from signal import alarm as alarm
    from signal import pthread_sigmask as pthread_sigmask
    from signal import signal as signal
    from socket import AF_INET6 as AF_INET6
    from socket import inet_ntop as inet_ntop
    from socket import inet_pton as inet_pton
    from socket import socket as socket

# name -> (private module, its name there, public module): one row per name.
NAMES = {
    "compare_digest": ("_operator", "_compare_digest", "hmac"),
    "sha256": ("_sha2" if sys.version_info >= (3, 12) else "_sha256", "sha256", "hashlib"),
    "socket": ("_socket", "socket", "socket"),
    "AF_INET6": ("_socket", "AF_INET6", "socket"),
    "inet_pton": ("_socket", "inet_pton", "socket"),
    "inet_ntop": ("_socket", "inet_ntop", "socket"),
    "alarm": ("_signal", "alarm", "signal"),
    "signal": ("_signal", "signal", "signal"),
    "pthread_sigmask": ("_signal", "pthread_sigmask", "signal"),
    "SIG_DFL": ("_signal", "SIG_DFL", "signal"),
    "SIGALRM": ("_signal", "SIGALRM", "signal"),
    "SIG_SETMASK": ("_signal", "SIG_SETMASK", "signal"),
    "NSIG": ("_signal", "NSIG", "signal"),
}


def load(name: str, public: bool = PUBLIC) -> object:
    """Return ``name`` from CPython's private module, or from the public one."""
    private, attr, fallback = NAMES[name]
    if not public:
        try:
            return getattr(__import__(private), attr)
        except (ImportError, AttributeError):
            pass
    return getattr(__import__(fallback), name)


def __getattr__(name: str) -> object:
    if name not in NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = load(name)
    return value
