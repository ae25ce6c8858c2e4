"""ostiary-handle through real sockets: wire, lockout, store, KILL, addresses, inetd, logs."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import project_tool
from kit.damage import CORRUPTIONS, journal
from kit.procs import wait_for, wait_quiet
from kit.servers import TcpServer
from kit.site import KILL, OPEN, Rig
from kit.vectors import OSTIARY
from kit.wire import SALT_LEN, read_to_eof, response, tcp_pair

from ostiary_ucspi import protocol
from ostiary_ucspi.policy import STOPPED, Entry
from ostiary_ucspi.store import Store, journal_threshold

VECTOR_SECRET, VECTOR_SALT, VECTOR_RESPONSE = OSTIARY.key, OSTIARY.msg, OSTIARY.digest
WRONG = b"\x5a" * 32
LINE = re.compile(r"^ostiary-handle: (alert|fatal|error|warning|notice|info|debug): \S")


# -- the wire ------------------------------------------------------------------


def test_vector_is_hmac_sha256():
    assert protocol.response(VECTOR_SECRET, VECTOR_SALT) == VECTOR_RESPONSE
    assert response(VECTOR_SECRET, VECTOR_SALT) == VECTOR_RESPONSE


def test_vector_through_tcpserver(rig: Rig):
    rig.action("vector")
    rig.write_config(f'ACTION="{VECTOR_SECRET.decode()}","{rig.bin}/vector"')
    with TcpServer(rig, salt=VECTOR_SALT) as srv:
        got = srv.knock(response_bytes=VECTOR_RESPONSE)
        assert got == VECTOR_SALT
        assert rig.wait_runs("vector") == ["127.0.0.1"]
        # One bit off is a stranger.
        bad = bytes([VECTOR_RESPONSE[0] ^ 1]) + VECTOR_RESPONSE[1:]
        assert srv.knock(response_bytes=bad) == VECTOR_SALT
        rig.wait_log("failed: wrong response")
    assert rig.runs("vector") == ["127.0.0.1"]
    assert rig.runs("open") == []


def test_right_response_gets_the_salt_only_and_runs_the_action(rig: Rig):
    with TcpServer(rig) as srv:
        first = srv.knock(OPEN)
        second = srv.knock(OPEN)
        assert rig.wait_runs("open", 2) == ["127.0.0.1", "127.0.0.1"]
    assert len(first) == SALT_LEN and len(second) == SALT_LEN
    assert first != second  # a fresh salt per connection
    assert rig.entry().strikes == 0
    assert len(rig.wait_log("action 1 ", 4)) == 4  # starting + finished, twice


@pytest.mark.parametrize(
    "kind, talk_kw, problem",
    [
        ("wrong", {"response_bytes": WRONG}, "wrong response"),
        ("short", {"response_bytes": b"x" * 10}, "hang-up after 10 bytes"),
        ("empty", {"response_bytes": b""}, "hang-up after 0 bytes"),
        ("slow", {"hold": True}, "timeout after 0 bytes"),
    ],
)
def test_bad_responses_get_the_salt_and_a_strike(rig: Rig, kind, talk_kw, problem):
    rig.write_config(COMM_TIMEOUT="1")
    h = rig.start()
    t0 = time.monotonic()
    got = h.talk(**talk_kw)
    elapsed = time.monotonic() - t0
    assert h.wait() == 0
    assert len(got) == SALT_LEN
    assert rig.entry().strikes == 1
    assert rig.wait_log(f"127.0.0.1 failed: {problem}")
    assert rig.runs("open") == []
    if kind == "slow":  # the timeout, plus the handler's start-up on a busy machine
        assert 0.9 <= elapsed < 6


def test_response_longer_than_32_bytes_is_judged_on_32(rig: Rig):
    got, rc = rig.handle(talk_kw={"answer": lambda salt: response(OPEN, salt) + b"trailing junk"})
    assert (len(got), rc) == (SALT_LEN, 0)
    assert rig.wait_runs("open") == ["127.0.0.1"]


def test_replayed_response_is_refused(rig: Rig):
    recorded = []

    def record(salt):
        recorded.append(response(OPEN, salt))
        return recorded[-1]

    with TcpServer(rig) as srv:
        assert len(srv.knock(answer=record)) == SALT_LEN
        assert rig.wait_runs("open") == ["127.0.0.1"]
        assert len(srv.knock(response_bytes=recorded[0])) == SALT_LEN
        rig.wait_log("127.0.0.1 failed: wrong response")
    assert rig.runs("open") == ["127.0.0.1"]
    assert rig.entry().strikes == 1


def test_slow_drip_is_cut_at_one_overall_deadline(rig: Rig):
    rig.write_config(COMM_TIMEOUT="2")
    h = rig.start()
    assert len(h.client.recv(SALT_LEN, socket.MSG_WAITALL)) == SALT_LEN
    h.client.settimeout(1.0)
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < 10:
        try:
            h.client.send(b"d")
            sent += 1
            if h.client.recv(1) == b"":  # waits a second for the close: a byte a second
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    elapsed = time.monotonic() - t0
    h.client.close()
    assert h.wait() == 0
    assert 1.5 <= elapsed < 4.5, elapsed  # 2 s, not 32 s
    assert sent <= 4
    line = rig.wait_log("127.0.0.1 failed: timeout after ")[0]
    assert int(re.search(r"after (\d+) bytes", line)[1]) >= 1  # the drip did arrive
    assert rig.entry().strikes == 1


def test_delay_is_honoured_after_the_close(rig: Rig):
    rig.write_config(DELAY="1")
    for secret in (OPEN, None):
        h = rig.start()
        got = h.talk(secret, response_bytes=None if secret else WRONG)
        closed = time.monotonic()
        assert len(got) == SALT_LEN
        assert h.wait() == 0
        assert time.monotonic() - closed >= 0.95


# -- lockout -------------------------------------------------------------------


def test_lockout_after_max_bad_conns_persists_across_handlers(rig: Rig):
    rig.action("lockout")
    rig.write_config(f'LOCKOUT_ACTION="","{rig.bin}/lockout"', MAX_BAD_CONNS="3")
    with TcpServer(rig) as srv:
        for _ in range(3):
            assert len(srv.knock(response_bytes=WRONG)) == SALT_LEN
        rig.wait_log("127.0.0.1 locked out after 3 bad connections")
        for _ in range(3):  # each a new handler process: nothing, not even a salt
            assert srv.knock(OPEN) == b""
        assert len(srv.knock(OPEN, source="127.0.0.2")) == SALT_LEN  # others are served
        rig.wait_runs("open")
        assert rig.wait_runs("lockout") == ["127.0.0.1"]
        wait_for(lambda: srv.ended() == 7, 10, "every handler to exit")
    assert rig.runs("open") == ["127.0.0.2"]
    assert rig.entry().locked_since > 0
    wait_quiet(rig.cfg)
    assert rig.runs("lockout") == ["127.0.0.1"]  # LOCKOUT_ACTION ran once
    assert len([x for x in rig.lines() if "lockout action" in x and "starting" in x]) == 1
    rec = rig.record("lockout")
    assert rec["argv"] == [str(rig.bin / "lockout").encode(), b"127.0.0.1"]
    assert len(rig.wait_log("closed at once: locked out", 3)) == 3


def test_every_kind_of_failure_counts(rig: Rig):
    rig.write_config(MAX_BAD_CONNS="4", COMM_TIMEOUT="1")
    for kw in (
        {"response_bytes": WRONG},
        {"response_bytes": b"short"},
        {"response_bytes": b""},
        {"hold": True},
    ):
        got, rc = rig.handle(talk_kw=kw)
        assert (len(got), rc) == (SALT_LEN, 0)
    assert rig.entry().strikes == 4
    assert rig.handle(OPEN) == (b"", 0)
    assert rig.runs("open") == []


def test_a_success_clears_the_count(rig: Rig):
    rig.write_config(MAX_BAD_CONNS="3")
    for _ in range(2):
        assert len(rig.handle(talk_kw={"response_bytes": WRONG})[0]) == SALT_LEN
    assert rig.entry().strikes == 2
    assert len(rig.handle(OPEN)[0]) == SALT_LEN
    assert rig.entry().strikes == 0
    for _ in range(2):
        assert len(rig.handle(talk_kw={"response_bytes": WRONG})[0]) == SALT_LEN
    got, _ = rig.handle(OPEN)  # two strikes, not four: still served
    assert len(got) == SALT_LEN
    assert rig.wait_runs("open", 2) == ["127.0.0.1", "127.0.0.1"]


def put_entry(rig: Rig, key: bytes, strikes: int, locked_since: int, age: int) -> None:
    """Write ``key``'s lockout record as if its last attempt was ``age`` seconds ago."""
    entry = Entry()
    entry.strikes = entry.errors = strikes
    entry.locked_since = locked_since
    entry.last_seen = int(time.time()) - age
    with Store(str(rig.db)).lock() as tx:
        tx.put(key, entry.encode())


