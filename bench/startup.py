#!/usr/bin/env python3
"""Start-up cost of ostiary-handle against a bare interpreter, in one run.

ostiary-handle starts once per connection, so its start-up is its cost. This
installs the project into a fresh virtual environment (no editable install,
no development tools: what a user runs), then times three commands in turn,
round after round, so machine drift hits all three alike:

  baseline  python -I -c pass                (same interpreter, same venv)
  locked    ostiary-handle for a locked-out address (closed at once)
  success   ostiary-handle, a full exchange with the right response, DELAY=0

Each run is one posix_spawn/wait of the whole process, wall time measured
around it. Peak RSS comes from GNU time (/usr/bin/time -f %M, Debian package
"time") in the same rounds: the wait4() figure of a process spawned from this
(larger) one would carry this one's high-water mark across exec. Prints
medians, 90th percentiles and the ratios to the baseline; goals: locked <=
1.15x, success <= 1.35x wall, peak RSS <= 1.2x.

Usage: python3 bench/startup.py [--runs N] [--venv DIR]
"""
import argparse
import hashlib
import hmac
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = b"bench-passphrase-0123456789"


def make_venv(path: str) -> str:
    """Create ``path`` as a venv with the project installed; return its python."""
    py = os.path.join(path, "bin", "python")
    if not os.path.exists(os.path.join(path, "bin", "ostiary-handle")):
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", REPO], check=True)
    return py


def spawn(argv: list[str], env: dict[str, str], sock: socket.socket | None) -> int:
    """Start ``argv`` with ``sock`` (or /dev/null) as fds 0 and 1; return its pid."""
    fd = sock.fileno() if sock is not None else os.open(os.devnull, os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)]
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    if sock is None:
        os.close(fd)
    return pid


TIME = "/usr/bin/time"


def run_once(kind: str, py: str, handle: str, cfg: str, rss: bool) -> tuple[float, int]:
    """Run one ``kind`` of process; return (wall seconds, peak RSS KiB or 0).

    With ``rss`` the process runs under GNU time, which reports its peak RSS.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    ours = theirs = None
    argv = [py, "-I", "-c", "pass"] if kind == "baseline" else [py, handle, "-c", cfg]
    report = None
    if rss:
        report = tempfile.NamedTemporaryFile("r")
        argv = [TIME, "-f", "%M", "-o", report.name] + argv
    if kind != "baseline":
        ours, theirs = socket.socketpair()
        env["TCPREMOTEIP"] = "127.0.0.2" if kind == "locked" else "127.0.0.1"
    t0 = time.perf_counter()
    pid = spawn(argv, env, theirs)
    if theirs is not None:
        theirs.close()
        if kind == "success":
            salt = b""
            while len(salt) < 32:
                chunk = ours.recv(32 - len(salt))
                if not chunk:
                    raise SystemExit("bench: handler closed before the salt")
                salt += chunk
            ours.sendall(hmac.new(SECRET, salt, hashlib.sha256).digest())
    _, status = os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    if ours is not None:
        ours.close()
    if status != 0:
        raise SystemExit(f"bench: {kind} run exited with status {status}")
    if report is None:
        return wall, 0
    with report:
        return wall, int(report.read().split()[-1])


def setup(py: str, work: str) -> str:
    """Write the config and lock 127.0.0.2 out; return the config's path."""
    cfg = os.path.join(work, "ostiary.cfg")
    with open(cfg, "w") as f:
        f.write(f'KILL="bench-kill-passphrase-0123"\nACTION="{SECRET.decode()}","/bin/true"\n'
                f"LOCKOUT_DB={work}/lockout.cdb\nDELAY=0\nMAX_BAD_CONNS=3\n"
                "MIN_LOGLEVEL=LOG_ERR\n")
    lock = ("import sys, time\n"
            "from ostiary_ucspi.store import Store\n"
            "from ostiary_ucspi.policy import Entry\n"
            "e = Entry(); e.strikes = e.errors = 3; e.locked_since = e.last_seen = int(time.time())\n"
            "with Store(sys.argv[1]).lock() as tx:\n"
            "    tx.put(b'127.0.0.2', e.encode())\n")
    subprocess.run([py, "-c", lock, f"{work}/lockout.cdb"], check=True)
    return cfg


def pct(values: list[float], p: float) -> float:
    """Return the p-th percentile (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="rounds (each runs all three)")
    ap.add_argument("--venv", help="reuse or create the venv here (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        py = make_venv(args.venv or os.path.join(work, "venv"))
        handle = os.path.join(os.path.dirname(py), "ostiary-handle")
        cfg = setup(py, work)
        kinds = ("baseline", "locked", "success")
        has_time = os.access(TIME, os.X_OK)
        if not has_time:
            print(f"{TIME} not found (apt-get install time): no peak RSS figures")
        wall: dict[str, list[float]] = {k: [] for k in kinds}
        rss: dict[str, list[int]] = {k: [] for k in kinds}
        for k in kinds:  # warm-up: page cache, .pyc files
            run_once(k, py, handle, cfg, False)
        for _ in range(args.runs):
            for k in kinds:
                wall[k].append(run_once(k, py, handle, cfg, False)[0])
            if has_time:
                for k in kinds:
                    rss[k].append(run_once(k, py, handle, cfg, True)[1])
    base_w = statistics.median(wall["baseline"])
    base_r = statistics.median(rss["baseline"]) if has_time else 1
    print(f"python {sys.version.split()[0]}, {args.runs} rounds, interleaved")
    print(f"{'command':10} {'median ms':>10} {'p90 ms':>8} {'peak RSS KiB':>13} "
          f"{'wall ratio':>11} {'RSS ratio':>10}  goal")
    goals = {"baseline": "", "locked": "wall <= 1.15x, RSS <= 1.2x",
             "success": "wall <= 1.35x, RSS <= 1.2x"}
    for k in kinds:
        m = statistics.median(wall[k])
        r = statistics.median(rss[k]) if has_time else 0
        rr = f"{r / base_r:9.3f}x" if has_time else f"{'n/a':>10}"
        print(f"{k:10} {m * 1000:10.2f} {pct(wall[k], 90) * 1000:8.2f} {r:13.0f} "
              f"{m / base_w:10.3f}x {rr}  {goals[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
