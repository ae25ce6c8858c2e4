"""Adversarial: our own faults never cost a client a strike, never lose a KILL, never fail open.

The real handler runs against a full filesystem (a 2 MiB tmpfs), a failing
salt source, an operator's lock made while a knock is in flight and a
handler stuck until its alarm; the operator's tool against a compaction that
cannot be written.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import IN_CI, project_tool
from kit.procs import wait_for
from kit.site import KILL, OPEN, Rig
from kit.wire import SALT_LEN, response, tcp_pair

from ostiary_ucspi import store as storemod
from ostiary_ucspi.admin.lockout import PROG
from ostiary_ucspi.admin.lockout import main as lockout_main
from ostiary_ucspi.policy import Entry, charge, lock, refusal, succeed
from ostiary_ucspi.store import Lock, Store, StoreError


def test_a_refund_only_undoes_its_own_charge(tmp_path):
    from test_store import config

    store = Store(str(tmp_path / "lockout.cdb"))
    cfg = config()
    assert charge(store, b"192.0.2.1", cfg, 100).refused is None
    assert lock(store, b"192.0.2.1", cfg, 101) == 0  # the operator, while the knock is in flight
    succeed(store, b"192.0.2.1")  # the knock proved its passphrase
    assert Entry(store.view().get(b"192.0.2.1")).locked_since == 101
    assert refusal(store.view(), b"192.0.2.1", cfg.max_bad_conns) == "locked out"


def test_an_operators_lock_survives_the_refund_of_a_knock_in_flight(rig: Rig):
    h = rig.start()
    salt = h.client.recv(SALT_LEN, socket.MSG_WAITALL)
    assert len(salt) == SALT_LEN
    assert lockout_main([PROG, "-c", str(rig.cfg), "lock", "127.0.0.1"]) == 0
    h.client.sendall(response(OPEN, salt))
    h.client.shutdown(socket.SHUT_WR)
    h.client.recv(1)
    h.client.close()
    assert h.wait() == 0
    assert rig.entry().locked_since > 0
    assert rig.handle(OPEN) == (b"", 0) and "closed at once: locked out" in rig.log_text()


def test_the_alarm_logs_one_line_before_the_handler_dies(rig: Rig):
    with Store(str(rig.db)).lock():  # the store exists
        pass
    lock = Lock(os.open(rig.state, os.O_RDONLY | os.O_DIRECTORY), str(rig.db) + ".lock")
    with lock:  # the handler waits for the writers' lock: stuck
        h = rig.start()
        time.sleep(0.5)
        h.proc.send_signal(signal.SIGALRM)  # what alarm() delivers at its deadline
        assert h.wait(10) == 111
    os.close(lock.dfd)
    assert h.talk() == b""
    lines = rig.lines()
    assert len(lines) == 1 and lines[0].startswith("ostiary-handle: fatal: still running after 32s")
    assert rig.entry().strikes == 0


def test_a_salt_we_cannot_make_charges_nothing(rig: Rig):
    client, server = tcp_pair()
    tool = project_tool("ostiary-handle")
    prelude = (
        "import runpy, ostiary_ucspi.protocol as p; "
        "p.new_salt = lambda: open('/nonexistent/urandom', 'rb'); "
        f"runpy.run_path({tool!r}, run_name='__main__')"
    )
    with open(rig.log, "ab") as log:
        proc = subprocess.run(
            [sys.executable, "-c", prelude, "-c", str(rig.cfg)],
            stdin=server,
            stdout=server,
            stderr=log,
            env=rig.env({"TCPREMOTEIP": "127.0.0.1"}),
            timeout=30,
        )
    server.close()
    client.settimeout(5)
    assert client.recv(64) == b"" and proc.returncode == 111
    client.close()
    lines = rig.lines()
    assert len(lines) == 1 and "internal error: FileNotFoundError" in lines[0], lines
    assert rig.entry().strikes == 0 and rig.entry().errors == 0


def test_unlock_says_it_took_effect_when_only_the_compaction_after_it_failed(
    tmp_path, capsys, monkeypatch
):
    from test_lockoutctl import Rig as ToolRig

    r = ToolRig(tmp_path)
    r.fails("192.0.2.7", 3)
    monkeypatch.setattr(storemod, "MIN_JOURNAL", 64)
    monkeypatch.setattr(storemod, "MAX_JOURNAL", 64)

    def no_room(fd):  # the journal's append syncs with fdatasync, a compaction with fsync
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_room)
    assert lockout_main([PROG, "-c", r.cfg_path, "unlock", "192.0.2.7"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("192.0.2.7: unlocked")
    assert (
        err.startswith(f"{PROG}: warning: the unlock above took effect, but compacting")
        and "No space left on device" in err
        and err.count("\n") == 1
    )
    assert r.store.view().get(b"192.0.2.7") is None  # the unlock stands
    assert not [n for n in os.listdir(r.state) if ".tmp." in n]


def test_a_failed_compaction_leaves_the_store_serving(tmp_path, monkeypatch):
    path = str(tmp_path / "lockout.cdb")
    store = Store(path)
    monkeypatch.setattr(storemod, "MIN_JOURNAL", 64)
    monkeypatch.setattr(storemod, "MAX_JOURNAL", 64)
    with store.lock() as tx:
        for i in range(10):
            tx.put(b"192.0.2.%d" % i, b"1 1 0 1")
    assert store.due  # the write did not compact by itself
    real = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(StoreError, match="unable to write"):
        store.compact_due()
    monkeypatch.setattr(os, "fsync", real)
    assert len(Store(path).view().items()) == 10
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]


@pytest.fixture
def full_disk(rig: Rig):
    """The rig's state directory on a 2 MiB tmpfs; yields a function that fills it."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI runs as root")
        pytest.skip("needs root to mount a tmpfs")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=700", "tmpfs", str(rig.state)], check=True
    )

    def fill() -> None:
        fd = os.open(rig.state / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)

    try:
        yield fill
    finally:
        subprocess.run(["umount", "-l", str(rig.state)], check=True)