def test_a_charge_whose_handler_died_is_made_final_once(rig: Rig):
    rig.action("lockout")
    rig.write_config(f'LOCKOUT_ACTION="","{rig.bin}/lockout"', MAX_BAD_CONNS="3", COMM_TIMEOUT="1")
    put_entry(rig, b"127.0.0.1", 3, 0, age=60)  # its third handler was killed mid-exchange
    for _ in range(3):
        assert rig.handle(OPEN) == (b"", 0)
    assert rig.wait_runs("lockout") == ["127.0.0.1"]
    assert rig.entry().locked_since > 0
    wait_quiet(rig.cfg)
    assert rig.runs("lockout") == ["127.0.0.1"]
    assert rig.runs("open") == []


def test_strikes_expire_after_strike_expire(rig: Rig):
    rig.write_config("STRIKE_EXPIRE=100", MAX_BAD_CONNS="3")
    put_entry(rig, b"127.0.0.1", 2, 0, age=1000)
    put_entry(rig, b"127.0.0.2", 2, 0, age=10)
    for ip, strikes in (("127.0.0.1", 1), ("127.0.0.2", 3)):
        got, _ = rig.handle(talk_kw={"response_bytes": WRONG}, remote_ip=ip)
        assert len(got) == SALT_LEN
        assert rig.entry(ip.encode()).strikes == strikes


