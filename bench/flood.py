#!/usr/bin/env python3
"""A flood of fresh IPv6 prefixes from one attacker's /32, while a rightful client knocks.

The store, config and code are the shipped example's (examples/ostiary.cfg,
its STRIKE_EXPIRE and LOCKOUT_EXPIRE defaults); only LOCKOUT_DB points into
a scratch directory. In-process, not through sockets, so that ten million
attempts take minutes:

  flooders  --flooders processes, each making its share of the attempts the
            way ostiary-handle does with a wrong response and DELAY=0:
            handle.admit() (the lock-free look, then the charge), policy.fail(),
            then Store.compact_due() once "its client is gone". Attempt i
            is the /64 2001:db8:AABB:CCDD::/64, first over a tree of 16
            children a level (the order that makes the most records before
            each prefix locks), then in random order over the whole /32.
  knocker   one process knocking from 192.0.2.10 every --every ms: the time
            of handle.admit() is its time to salt; then policy.succeed(), as
            for a right response.

The baseline, measured in the same run: the knocker's time to salt on the
empty store, with no flood. At each checkpoint (--sizes attempted
prefixes) the flood pauses and the bench records the store's bytes and
records, then runs the operator's commands (ostiary-lockout list, export,
prune) and the real handler (a flooded /64, locked out; and 192.0.2.10)
and takes their peak RSS. The largest RSS of every process (flooders
included, with the compactions they ran) is printed.

Goals (issue 14): p99 time to salt under 50 ms at every size; no process
over 64 MiB; the store under 64 MiB (policy.py's bound: 69,905 records).

Usage: python3 bench/flood.py [--dir DIR] [--sizes 1000000,4000000,10000000]
       [--flooders 2] [--every 10]
"""

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ostiary_ucspi.address import key as address_key  # noqa: E402
from ostiary_ucspi.config import load  # noqa: E402
from ostiary_ucspi.handle import admit  # noqa: E402
from ostiary_ucspi.policy import fail, pruner, succeed  # noqa: E402
from ostiary_ucspi.store import Store  # noqa: E402

LEGIT = "192.0.2.10"
TREE = 16**4  # the first attempts: a tree of 16 children a level


def prefix(i: int, shuffle: int) -> str:
    """Return attempt ``i``'s address: the tree first, then the /32 in a fixed random order."""
    if i < TREE:
        a, b, c, d = (i >> 12) & 15, (i >> 8) & 15, (i >> 4) & 15, i & 15
    else:
        n = (i * shuffle) & 0xFFFFFFFF  # odd multiplier: a permutation of the /32's /64s
        a, b, c, d = n >> 24, (n >> 16) & 255, (n >> 8) & 255, n & 255
    return "2001:db8:%02x%02x:%02x%02x::1" % (a, b, c, d)


def flood(cfg_path: str, start: int, stop: int, step: int, shuffle: int) -> None:
    """Make attempts start, start+step, ... below stop, as handlers would."""
    cfg = load(cfg_path)
    for i in range(start, stop, step):
        now = int(time.time())
        store = Store(cfg.lockout_db, prune=pruner(cfg, now), editor=cfg.editor)
        key = address_key(prefix(i, shuffle), cfg.ipv6_prefix)
        _, charged = admit(cfg, store, key, now)
        if charged.refused is None:
            fail(store, key, cfg, now)
        store.compact_due()


def knock(cfg_path: str, every: float, wfd: int) -> None:
    """Knock rightly every ``every`` seconds until SIGTERM; write each time to salt (ns)."""
    cfg = load(cfg_path)
    key = address_key(LEGIT)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        now = int(time.time())
        store = Store(cfg.lockout_db, prune=pruner(cfg, now), editor=cfg.editor)
        t = time.perf_counter_ns()
        _, charged = admit(cfg, store, key, now)
        took = time.perf_counter_ns() - t
        if charged.refused is not None:
            raise SystemExit(f"the rightful client was refused: {charged.refused}")
        succeed(store, key)
        store.compact_due()
        os.write(wfd, b"%d\n" % took)
        time.sleep(every)


def spawn(fn, *args) -> int:
    """Run ``fn(*args)`` in a child; return its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except BaseException as e:  # a bench: say what went wrong, then exit
            print(f"flood: {fn.__name__}: {e}", file=sys.stderr)
            code = 1
        os._exit(code)
    return pid


def reap(pid: int, peaks: dict[str, int], name: str) -> None:
    """Wait for ``pid``; record its peak RSS (KiB) under ``name``."""
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{name} failed (status {status})")
    peaks[name] = max(peaks.get(name, 0), usage.ru_maxrss)


def run(argv: list[str], peaks: dict[str, int], name: str, **kw) -> bytes:
    """Run a program; record its peak RSS; return its output."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, **kw)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    peaks[name] = max(peaks.get(name, 0), usage.ru_maxrss)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} exited {os.waitstatus_to_exitcode(status)}")
    return out