def test_a_kill_on_a_full_disk_keeps_the_service_refusing_under_inetd(rig: Rig, full_disk):
    store = Store(str(rig.db))
    with store.lock() as tx:
        tx.put(b"!seed", b"1")
    h = rig.start(inetd=True, fake_syslog=True)

    def fill_then_kill(salt: bytes) -> bytes:
        size = os.path.getsize(str(rig.db) + ".journal")
        with store.lock() as tx:  # the journal ends on a page: the next line needs a new one
            tx.put(b"!pad", b"x" * (-(size + 15) % 4096 or 4096))
        full_disk()
        return response(KILL, salt)

    assert len(h.talk(answer=fill_then_kill)) == SALT_LEN
    assert h.wait() == 111
    assert "No space left on device" in rig.syslog.read_text()
    os.unlink(rig.state / "filler")  # room again: still nobody gets a salt
    got, code = rig.handle(OPEN, inetd=True, fake_syslog=True)
    assert (got, code) == (b"", 0)
    assert (
        "closed at once: service stopped: KILL proven while the store could not"
        in rig.syslog.read_text()
    )
    assert rig.runs("open") == []
    assert lockout_main([PROG, "-c", str(rig.cfg), "revive"]) == 0
    assert len(rig.handle(OPEN)[0]) == SALT_LEN
    wait_for(lambda: rig.runs("open"), 10, "the action after revive")


def test_the_writer_never_writes_a_store_the_reader_would_call_corrupt(tmp_path, monkeypatch):
    path = str(tmp_path / "lockout.cdb")
    store = Store(path)
    with store.lock() as tx:
        for i in range(100):
            tx.put(b"192.0.2.%d" % i, b"1 1 0 1")
    items = [(b"!gen", b"2"), *store.view().items().items()]
    compacted = 2048 + sum(24 + len(k) + len(v) for k, v in items)  # a CDB's exact size
    monkeypatch.setattr(storemod, "MAX_FILE", compacted - 1)  # one limit, both sides
    with pytest.raises(StoreError, match="would pass the limit"):
        store.compact()
    view = Store(path).view()  # the reader accepts what is there, and it is all there
    assert len(view.items()) == 100 and os.path.getsize(path) <= storemod.MAX_FILE
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]