def test_a_lock_runs_out_after_lockout_expire(rig: Rig):
    rig.write_config("LOCKOUT_EXPIRE=100", MAX_BAD_CONNS="3")
    now = int(time.time())
    put_entry(rig, b"127.0.0.1", 3, now - 1000, age=1000)
    put_entry(rig, b"127.0.0.2", 3, now - 10, age=10)
    assert rig.handle(OPEN, remote_ip="127.0.0.2") == (b"", 0)
    got, rc = rig.handle(OPEN, remote_ip="127.0.0.1")
    assert (len(got), rc) == (SALT_LEN, 0)
    assert rig.wait_runs("open") == ["127.0.0.1"]
    assert rig.entry(b"127.0.0.1").locked_since == 0


def test_fifty_parallel_bad_connections_get_at_most_max_bad_conns_salts(rig: Rig):
    rig.action("lockout")
    rig.write_config(f'LOCKOUT_ACTION="","{rig.bin}/lockout"', MAX_BAD_CONNS="3", COMM_TIMEOUT="5")
    start = threading.Barrier(50)

    def attack(_):
        start.wait()
        return srv_ref.knock(response_bytes=WRONG, timeout=30)

    with TcpServer(rig, limit=60) as srv_ref:
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(attack, range(50)))
        wait_for(lambda: srv_ref.ended() >= 50, 30, "fifty handlers to exit")
    salts = [r for r in results if r]
    assert all(len(r) == SALT_LEN for r in salts)
    assert len(salts) == 3, f"{len(salts)} salts went out"
    assert rig.wait_runs("lockout") == ["127.0.0.1"]
    wait_quiet(rig.cfg)
    assert rig.runs("lockout") == ["127.0.0.1"]
    entry = rig.entry()
    assert entry.locked_since > 0 and entry.strikes == 3


def journal_size(store: Store) -> int:
    return os.path.getsize(store.journal)


def compaction_point(store: Store) -> int:
    """Grow the journal a record at a time; return its largest size before it was folded."""
    last, n = journal_size(store), 0
    while True:
        with store.lock() as tx:
            tx.put(b"fill%05d" % n, b"1 1 0 1700000000")
        store.compact_due()  # as a handler does once its client is gone
        size = journal_size(store)
        if size < last:
            return last
        last, n = size, n + 1


