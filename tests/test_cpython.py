"""ostiary_ucspi.cpython: every private name has a public fallback that gives the same thing."""

import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ostiary_ucspi import cpython

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = {
    "compare_digest": hmac.compare_digest,
    "sha256": hashlib.sha256,
    "socket": socket.socket,
    "AF_INET6": socket.AF_INET6,
    "inet_pton": socket.inet_pton,
    "inet_ntop": socket.inet_ntop,
    "alarm": signal.alarm,
    "signal": signal.signal,
    "pthread_sigmask": signal.pthread_sigmask,
    "SIG_DFL": signal.SIG_DFL,
    "SIGALRM": signal.SIGALRM,
    "SIG_SETMASK": signal.SIG_SETMASK,
    "NSIG": signal.NSIG,
}


def test_every_name_has_its_public_fallback() -> None:
    assert set(cpython.NAMES) == set(PUBLIC)
    for name, public in PUBLIC.items():
        assert cpython.load(name, public=True) is public, name


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_the_private_name_exists_on_this_python(name: str) -> None:
    """The fast path is taken here: a CPython that renamed a module would fail this, not users."""
    private, attr, _ = cpython.NAMES[name]
    module = __import__(private)
    assert getattr(module, attr) is not None


def test_private_and_public_agree() -> None:
    fast, slow = (cpython.load("sha256", public=p) for p in (False, True))
    assert fast(b"abc").digest() == slow(b"abc").digest() == hashlib.sha256(b"abc").digest()
    for p in (False, True):
        pton, ntop = cpython.load("inet_pton", public=p), cpython.load("inet_ntop", public=p)
        assert ntop(socket.AF_INET6, pton(socket.AF_INET6, "2001:db8:0::1")) == "2001:db8::1"
        assert cpython.load("compare_digest", public=p)(b"a" * 32, b"a" * 32)


def test_protocol_and_handler_tests_pass_with_the_fast_path_forced_off() -> None:
    env = dict(os.environ, OSTIARY_PUBLIC_IMPORTS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_protocol.py",
            "tests/test_handle.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
