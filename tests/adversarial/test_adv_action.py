"""Adversarial: what a compromised action starts with.

The action runs after the connection is closed, in a session of its own, with
argv [path, address], PATH alone in its environment, /dev/null on stdin, the
log pipe on stdout and stderr, and no other descriptor: not even one the
server inherited from whoever started it, however high its number.
"""

from __future__ import annotations

import os
import socket

import pytest
from kit.procs import exec_done, wait_for
from kit.servers import Server
from kit.site import Site
from kit.wire import SALT_LEN, connect, read_to_eof, recv_exact, response

from ostiary_ucspi.actions import SAFE_PATH

INSPECT = """#!/bin/sh
# Becomes a sleep with exactly what the action was handed, for the test to look at.
cat /proc/$$/environ > '{out}/inspect.env'
echo "$$" > '{out}/inspect.pid'
exec sleep 2
"""


@pytest.fixture
def secret_fd():
    """A descriptor numbered above 255, open on a file the action must not get."""
    fd = os.open("/etc/hostname", os.O_RDONLY)
    high = 300
    os.dup2(fd, high, inheritable=True)
    os.close(fd)
    yield high
    os.close(high)


def test_a_compromised_action_inherits_nothing_but_its_three_descriptors(secret_fd, tally):
    site = Site(actions=())
    path = site.bin / "inspect"
    path.write_text(INSPECT.format(out=site.out))
    path.chmod(0o755)
    secret = b"inspect-passphrase"
    site.config(f'ACTION="{secret.decode()}","{path}"')
    try:
        with Server(site, tally=tally, pass_fds=(secret_fd,)) as srv:
            with connect(srv.port, "127.70.0.1") as sock:
                salt = recv_exact(sock, SALT_LEN)
                sock.sendall(response(secret, salt))
                sock.shutdown(socket.SHUT_WR)
                assert salt + read_to_eof(sock) == salt
            pid = int(
                wait_for(
                    lambda: (
                        (site.out / "inspect.pid").exists()
                        and (site.out / "inspect.pid").read_text().strip()
                    ),
                    10,
                    "the action",
                )
            )
            exec_done(pid, "sleep")
            fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            env = (site.out / "inspect.env").read_bytes().split(b"\0")[:-1]
            sid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[3])
    finally:
        site.remove()
    assert sorted(fds) == ["0", "1", "2"], fds  # the server's descriptor 300 did not come along
    assert fds["0"] == "/dev/null" and fds["1"] == fds["2"] and fds["1"].startswith("pipe:"), fds
    assert env == [b"PATH=" + SAFE_PATH.encode()], env
    assert sid != pid  # the runner leads the session; the action is in it, not in the server's
    assert sid != os.getsid(0)