def fill_journal(store: Store, target: int) -> None:
    """Add records until the journal is less than 64 bytes short of ``target``."""
    n = 0
    while journal_size(store) < target - 64:
        with store.lock() as tx:
            for _ in range(max(1, (target - journal_size(store)) // 80)):
                tx.put(b"fill%05d" % n, b"1 1 0 1700000000")
                n += 1


def test_the_charge_that_triggers_a_compaction_keeps_its_strike(rig: Rig):
    assert rig.handle(talk_kw={"response_bytes": WRONG}, remote_ip="10.0.0.1")[1] == 0
    store = Store(str(rig.db))
    fill_journal(store, compaction_point(store))
    for n in (1, 2):
        got, rc = rig.handle(talk_kw={"response_bytes": WRONG})
        assert (len(got), rc) == (SALT_LEN, 0)
        assert rig.entry().strikes == n


def test_the_compaction_a_knock_makes_due_runs_after_its_handler_has_exited(rig: Rig):
    """Not before the salt, and not in the handler: its server slot is free meanwhile."""
    store = Store(str(rig.db))
    now = int(time.time())
    with store.lock() as tx:  # enough records that a compaction takes a while
        for i in range(30000):
            tx.put(b"10.9.%d.%d" % (i >> 8, i & 255), b"1 1 0 %d" % now)
    store.compact()
    fill_journal(store, journal_threshold(os.path.getsize(rig.db)))
    gen = store.view().gen
    got, rc = rig.handle(talk_kw={"response_bytes": WRONG}, remote_ip="10.0.0.1")
    assert (len(got), rc) == (SALT_LEN, 0)
    assert store.view().gen == gen  # the handler has exited; its compaction goes on
    wait_for(lambda: store.view().gen == gen + 1, 30, "the detached compaction")
    assert rig.entry("10.0.0.1").strikes == 1 and len(store.view().items()) > 30000


def test_sigkill_during_state_updates_leaves_a_valid_store_and_every_strike(rig: Rig):
    rig.write_config(MAX_BAD_CONNS="1", COMM_TIMEOUT="5")
    h = rig.start(remote_ip="10.0.0.1")
    t0 = time.monotonic()
    assert len(h.client.recv(SALT_LEN, socket.MSG_WAITALL)) == SALT_LEN
    to_salt = time.monotonic() - t0  # how long a handler takes to charge and salt, here, now
    h.client.sendall(WRONG)
    assert read_to_eof(h.client) == b""
    h.client.close()
    assert h.wait() == 0
    store = Store(str(rig.db))
    fold_at = compaction_point(store)
    rng = random.Random(20240602)
    salted = []
    for i in range(30):
        fill_journal(store, fold_at)  # the next charge compacts: a longer window to die in
        ip = f"10.1.{i}.1"
        h = rig.start(remote_ip=ip)
        h.client.sendall(WRONG)  # answered before asked: fail() writes too
        time.sleep(rng.uniform(0.5, 1.5) * to_salt)
        h.proc.send_signal(signal.SIGKILL)
        h.proc.wait()
        h.client.settimeout(5)
        got = read_to_eof(h.client)
        h.client.close()
        if len(got) == SALT_LEN:
            salted.append(ip)
    view = store.view()
    items = view.items()  # every record parses
    for ip in salted:
        entry = Entry(view.get(ip.encode()))
        assert entry.strikes >= 1, f"{ip} got a salt but has no strike"
    for key, value in items.items():
        if not key.startswith((b"!", b"fill")):
            Entry(value)
    assert 0 < len(salted) < 30, "the kills should land both before and after the salt"
    for ip in salted[:3]:  # a strike is a strike: locked out now
        assert rig.handle(OPEN, remote_ip=ip)[0] == b""
    got, rc = rig.handle(OPEN, remote_ip="10.2.0.1")
    assert (len(got), rc) == (SALT_LEN, 0)
    assert rig.wait_runs("open") == ["10.2.0.1"]


# -- a broken store refuses everyone -------------------------------------------


def seed_store(rig: Rig) -> None:
    """Leave records for 127.0.0.1 and 10.0.0.1 in the snapshot-plus-journal store."""
    for ip in ("127.0.0.1", "10.0.0.1"):
        assert len(rig.handle(talk_kw={"response_bytes": WRONG}, remote_ip=ip)[0]) == SALT_LEN


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_store_refuses_everyone_loudly_and_is_left_alone(rig: Rig, how):
    seed_store(rig)
    CORRUPTIONS[how](rig.db)
    before = {p.name: p.read_bytes() for p in rig.state.iterdir()}
    for ip in ("127.0.0.1", "10.0.0.1", "10.9.9.9"):
        got, rc = rig.handle(OPEN, remote_ip=ip)
        assert (got, rc) == (b"", 111), ip
    alerts = [x for x in rig.lines() if x.startswith("ostiary-handle: alert: ") and "corrupt" in x]
    assert len(alerts) == 3
    assert rig.runs("open") == []
    after = {p.name: p.read_bytes() for p in rig.state.iterdir()}
    assert after == before  # never silently reset


@pytest.mark.parametrize("secret", [OPEN, KILL], ids=["action", "kill"])
def test_store_corrupted_during_the_exchange_runs_nothing(rig: Rig, secret):
    """The store breaks after the salt went out: the right answer still runs nothing."""
    service, env = rig.fake_supervise()
    seed_store(rig)
    h = rig.start(env=env)

    def corrupt_then_answer(salt: bytes) -> bytes:
        CORRUPTIONS["cdb header garbage"](rig.db)
        return response(secret, salt)

    assert len(h.talk(answer=corrupt_then_answer)) == SALT_LEN
    assert h.wait() == 111
    alerts = [x for x in rig.lines() if x.startswith("ostiary-handle: alert: ") and "corrupt" in x]
    assert len(alerts) == 1, rig.lines()
    assert rig.runs("open") == []
    if secret == KILL:  # the store could not record KILL: supervise still takes it down
        assert rig.control_commands() == b"d"
        assert (service / "down").exists()
    else:
        assert rig.control_commands() == b""


def test_torn_journal_tail_loses_no_later_strike(rig: Rig):
    seed_store(rig)
    with open(journal(rig.db), "ab") as f:  # a power cut mid-line (or a short write on a full disk)
        f.write(b"0badc0de 10.7.7.7 1 1 0 17")
    assert len(rig.handle(talk_kw={"response_bytes": WRONG})[0]) == SALT_LEN
    assert rig.entry().strikes == 2
    rig.store_view().items()


def test_missing_state_directory_is_a_clear_fatal(rig: Rig):
    rig.write_config(db=rig.root / "nowhere" / "lockout.cdb")
    got, rc = rig.handle(OPEN)
    assert (got, rc) == (b"", 111)
    fatal = [x for x in rig.lines() if x.startswith("ostiary-handle: fatal: ")]
    assert len(fatal) == 1
    assert f"{rig.root}/nowhere" in fatal[0] and "does not exist" in fatal[0]
    assert not (rig.root / "nowhere").exists()
    assert rig.runs("open") == []


# -- KILL and the stopped state --------------------------------------------------


def revive(rig: Rig) -> None:
    """What an operator does: ``ostiary-lockout -c FILE revive``."""
    subprocess.run(
        [project_tool("ostiary-lockout"), "-c", str(rig.cfg), "revive"],
        check=True,
        capture_output=True,
        timeout=30,
    )


def test_kill_stops_the_service_until_revived(rig: Rig):
    with TcpServer(rig) as srv:
        assert len(srv.knock(KILL)) == SALT_LEN
        rig.wait_log("127.0.0.1 proved KILL")
        for source in ("127.0.0.1", "127.0.0.3", "127.0.0.1"):
            assert srv.knock(OPEN, source=source) == b""
        wait_for(lambda: srv.ended() == 4, 10, "handlers to exit")
    assert rig.runs("open") == []
    assert rig.store_view().get(STOPPED) is not None
    revive(rig)
    assert rig.store_view().get(STOPPED) is None
    got, rc = rig.handle(OPEN)
    assert (len(got), rc) == (SALT_LEN, 0)
    assert rig.wait_runs("open") == ["127.0.0.1"]


def test_kill_under_daemontools_marks_the_service_down(rig: Rig):
    service, env = rig.fake_supervise()
    got, rc = rig.handle(KILL, env=env)
    assert (len(got), rc) == (SALT_LEN, 0)
    assert (service / "down").exists()
    assert rig.control_commands() == b"d"
    rig.wait_log(f"{service}: supervise told to take the service down")


def test_kill_without_supervise_still_marks_the_service_down_and_says_so(rig: Rig):
    service, env = rig.fake_supervise()
    rig.stop_supervise()
    got, rc = rig.handle(KILL, env=env)
    assert (len(got), rc) == (SALT_LEN, 0)
    assert (service / "down").exists()
    line = rig.wait_log(
        f"unable to take {service} down: {service}/supervise/control: supervise is not running"
    )
    assert line[0].startswith("ostiary-handle: error: ")
    assert not any("supervise told" in x for x in rig.lines())
    assert rig.store_view().get(STOPPED) is not None


def stopped_reason(rig: Rig) -> str:
    return rig.store_view().get(STOPPED).decode()


def test_max_single_errs_stops_the_service(rig: Rig):
    service, env = rig.fake_supervise()
    rig.write_config(MAX_BAD_CONNS="10", MAX_SINGLE_ERRS="2")
    for _ in range(3):
        got, _ = rig.handle(talk_kw={"response_bytes": WRONG}, env=env)
        assert len(got) == SALT_LEN
    alert = rig.wait_log("service stopped: 127.0.0.1 passed MAX_SINGLE_ERRS")
    assert alert[0].startswith("ostiary-handle: alert: ")
    assert "MAX_SINGLE_ERRS" in stopped_reason(rig)
    assert (service / "down").exists()
    assert rig.handle(OPEN, remote_ip="10.3.3.3", env=env) == (b"", 0)
    assert rig.runs("open") == []


def test_max_total_errs_stops_the_service(rig: Rig):
    rig.write_config(MAX_BAD_CONNS="10", MAX_TOTAL_ERRS="2")
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert len(rig.handle(talk_kw={"response_bytes": WRONG}, remote_ip=ip)[0]) == SALT_LEN
    alert = rig.wait_log("MAX_TOTAL_ERRS")
    assert alert[0].startswith("ostiary-handle: alert: service stopped: ")
    assert "MAX_TOTAL_ERRS" in stopped_reason(rig)
    assert rig.handle(OPEN, remote_ip="10.0.0.4") == (b"", 0)


def test_exit_on_ipcache_full_stops_the_service(rig: Rig):
    service, env = rig.fake_supervise()
    rig.write_config("EXIT_ON_IPCACHE_FULL", "IPCACHE_SIZE=2", MIN_LOGLEVEL="LOG_NOTICE")
    for ip in ("10.0.0.1", "10.0.0.2"):
        assert len(rig.handle(talk_kw={"response_bytes": WRONG}, remote_ip=ip)[0]) == SALT_LEN
    assert rig.handle(OPEN, remote_ip="10.0.0.3", env=env) == (b"", 0)
    alert = rig.wait_log("EXIT_ON_IPCACHE_FULL")
    assert alert[0].startswith("ostiary-handle: alert: service stopped: ")
    assert "address table full" in stopped_reason(rig)
    assert (service / "down").exists()
    assert rig.handle(OPEN, remote_ip="10.0.0.1") == (b"", 0)  # everyone, known or not
    assert rig.runs("open") == []


# -- the client's address ----------------------------------------------------------


def test_tcpremoteip_wins_over_getpeername(rig: Rig):
    got, _ = rig.handle(OPEN, remote_ip="10.20.30.40")
    assert len(got) == SALT_LEN
    assert rig.wait_runs("open") == ["10.20.30.40"]


def test_without_tcpremoteip_the_address_comes_from_getpeername(rig: Rig):
    got, _ = rig.handle(OPEN, remote_ip=None)
    assert len(got) == SALT_LEN
    assert rig.wait_runs("open") == ["127.0.0.1"]


@pytest.mark.parametrize("remote_ip", [None, "::1"])
def test_ipv6(rig: Rig, remote_ip):
    got, _ = rig.handle(OPEN, remote_ip=remote_ip, listen_host="::1")
    assert len(got) == SALT_LEN
    assert rig.wait_runs("open") == ["::1"]
    got, _ = rig.handle(talk_kw={"response_bytes": WRONG}, remote_ip=remote_ip, listen_host="::1")
    assert len(got) == SALT_LEN
    assert rig.entry(b"::/64").strikes == 1
    assert rig.entry(b"127.0.0.1").strikes == 0


@pytest.mark.parametrize("remote_ip", [None, "::ffff:127.0.0.1", "::FFFF:7f00:1"])
def test_ipv4_mapped_ipv6_is_ipv4(rig: Rig, remote_ip):
    mapped = {"remote_ip": remote_ip, "listen_host": "::", "connect_host": "127.0.0.1"}
    got, _ = rig.handle(OPEN, **mapped)
    assert len(got) == SALT_LEN
    assert rig.wait_runs("open") == ["127.0.0.1"]  # the action gets a dotted quad
    for kw in (mapped, mapped, {"remote_ip": "127.0.0.1"}):
        assert len(rig.handle(talk_kw={"response_bytes": WRONG}, **kw)[0]) == SALT_LEN
    assert rig.entry(b"127.0.0.1").strikes == 3
    assert rig.handle(OPEN, **mapped) == (b"", 0)  # one lockout for both spellings
    assert rig.handle(OPEN, remote_ip="127.0.0.1") == (b"", 0)


def run_on(rig: Rig, fd0, fd1, env=None) -> int:
    with open(rig.log, "ab") as log:
        return subprocess.run(
            rig.argv(), stdin=fd0, stdout=fd1, stderr=log, env=rig.env(env), timeout=30
        ).returncode


@pytest.mark.parametrize("how", ["unix socket", "pipe", "bad TCPREMOTEIP"])
def test_no_client_address_means_closed_and_nothing_runs(rig: Rig, how):
    if how == "pipe":
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        os.write(w_in, b"x" * 32)
        rc = run_on(rig, r_in, w_out)
        os.close(w_out)
        got = os.read(r_out, 100)
        for fd in (r_in, w_in, r_out):
            os.close(fd)
    else:
        if how == "unix socket":
            ours, theirs = socket.socketpair()
            env = None
        else:
            ours, theirs = tcp_pair()
            env = {"TCPREMOTEIP": "not-an-address"}
        rc = run_on(rig, theirs, theirs, env)
        theirs.close()
        ours.settimeout(5)
        got = read_to_eof(ours)
        ours.close()
    assert (got, rc) == (b"", 111)
    errors = [x for x in rig.lines() if x.startswith("ostiary-handle: error: ")]
    assert len(errors) == 1 and "closed" in errors[0]
    assert rig.store_view() is None  # nobody was charged
    assert rig.runs("open") == []


# -- inetd: the socket on 0, 1 and 2 -----------------------------------------------


def test_inetd_puts_nothing_but_the_salt_on_the_wire(rig: Rig):
    rig.write_config(MIN_LOGLEVEL="LOG_DEBUG")
    h = rig.start(inetd=True)
    salt = h.client.recv(SALT_LEN, socket.MSG_WAITALL)
    h.client.sendall(response(OPEN, salt))
    assert h.wait() == 0
    assert rig.wait_runs("open") == ["127.0.0.1"]  # it talked on stdout and stderr
    h.client.settimeout(5)
    assert salt + read_to_eof(h.client) == salt
    h.client.close()
    assert len(salt) == SALT_LEN


def test_inetd_logs_one_line_per_event_to_syslog(rig: Rig):
    import syslog

    rig.write_config(MIN_LOGLEVEL="LOG_DEBUG")
    h = rig.start(inetd=True, fake_syslog=True)
    assert len(h.talk(OPEN)) == SALT_LEN
    assert h.wait() == 0
    rig.wait_runs("open")
    wait_for(lambda: "finished: exit 0" in rig.syslog.read_text(), 10, "the action's last line")
    lines = rig.syslog.read_text().splitlines()
    assert lines[0] == f"openlog ostiary-handle {syslog.LOG_PID} {syslog.LOG_AUTH}"
    events = [x.split(" ", 1) for x in lines[1:]]
    assert {int(p) for p, _ in events} <= {syslog.LOG_DEBUG, syslog.LOG_INFO, syslog.LOG_NOTICE}
    texts = [t for _, t in events]
    assert all(t.startswith("127.0.0.1 ") for t in texts), texts
    assert any("says hello to 127.0.0.1" in t for t in texts)  # action output too
    assert rig.log_text() == ""
    for secret in (KILL, OPEN):
        assert secret.decode() not in rig.syslog.read_text()


def test_inetd_config_error_goes_to_syslog(rig: Rig):
    import syslog

    rig.cfg.write_text(rig.cfg.read_text() + "NO_SUCH_KEY=1\n")
    h = rig.start(inetd=True, fake_syslog=True)
    assert (h.talk(OPEN), h.wait()) == (b"", 111)
    lines = rig.syslog.read_text().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith(f"{syslog.LOG_CRIT} ostiary.cfg:") or lines[1].startswith(
        f"{syslog.LOG_CRIT} {rig.cfg}:"
    )
    assert "unknown key" in lines[1]


@pytest.mark.parametrize(
    "case", ["wrong", "config error", "usage error", "locked out", "corrupt store"]
)
def test_inetd_errors_put_nothing_on_the_wire(rig: Rig, case):
    rig.write_config(MIN_LOGLEVEL="LOG_DEBUG", MAX_BAD_CONNS="1")
    args: tuple[str, ...] = ()
    expect = (SALT_LEN, 0)
    if case == "config error":
        rig.cfg.write_text(rig.cfg.read_text() + "NO_SUCH_KEY=1\n")
        expect = (0, 111)
    elif case == "usage error":
        args, expect = ("--no-such-option",), (0, 100)
    elif case == "locked out":
        rig.handle(talk_kw={"response_bytes": WRONG})
        expect = (0, 0)
    elif case == "corrupt store":
        rig.handle(talk_kw={"response_bytes": WRONG})
        os.truncate(rig.db, 10)
        expect = (0, 111)
    h = rig.start(*args, inetd=True)
    got = h.talk(response_bytes=WRONG)
    assert (len(got), h.wait()) == expect


# -- logging ---------------------------------------------------------------------


def test_log_is_one_plain_line_per_event_naming_the_address(rig: Rig):
    rig.action("lockout")
    rig.write_config(
        f'LOCKOUT_ACTION="","{rig.bin}/lockout"', MAX_BAD_CONNS="1", MIN_LOGLEVEL="LOG_DEBUG"
    )
    rig.handle(OPEN, remote_ip="10.0.0.1")
    rig.handle(talk_kw={"response_bytes": WRONG}, remote_ip="10.0.0.2")
    rig.handle(OPEN, remote_ip="10.0.0.2")
    rig.wait_runs("open")
    rig.wait_runs("lockout")
    rig.wait_log("lockout action", 2)
    lines = rig.log_text().splitlines()
    assert len(lines) >= 10
    for line in lines:
        assert LINE.match(line), line
        assert not re.search(r"\d\d:\d\d:\d\d|\d{4}-\d\d-\d\d|@4000", line), line
        assert "10.0.0.1" in line or "10.0.0.2" in line, line
    assert any("10.0.0.2 closed at once: locked out" in x for x in lines)


@pytest.mark.parametrize(
    "level, allowed",
    [
        ("LOG_ERR", {"fatal", "alert", "error"}),
        ("LOG_NOTICE", {"fatal", "alert", "error", "warning", "notice"}),
    ],
)
def test_min_loglevel_is_honoured(rig: Rig, level, allowed):
    rig.action("bad", code=3)
    rig.write_config(f'ACTION="bad-action-pass","{rig.bin}/bad"', MIN_LOGLEVEL=level)
    rig.handle(OPEN)
    rig.handle(b"bad-action-pass")
    rig.handle(talk_kw={"response_bytes": WRONG})
    rig.handle(KILL)
    rig.wait_runs("open")
    rig.wait_runs("bad")
    rig.wait_log("finished: exit 3")  # an error: logged at both levels
    assert rig.wait_log("proved KILL")[0].startswith("ostiary-handle: alert: ")  # and a stop
    wait_quiet(rig.cfg)
    levels = {x.split(": ")[1] for x in rig.lines()}
    assert levels and levels <= allowed, levels
    if level == "LOG_NOTICE":
        assert "notice" in levels
        assert not any("says hello" in x for x in rig.lines())  # action output is info


def test_passphrases_never_reach_the_log(rig: Rig):
    rig.action("lockout")
    rig.write_config(
        f'LOCKOUT_ACTION="lockout-field-pass","{rig.bin}/lockout"',
        MIN_LOGLEVEL="LOG_DEBUG",
        MAX_BAD_CONNS="2",
    )
    rig.handle(OPEN)
    rig.handle(b"not-the-passphrase")
    rig.handle(b"lockout-field-pass")
    rig.handle(KILL, remote_ip="10.0.0.9")
    rig.wait_runs("open")
    rig.wait_runs("lockout")
    text = rig.log_text()
    assert "proved KILL" in text and "salt" in text
    for secret in (KILL, OPEN, b"not-the-passphrase", b"lockout-field-pass"):
        assert secret.decode() not in text
        assert secret.hex() not in text


def test_hashes_only_at_log_debug(rig: Rig):
    seen = []

    def answer(salt):
        seen.append((salt, response(OPEN, salt)))
        return seen[-1][1]

    for level in ("LOG_INFO", "LOG_DEBUG"):
        rig.write_config(MIN_LOGLEVEL=level)
        rig.handle(talk_kw={"answer": answer})
        rig.wait_runs("open", len(seen))
        salt, resp = seen[-1]
        text = rig.log_text()
        assert (salt.hex() in text) == (level == "LOG_DEBUG")
        assert (resp.hex() in text) == (level == "LOG_DEBUG")