def programs(cfg_path: str, peaks: dict[str, int], flooded: str) -> None:
    """Run the operator's commands and the real handler once each; record their peaks."""
    bindir = os.path.dirname(sys.executable)
    lockout = os.path.join(bindir, "ostiary-lockout")
    handle = os.path.join(bindir, "ostiary-handle")
    for command in ("list", "export", "prune"):
        run([lockout, "-c", cfg_path, command], peaks, f"ostiary-lockout {command}")
    fresh = "198.51.100.%d" % random.randrange(256)  # not the knocker's: this one fails
    for ip, name in ((flooded, "handler, flooded /64"), (fresh, "handler, fresh IPv4 address")):
        env = {"TCPREMOTEIP": ip, "PATH": "/usr/bin:/bin"}
        run(
            [handle, "-c", cfg_path],
            peaks,
            name,
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def quantile(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))] / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="scratch directory (default: a new one under /var/tmp)")
    ap.add_argument("--sizes", default="1000000,4000000,10000000")
    ap.add_argument("--flooders", type=int, default=2)
    ap.add_argument("--every", type=float, default=10.0, help="ms between rightful knocks")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="ostiary-flood-", dir=args.dir or "/var/tmp")
    try:
        with open(os.path.join(REPO, "examples", "ostiary.cfg")) as f:
            lines = [
                f"LOCKOUT_DB={work}/lockout.cdb" if line.startswith("LOCKOUT_DB=") else line
                for line in f.read().splitlines()
            ]
        cfg_path = os.path.join(work, "ostiary.cfg")
        with open(cfg_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(cfg_path, 0o600)
        db = os.path.join(work, "lockout.cdb")
        shuffle = random.Random(14).randrange(1, 1 << 32) | 1
        peaks: dict[str, int] = {}

        def knocking(seconds: float | None, flood_to: tuple[int, int] | None) -> list[int]:
            rfd, wfd = os.pipe()
            knocker = spawn(knock, cfg_path, args.every / 1000, wfd)
            os.close(wfd)
            if flood_to is None:
                time.sleep(seconds or 0)
            else:
                pids = [
                    spawn(flood, cfg_path, flood_to[0] + w, flood_to[1], args.flooders, shuffle)
                    for w in range(args.flooders)
                ]
                for pid in pids:
                    reap(pid, peaks, "flooder (with its compactions)")
            os.kill(knocker, signal.SIGTERM)
            with os.fdopen(rfd, "rb") as r:
                times = [int(t) for t in r.read().split()]
            reap(knocker, peaks, "knocker")
            return times

        base = knocking(5.0, None)
        print(
            f"flood: examples/ostiary.cfg, {args.flooders} flooders, a rightful knock every "
            f"{args.every:g} ms; store in {work}"
        )
        print(
            f"baseline (empty store, no flood): time to salt median {quantile(base, 0.5):.2f} ms, "
            f"p99 {quantile(base, 0.99):.2f} ms, {len(base)} knocks"
        )
        print(
            f"{'attempted':>10}  {'wall s':>7}  {'attempts/s':>10}  {'knocks':>6}  "
            f"{'median ms':>9}  {'p99 ms':>7}  {'p99/base':>8}  {'max ms':>7}  "
            f"{'records':>7}  {'store bytes':>11}"
        )
        done = 0
        for size in sizes:
            t = time.monotonic()
            times = knocking(None, (done, size))
            wall = time.monotonic() - t
            view = Store(db).view()
            records = view.count()
            programs(cfg_path, peaks, prefix(done, shuffle))
            print(
                f"{size:>10}  {wall:>7.1f}  {(size - done) / wall:>10.0f}  {len(times):>6}  "
                f"{quantile(times, 0.5):>9.2f}  {quantile(times, 0.99):>7.2f}  "
                f"{quantile(times, 0.99) / quantile(base, 0.99):>8.2f}x  "
                f"{max(times) / 1e6:>7.2f}  {records:>7}  {view.size():>11}"
            )
            done = size
        print("peak RSS (KiB, ru_maxrss):")
        for name, kib in sorted(peaks.items(), key=lambda kv: -kv[1]):
            print(f"  {kib:>8}  {name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
