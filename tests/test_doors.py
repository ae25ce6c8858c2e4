"""Doors: an ACTION's UNDO runs once, at the latest deadline, even when its runner dies."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import project_tool
from kit.procs import wait_for
from kit.site import KILL, OPEN, Rig
from kit.wire import SALT_LEN, talk, tcp_pair

from ostiary_ucspi import doors
from ostiary_ucspi import log as logmod
from ostiary_ucspi.policy import DOORS_GRACE
from ostiary_ucspi.store import Store


def undo_config(rig: Rig, delay: int, *, code: int = 0) -> None:
    """The ``open`` ACTION with UNDO ``undo`` after ``delay`` seconds."""
    rig.action("undo", code=code)
    rig.write_config(open_action=False)
    text = rig.cfg.read_text()
    rig.cfg.write_text(
        f'ACTION="{OPEN.decode()}","{rig.bin}/open"\nUNDO={delay},"{rig.bin}/undo"\n' + text
    )


def knock(rig: Rig) -> float:
    """A right knock; return when the handler exited."""
    h = rig.start()
    assert len(h.talk(OPEN)) == SALT_LEN
    assert h.wait() == 0
    return time.time()


def undo_times(rig: Rig) -> list[float]:
    path = rig.out / "undo.runs"
    return [float(x.split()[1]) for x in path.read_text().splitlines()] if path.exists() else []


def runners(rig: Rig) -> list[int]:
    """Our processes still running with this rig's config on their command line."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(rig.cfg).encode() in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def kill_runners(rig: Rig) -> None:
    """SIGKILL every runner of this rig, as the OOM killer or a kill of the tree would."""
    pids = wait_for(lambda: runners(rig), 5, "the action runner")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not runners(rig), 5, "the runners to die")


def sleep_past_close(rig: Rig, extra: float = 0.2) -> None:
    """Sleep until every door's close (whole seconds, rounded up) has passed, plus ``extra``."""
    latest = max(d["closes_at"] for d in door_list(rig))
    time.sleep(max(0.0, latest + extra - time.time()))


