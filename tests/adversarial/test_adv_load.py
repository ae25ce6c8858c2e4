"""Adversarial: 500 connections, 50 at a time, through real tcpserver and through the shim.

A shuffled mix of valid clients, wrong answers, silent clients, slow drippers
and hammering addresses (five wrong answers each, MAX_BAD_CONNS=3), each
client from a loopback address of its own kind. Afterwards: every valid
client's action ran exactly once, every failure was charged to its address,
every hammering address was locked once and its LOCKOUT_ACTION ran once, no
client got anything but a salt, the server has no zombie children and no more
descriptors than before, no handler is left COMM_TIMEOUT + DELAY + 2 seconds
after the last client, and the store reads back consistent.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from kit.procs import descriptors, handlers_alive, wait_for, wait_quiet, zombies
from kit.servers import TRACEBACK, Server
from kit.site import SECRETS, Site
from kit.wire import SALT_LEN, connect, peer_may_close, read_to_eof, recv_exact, response

from adversarial.adv_tally import figure
from ostiary_ucspi.policy import ERRORS, Entry

COMM_TIMEOUT, DELAY, MAX_BAD = 1, 0, 3
MIX = {"valid": 200, "wrong": 150, "silent": 50, "slow": 40}
HAMMERS, HAMMER_TRIES = 12, 5  # 60 more connections: 500 in all
NETS = {"valid": 100, "wrong": 101, "silent": 102, "slow": 103, "hammer": 104}


def plan(seed: int) -> list[tuple[str, str, str | None]]:
    """The shuffled list of (kind, source address, action name) for 500 clients."""
    rng = random.Random(seed)
    clients = []
    for kind, n in MIX.items():
        for i in range(n):
            ip = f"127.{NETS[kind]}.{i // 250}.{i % 250 + 1}"
            clients.append((kind, ip, rng.choice(list(SECRETS)) if kind == "valid" else None))
    for i in range(HAMMERS):
        clients += [("hammer", f"127.{NETS['hammer']}.0.{i + 1}", None)] * HAMMER_TRIES
    rng.shuffle(clients)
    return clients


def play(port: int, kind: str, ip: str, action: str | None) -> bytes:
    """One client of ``kind``; returns every byte the server sent."""
    with connect(port, ip, timeout=30) as sock:
        salt = recv_exact(sock, SALT_LEN)
        if len(salt) < SALT_LEN:
            return salt
        with peer_may_close():
            if kind == "valid":
                sock.sendall(response(SECRETS[action], salt))
            elif kind in ("wrong", "hammer"):
                sock.sendall(os.urandom(SALT_LEN))
            elif kind == "slow":  # the right answer, far too slowly: cut at COMM_TIMEOUT
                answer = response(SECRETS["open"], salt)
                for i in range(SALT_LEN):
                    sock.sendall(answer[i : i + 1])
                    time.sleep(0.25)
            if kind != "silent":
                sock.shutdown(socket.SHUT_WR)
        return salt + read_to_eof(sock)


@pytest.mark.parametrize("kind", ["tcpserver", "ostiary-tcpserver", "ostiary-tcpserver -F"])
def test_five_hundred_mixed_connections(kind, pytestconfig, tally):
    site = Site()
    site.config(
        COMM_TIMEOUT=str(COMM_TIMEOUT),
        DELAY=str(DELAY),
        MAX_BAD_CONNS=str(MAX_BAD),
        MIN_LOGLEVEL="LOG_NOTICE",
    )
    clients = plan(seed=500)
    assert len(clients) == 500
    try:
        with Server(site, kind, limit=60, backlog=256, tally=tally) as srv:
            # Warm up, then take the server's descriptors as the baseline.
            assert len(play(srv.port, "wrong", "127.105.0.1", None)) == SALT_LEN
            wait_for(lambda: not handlers_alive(site.cfg)[0], 15, "the warm-up handler to exit")
            fds_before = descriptors(srv.proc.pid)

            t0 = time.monotonic()
            with ThreadPoolExecutor(50) as pool:
                got = list(pool.map(lambda c: play(srv.port, *c), clients))
            t_clients = time.monotonic()

            # No handler outlives its deadline (detached action runners are not handlers).
            wait_for(
                lambda: not handlers_alive(site.cfg)[0],
                COMM_TIMEOUT + DELAY + 2,
                "every handler to exit",
            )
            # A child that just exited is a zombie until the server reaps it: give it a moment.
            wait_for(lambda: zombies(srv.proc.pid) == [], 2, "the server to reap every handler")
            fds_after = descriptors(srv.proc.pid)
            leaked = sorted(set(fds_after) ^ set(fds_before))
            assert leaked == [], leaked
            valid = [(ip, a) for k, ip, a in clients if k == "valid"]
            wait_for(
                lambda: sum(len(site.runs(a)) for a in SECRETS) >= len(valid),
                30,
                "every valid client's action",
            )
            wait_for(lambda: len(site.runs("lockout")) >= HAMMERS, 10, "the lockout actions")
            wait_quiet(site.cfg)
            elapsed = t_clients - t0
            log = srv.snapshot()
    finally:
        crashed = [x for _, x in srv.snapshot() if TRACEBACK.search(x)] if "srv" in locals() else []
        site_runs = site.all_runs()
        view = site.view()
        site.remove()

    assert crashed == []
    # The wire: a salt and nothing else, or nothing (a locked-out hammer).
    by_kind = Counter()
    for (k, ip, _), data in zip(clients, got):
        assert data in (b"",) or len(data) == SALT_LEN, (k, ip, data)
        by_kind[k, bool(data)] += 1
    assert by_kind["hammer", True] == HAMMERS * MAX_BAD  # exactly MAX_BAD_CONNS salts each
    assert by_kind["hammer", False] == HAMMERS * (HAMMER_TRIES - MAX_BAD)
    for k in MIX:
        assert by_kind[k, False] == 0, k

    # Every valid client's action ran exactly once, as itself, and nothing else ran.
    false_positives = ran_total = 0
    for name in SECRETS:
        ran = Counter(r[1] for r in site_runs[name])
        due = Counter(ip for ip, a in valid if a == name)
        false_positives += sum((ran - due).values())
        ran_total += sum(ran.values())
        assert ran == due, name
        assert len({r[2] for r in site_runs[name]}) == len(site_runs[name])  # distinct runs
    hammer_ips = {ip for k, ip, _ in clients if k == "hammer"}
    assert Counter(r[1] for r in site_runs["lockout"]) == Counter({ip: 1 for ip in hammer_ips})

    # The store: consistent, every failure charged, successes refunded.
    items = view.items()
    for k, ip, _ in set(clients):
        e = Entry(items.get(ip.encode()))
        if k == "valid":
            assert ip.encode() not in items
        elif k == "hammer":
            assert (e.strikes, e.errors) == (MAX_BAD, MAX_BAD) and e.locked_since
        else:
            assert (e.strikes, e.errors, e.locked_since) == (1, 1, 0), (k, ip)
    failures = sum(n for k, n in MIX.items() if k != "valid") + HAMMERS * MAX_BAD
    charged = int(items[ERRORS]) - 1  # the warm-up's
    assert charged == failures

    ends = [x for _, x in log if x.startswith("tcpserver: end ")]
    if kind == "tcpserver":
        assert len(ends) == 501 and all(x.endswith(" status 0") for x in ends)
    mix = ", ".join(f"{n} {k}" for k, n in MIX.items())
    figure(
        pytestconfig,
        f"load via {kind}: {len(clients)} connections ({mix}, "
        f"{HAMMERS * HAMMER_TRIES} from {HAMMERS} hammering addresses) in {elapsed:.1f}s, "
        f"50 at a time: {ran_total} actions ran once each, {charged} failures charged, "
        f"{len(site_runs['lockout'])} lockouts, 0 zombies, {len(leaked)} leaked descriptors, "
        f"{len(crashed)} crashes, {false_positives} false positives",
    )
