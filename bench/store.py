#!/usr/bin/env python3
"""Cost of the lockout store per connection at 1k, 10k and 100k tracked addresses.

For each size this builds a store of that many addresses (90% IPv4, 10%
IPv6 /64 prefixes; a fifth of them locked; all seen within the last day, so
none expires), then runs connections the way ostiary-handle does, each with
a fresh Store (a handler is a fresh process; interpreter start-up is
bench/startup.py's business):

  lookup   Store(path).view() + refusal(): map the snapshot, read the
           journal, look up the stopped state and the address
  charge   lockout.charge() of a new address: lock, read, append, fdatasync
  refund   lockout.succeed() of that address

The journal starts empty and grows through its whole range (compactions
included, where they fall), so the figures are those of a store in use.
Then it times one compaction (a rewrite of the whole CDB: what every strike
would cost without the journal) and its peak memory (tracemalloc), and
prints the store's bytes on disk per address: snapshot alone, and with the
journal at its largest. One fdatasync of a journal line on the same
filesystem is timed too: that much of a charge is the disk's.

Goals at 100k: charge and refund median <= 2 ms, lookup median <= 0.5 ms,
<= 100 bytes per address. Python standard library and the project only.

Usage: python3 bench/store.py [--dir DIR] [--sizes 1000,10000,100000] [--connections N]
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ostiary_ucspi.config import parse  # noqa: E402
from ostiary_ucspi.policy import Entry, charge, pruner, refusal, succeed  # noqa: E402
from ostiary_ucspi.store import Store, journal_threshold  # noqa: E402

MS = 1e-6  # nanoseconds to milliseconds


def random_key(rng: random.Random) -> bytes:
    """Return a store key as address_key makes them: IPv4, or an IPv6 /64."""
    if rng.random() < 0.9:
        return b"%d.%d.%d.%d" % (
            rng.randrange(1, 224),
            rng.randrange(256),
            rng.randrange(256),
            rng.randrange(1, 255),
        )
    return b"2001:db8:%x:%x::/64" % (rng.randrange(65536), rng.randrange(65536))


def build(path: str, n: int, now: int, rng: random.Random) -> list[bytes]:
    """Create a store of ``n`` addresses; return their keys."""
    keys: set[bytes] = set()
    while len(keys) < n:
        keys.add(random_key(rng))
    store = Store(path)
    with store.lock() as tx:
        for key in keys:
            entry = Entry()
            entry.last_seen = now - rng.randrange(86400)
            entry.strikes = entry.errors = rng.randrange(1, 3)
            if rng.random() < 0.2:
                entry.strikes = entry.errors = 3
                entry.locked_since = entry.last_seen
            tx.put(key, entry.encode())
    store.compact()
    return sorted(keys)


def fsync_cost(directory: str, runs: int = 200) -> float:
    """Median nanoseconds of appending one journal-sized line and fdatasync."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(runs):
            t = time.perf_counter_ns()
            os.write(fd, b"203.0.113.7 1 1 0 1700000000 0123abcd\n")
            os.fdatasync(fd)
            times.append(time.perf_counter_ns() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return median(times)


def median(xs: list[int]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def p99(xs: list[int]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, (len(s) * 99) // 100)]


def size_on_disk(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + ".journal") if os.path.exists(p))


def run_size(directory: str, n: int, connections: int, cfg, rng: random.Random) -> dict:
    """Measure one store size; return the figures."""
    d = os.path.join(directory, str(n))
    os.mkdir(d)
    path = os.path.join(d, "lockout.cdb")
    now = int(time.time())
    keys = build(path, n, now, rng)
    snapshot = os.path.getsize(path)
    lookups, charges, refunds = [], [], []
    compactions = 0
    for _ in range(connections):
        known = rng.choice(keys)
        t = time.perf_counter_ns()
        refusal(Store(path).view(), known, cfg.max_bad_conns)
        lookups.append(time.perf_counter_ns() - t)
        new = random_key(rng)
        before = os.path.getsize(path + ".journal")
        store = Store(path, prune=pruner(cfg, now))
        t = time.perf_counter_ns()
        charge(store, new, cfg, now)
        charges.append(time.perf_counter_ns() - t)
        t = time.perf_counter_ns()
        succeed(store, new)
        refunds.append(time.perf_counter_ns() - t)
        store.compact_due()  # as the handler does once its client is gone
        compactions += os.path.getsize(path + ".journal") < before
    # One timed compaction of a full journal, then its memory peak.
    store = Store(path, prune=pruner(cfg, now))
    t = time.perf_counter_ns()
    kept = store.compact()
    compact_ns = time.perf_counter_ns() - t
    tracemalloc.start()
    store.compact()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert kept >= n, "addresses expired during the benchmark"
    snapshot = os.path.getsize(path)
    result = {
        "n": n,
        "lookup": lookups,
        "charge": charges,
        "refund": refunds,
        "compactions": compactions,
        "compact_ns": compact_ns,
        "peak": peak,
        "snap_bytes": snapshot / kept,
        "max_bytes": (snapshot + journal_threshold(snapshot)) / kept,
        "journal_max": journal_threshold(snapshot),
    }
    shutil.rmtree(d)
    return result


def filesystem(path: str) -> str:
    """Return the type of the filesystem holding ``path`` (from /proc/mounts)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                mnt, fstype = line.split()[1:3]
                if path.startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, fstype
    except OSError:
        pass
    return kind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dir",
        default="/var/tmp",
        help="where to build the stores (a real disk: tmpfs makes fsync free)",
    )
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    directory = tempfile.mkdtemp(prefix="ostiary-bench-", dir=args.dir)
    cfg = parse('KILL="k"\nACTION="a","/bin/true"\n', "bench.cfg")
    rng = random.Random(args.seed)
    try:
        sync = fsync_cost(directory)
        print(f"lockout store: CDB snapshot + journal; {args.connections} connections per size")
        print(
            f"{directory} on {filesystem(os.path.realpath(directory))}, Python "
            f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}; "
            f"one journal append + fdatasync alone: {sync * MS:.3f} ms median"
        )
        print(
            "times in ms, median / 99th percentile; write mean: charges and refunds with the "
            "compactions they triggered; compaction: one rewrite of the whole CDB"
        )
        print()
        head = (
            f"{'addresses':>9}  {'lookup':>13}  {'charge':>13}  {'refund':>13}  "
            f"{'write mean':>10}  {'compactions':>11}  {'compaction':>10}  {'peak MiB':>8}  "
            f"{'bytes/addr':>10}  {'+journal':>8}  {'journal max':>11}"
        )
        print(head)
        results = []
        for n in sizes:
            r = run_size(directory, n, args.connections, cfg, rng)
            results.append(r)
            cols = [
                f"{median(r[k]) * MS:5.3f} / {p99(r[k]) * MS:5.3f}"
                for k in ("lookup", "charge", "refund")
            ]
            writes = r["charge"] + r["refund"]
            print(
                f"{n:>9}  {cols[0]:>13}  {cols[1]:>13}  {cols[2]:>13}  "
                f"{sum(writes) / len(writes) * MS:>10.3f}  "
                f"{r['compactions']:>11}  {r['compact_ns'] * MS:>10.1f}  "
                f"{r['peak'] / 2**20:>8.1f}  {r['snap_bytes']:>10.1f}  {r['max_bytes']:>8.1f}  "
                f"{r['journal_max'] // 1024:>7} KiB",
                flush=True,
            )
        print()
        first, last = results[0], results[-1]
        for k in ("lookup", "charge", "refund"):
            print(
                f"{k} median at {last['n']} / at {first['n']}: "
                f"{median(last[k]) / median(first[k]):.2f}x"
            )
        print(
            f"a rewrite of the whole CDB at {last['n']} / a journal charge there: "
            f"{last['compact_ns'] / median(last['charge']):.0f}x"
        )
        print(
            f"fdatasync share of the charge median at {last['n']}: "
            f"{sync / median(last['charge']) * 100:.0f}%"
        )
        if last["n"] == 100000:
            ok = {
                "charge median <= 2 ms": median(last["charge"]) * MS <= 2,
                "refund median <= 2 ms": median(last["refund"]) * MS <= 2,
                "lookup median <= 0.5 ms": median(last["lookup"]) * MS <= 0.5,
                "<= 100 bytes per address (journal full)": last["max_bytes"] <= 100,
            }
            print(
                "goals at 100k: "
                + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in ok.items())
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