def lockout(rig: Rig, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [project_tool("ostiary-lockout"), "-c", str(rig.cfg), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=rig.env(),
    )


def sweep(rig: Rig) -> subprocess.CompletedProcess:
    """``ostiary-lockout sweep`` as run starts it: its stderr (and its waiters') is the log."""
    with open(rig.log, "ab") as log:
        return subprocess.run(
            [project_tool("ostiary-lockout"), "-c", str(rig.cfg), "sweep"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=60,
            env=rig.env(),
        )


def door_list(rig: Rig) -> list[dict]:
    r = lockout(rig, "doors", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_second_knock_extends_the_door_and_the_undo_runs_once(rig: Rig) -> None:
    undo_config(rig, 3)
    knock(rig)
    time.sleep(1.5)
    second = knock(rig)
    assert [d["attempts"] for d in door_list(rig)] == [0]
    wait_for(lambda: undo_times(rig), 10, "the undo")
    assert undo_times(rig)[0] >= second + 3 - 0.5  # the later deadline, not the first
    time.sleep(1.5)  # the first knock's deadline has long passed: nothing else runs
    wait_for(lambda: not runners(rig), 10, "the runners to finish")
    assert len(undo_times(rig)) == 1
    assert rig.runs("open") == ["127.0.0.1", "127.0.0.1"]  # the ACTION itself runs again
    assert door_list(rig) == []


def test_two_addresses_have_two_doors(rig: Rig) -> None:
    undo_config(rig, 60)
    for ip in ("127.0.0.1", "192.0.2.7"):
        h = rig.start(remote_ip=ip)
        assert len(h.talk(OPEN)) == SALT_LEN and h.wait() == 0
    assert sorted(d["address"] for d in door_list(rig)) == ["127.0.0.1", "192.0.2.7"]
    kill_runners(rig)


def test_runner_killed_then_the_next_connection_closes_the_door_once(rig: Rig) -> None:
    undo_config(rig, 1)
    knock(rig)
    kill_runners(rig)
    assert undo_times(rig) == []
    sleep_past_close(rig, DOORS_GRACE + 0.5)
    assert undo_times(rig) == []  # nobody left to close it, until someone connects
    h = rig.start(remote_ip="192.0.2.99")  # any connection, even a wrong one
    h.talk(b"wrong")
    assert h.wait() == 0
    wait_for(lambda: undo_times(rig), 10, "the sweeper's undo")
    rig.wait_log("a door is past its close")
    wait_for(lambda: not runners(rig), 10, "the sweeper to finish")
    assert len(undo_times(rig)) == 1
    assert rig.record("undo")["argv"][1:] == [b"127.0.0.1"]
    assert door_list(rig) == []
    h = rig.start(remote_ip="192.0.2.99")  # the door is gone: nothing runs again
    h.talk(b"wrong")
    assert h.wait() == 0
    time.sleep(0.5)
    assert len(undo_times(rig)) == 1


def test_runner_killed_then_the_service_start_closes_the_door(rig: Rig) -> None:
    undo_config(rig, 1)
    knock(rig)
    kill_runners(rig)
    sleep_past_close(rig)
    r = sweep(rig)
    assert r.returncode == 0, r.stderr
    assert "swept: 1 doors" in r.stdout
    assert len(undo_times(rig)) == 1  # before sweep returns: before the service serves
    assert door_list(rig) == []


def test_the_service_start_waits_for_doors_not_yet_due(rig: Rig) -> None:
    undo_config(rig, 3)
    opened = knock(rig)
    kill_runners(rig)
    r = sweep(rig)
    assert r.returncode == 0 and "1 waiting" in r.stdout, r.stdout + rig.log_text()
    assert undo_times(rig) == []
    wait_for(lambda: undo_times(rig), 10, "the undo at its time")
    assert undo_times(rig)[0] >= opened + 3 - 1
    wait_for(lambda: door_list(rig) == [], 5, "the door to be closed")


def test_two_sweepers_racing_on_one_overdue_door_run_it_once(rig: Rig) -> None:
    undo_config(rig, 1)
    knock(rig)
    kill_runners(rig)
    sleep_past_close(rig)
    tool = project_tool("ostiary-lockout")
    procs = [
        subprocess.Popen(
            [tool, "-c", str(rig.cfg), "sweep"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=rig.env(),
        )
        for _ in range(4)
    ]
    for p in procs:
        assert p.wait(60) == 0
    time.sleep(0.3)
    assert len(undo_times(rig)) == 1
    assert door_list(rig) == []


def test_a_failing_undo_is_retried_then_left_failed(rig: Rig, monkeypatch, capfd) -> None:
    undo = rig.action("undo", code=3)
    store = Store(str(rig.db))
    close_at = doors.arm(store, 1, "192.0.2.7", undo, 0, os.getuid(), os.getgid(), time.time())
    monkeypatch.setattr(doors, "BACKOFF", (1, 1, 1, 1))
    doors.keep_closing(
        store, doors.door_key(1, "192.0.2.7"), close_at, logmod.Log("ostiary-handle", logmod.INFO)
    )
    assert len(undo_times(rig)) == doors.MAX_ATTEMPTS
    err = capfd.readouterr().err
    assert err.count(": error: 192.0.2.7 undo ") == doors.MAX_ATTEMPTS
    assert "attempt 1 of 5: retried in 1s" in err and "marked failed" in err
    (door,) = door_list(rig)
    assert (door["state"], door["attempts"], door["address"]) == ("failed", 5, "192.0.2.7")
    r = lockout(rig, "doors")
    assert "failed" in r.stdout and "192.0.2.7" in r.stdout


def test_the_operator_closes_and_forgets_doors(rig: Rig) -> None:
    undo_config(rig, 600)
    knock(rig)
    kill_runners(rig)
    for ip in ("192.0.2.7", "192.0.2.8"):
        h = rig.start(remote_ip=ip)
        assert len(h.talk(OPEN)) == SALT_LEN and h.wait() == 0
    kill_runners(rig)
    table = lockout(rig, "doors").stdout
    assert "3 open doors" in table and "CLOSES AT" in table
    r = lockout(rig, "close", "192.0.2.7", "1")
    assert r.returncode == 0 and "door closed" in r.stdout, r.stderr
    assert rig.record("undo")["argv"][1:] == [b"192.0.2.7"]
    r = lockout(rig, "forget", "192.0.2.8", "1")
    assert r.returncode == 0 and "forgotten" in r.stdout
    assert len(undo_times(rig)) == 1
    assert [d["address"] for d in door_list(rig)] == ["127.0.0.1"]
    r = lockout(rig, "close", "192.0.2.8", "1")
    assert r.returncode == 111 and "no door" in r.stderr
    r = lockout(rig, "close", "not-an-address", "1")
    assert r.returncode == 100


def test_a_kill_does_not_forget_pending_undos(rig: Rig) -> None:
    undo_config(rig, 2)
    knock(rig)
    h = rig.start(remote_ip="192.0.2.50")
    assert len(h.talk(KILL)) == SALT_LEN and h.wait() == 0
    wait_for(lambda: undo_times(rig), 10, "the undo while the service is stopped")
    assert door_list(rig) == []


def test_a_damaged_door_record_fails_closed(rig: Rig) -> None:
    undo_config(rig, 60)
    store = Store(str(rig.db))
    with store.lock() as tx:
        tx.put(doors.INDEX, b"0 " + doors.door_key(1, "192.0.2.7"))
        tx.put(doors.door_key(1, "192.0.2.7"), b"soon never 0 open")
    h = rig.start()
    h.talk(OPEN)
    assert h.wait() == 111
    time.sleep(0.3)
    assert rig.runs("open") == []  # no action runs on a store that does not parse
    rig.wait_log("door record does not parse")
    r = lockout(rig, "doors")
    assert r.returncode == 111 and "door record does not parse" in r.stderr


def test_actions_start_with_every_signal_default_and_none_blocked(rig: Rig) -> None:
    def ignore_and_block() -> None:  # a server started with nohup, from a shell with &
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})

    # The action execs at once into grep, which reads its own status: what execve handed
    # on (a shell reading /proc/$$ may catch itself with signals blocked around a fork).
    script = rig.bin / "open"
    script.write_text(f"#!/bin/sh\nexec grep ^Sig /proc/self/status > {rig.out}/signals\n")
    client, server = tcp_pair()
    proc = subprocess.Popen(
        rig.argv(),
        stdin=server,
        stdout=server,
        stderr=subprocess.DEVNULL,
        env=rig.env({"TCPREMOTEIP": "127.0.0.1"}),
        preexec_fn=ignore_and_block,
    )
    server.close()
    assert len(talk(client, OPEN)) == SALT_LEN
    assert proc.wait(15) == 0
    out = rig.out / "signals"
    wait_for(lambda: out.exists() and "SigBlk" in out.read_text(), 10, "the action")
    status = dict(line.split(":\t", 1) for line in out.read_text().splitlines())
    assert int(status["SigIgn"], 16) == 0
    assert int(status["SigBlk"], 16) == 0


def test_two_handlers_noticing_one_overdue_door_run_it_once(rig: Rig) -> None:
    undo_config(rig, 1)
    knock(rig)
    kill_runners(rig)
    sleep_past_close(rig, DOORS_GRACE + 0.2)
    handlers = [rig.start(remote_ip=f"192.0.2.{n}") for n in (31, 32, 33)]  # at once
    for h in handlers:
        h.talk(b"wrong")
    for h in handlers:
        assert h.wait() == 0
    wait_for(lambda: undo_times(rig), 10, "the sweepers' undo")
    wait_for(lambda: not runners(rig), 10, "the sweepers to finish")
    assert len(undo_times(rig)) == 1
    assert door_list(rig) == []


def test_a_failed_door_does_not_make_every_connection_sweep(rig: Rig) -> None:
    undo = rig.action("undo", code=3)
    store = Store(str(rig.db))
    key = doors.door_key(1, "192.0.2.9")
    doors.arm(store, 1, "192.0.2.9", undo, 0, os.getuid(), os.getgid(), time.time() - 60)
    with store.lock() as tx:  # as MAX_ATTEMPTS failures leave it
        door = doors.Door(key, tx.get(key))
        door.state, door.attempts = b"failed", doors.MAX_ATTEMPTS
        tx.put(key, door.encode())
        doors.reindex(tx, [key])
    from ostiary_ucspi.policy import doors_due

    assert not doors_due(store.view(), int(time.time()))
    assert [d["state"] for d in door_list(rig)] == ["failed"]  # still shown to the operator
    h = rig.start(remote_ip="192.0.2.99")
    h.talk(b"wrong")
    assert h.wait() == 0
    assert "sweeping" not in rig.log_text()
