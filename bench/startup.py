#!/usr/bin/env python3
"""Start-up cost of ostiary-handle against a bare interpreter, in one run.

ostiary-handle starts once per connection, so its start-up is its cost. This
installs the project into a fresh virtual environment (no editable install,
no development tools: what a user runs) and measures what users run: the
shipped examples/ostiary.cfg (its log level, its LOCKOUT_ACTION, its actions,
one with an UNDO; DELAY=0 as shipped), its store moved to a temporary
directory, and a variant with eight ACTIONs that are shell scripts. Commands,
in turn, round after round, so machine drift hits all alike:

  baseline   python -I -c pass                       (same interpreter, same venv)
  locked     a locked-out address: closed at once
  success    a full exchange proving the example's /bin/echo ACTION
  success8   a full exchange with the eight-action config (its last ACTION)

Each handler command runs two ways: "fast", as service/ostiary/run starts it
(``python -I -S ostiary-handle``: no site, see bin/ostiary-handle), and
"plain", as pip's shebang starts it (site runs first). Each run is one
posix_spawn/wait of the whole process, wall time measured until the handler
exits (its action runner, detached, is not timed); then, untimed, the bench
reads the log (descriptor 2, a pipe) until the runner has closed it too, and
checks that the action finished: no runner of one command still works while
the next is timed. Peak RSS comes from
GNU time (/usr/bin/time -f %M, Debian package "time") in the same rounds.
Prints medians, 90th percentiles and minima, the ratios of the medians (and
of the minima: on a shared machine the fastest run is the one least
disturbed) to the baseline's; goals (fast): locked <= 1.00x, success <= 1.15x
wall, peak RSS <= 1.00x.

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
SECRET = b"example-hello-passphrase"  # examples/ostiary.cfg's /bin/echo ACTION
SECRET8 = b"bench-action-8-passphrase"


def make_venv(path: str) -> str:
    """Create ``path`` as a venv with the project installed; return its python."""
    py = os.path.join(path, "bin", "python")
    if not os.path.exists(os.path.join(path, "bin", "ostiary-handle")):
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", REPO], check=True)
    return py


def spawn(argv: list[str], env: dict[str, str], sock: socket.socket | None, log: int) -> int:
    """Start ``argv`` with ``sock`` (or /dev/null) as fds 0 and 1, ``log`` as 2; return its pid."""
    fd = sock.fileno() if sock is not None else os.open(os.devnull, os.O_RDWR)
    actions = [
        (os.POSIX_SPAWN_DUP2, fd, 0),
        (os.POSIX_SPAWN_DUP2, fd, 1),
        (os.POSIX_SPAWN_DUP2, log, 2),
    ]
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    if sock is None:
        os.close(fd)
    return pid


TIME = "/usr/bin/time"


def run_once(kind: str, py: str, handle: str, cfgs: dict[str, str], rss: bool) -> tuple[float, int]:
    """Run one ``kind`` of process (``locked-fast``, ``success8-plain``, ...).

    Returns (wall seconds, peak RSS KiB or 0); with ``rss`` the process runs
    under GNU time, which reports its peak RSS.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    ours = theirs = None
    what, _, how = kind.partition("-")
    if what == "baseline":
        argv = [py, "-I", "-c", "pass"]
    else:
        cfg = cfgs["eight" if what == "success8" else "example"]
        argv = ([py, "-I", "-S", handle] if how == "fast" else [handle]) + ["-c", cfg]
    report = None
    if rss:
        report = tempfile.NamedTemporaryFile("r")
        argv = [TIME, "-f", "%M", "-o", report.name] + argv
    if what != "baseline":
        ours, theirs = socket.socketpair()
        env["TCPREMOTEIP"] = "127.0.0.2" if what == "locked" else "127.0.0.1"
    log_r, log_w = os.pipe()
    t0 = time.perf_counter()
    pid = spawn(argv, env, theirs, log_w)
    os.close(log_w)
    if theirs is not None:
        theirs.close()
        if what.startswith("success"):
            salt = b""
            while len(salt) < 32:
                chunk = ours.recv(32 - len(salt))
                if not chunk:
                    raise SystemExit(f"bench: {kind}: handler closed before the salt")
                salt += chunk
            secret = SECRET8 if what == "success8" else SECRET
            ours.sendall(hmac.new(secret, salt, hashlib.sha256).digest())
    _, status = os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    if ours is not None:
        ours.close()
    with open(log_r, "rb") as f:  # EOF once the detached runner is done as well
        log = f.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"bench: {kind} run exited with status {status}: {log}")
    if what.startswith("success") and " finished: exit 0" not in log:
        raise SystemExit(f"bench: {kind}: the action did not finish well: {log}")
    if report is None:
        return wall, 0
    with report:
        return wall, int(report.read().split()[-1])


def setup(py: str, work: str) -> dict[str, str]:
    """Write the two configs and lock 127.0.0.2 out; return {name: config path}."""
    with open(os.path.join(REPO, "examples", "ostiary.cfg")) as f:
        example = [
            f"LOCKOUT_DB={work}/lockout.cdb" if line.startswith("LOCKOUT_DB=") else line
            for line in f.read().splitlines()
        ]
    eight = [line for line in example if not line.startswith(("ACTION=", "UNDO="))]
    for n in range(1, 9):
        script = os.path.join(work, f"action{n}")
        with open(script, "w") as f:
            f.write(f'#!/bin/sh\necho "action {n} for $1"\n')
        os.chmod(script, 0o755)
        secret = SECRET8.decode() if n == 8 else f"bench-action-{n}-passphrase"
        eight.append(f'ACTION="{secret}","{script}"')
        if n == 1:
            eight.append(f'UNDO=60,"{script}"')
    cfgs = {}
    for name, lines in (("example", example), ("eight", eight)):
        cfgs[name] = os.path.join(work, f"{name}.cfg")
        fd = os.open(cfgs[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
    lock = (
        "import sys, time\n"
        "from ostiary_ucspi.store import Store\n"
        "from ostiary_ucspi.policy import Entry\n"
        "e = Entry(); e.strikes = e.errors = 3; e.locked_since = e.last_seen = int(time.time())\n"
        "with Store(sys.argv[1]).lock() as tx:\n"
        "    tx.put(b'127.0.0.2', e.encode())\n"
    )
    subprocess.run([py, "-c", lock, f"{work}/lockout.cdb"], check=True)
    return cfgs


def pct(values: list[float], p: float) -> float:
    """Return the p-th percentile (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="rounds (each runs every command)")
    ap.add_argument("--venv", help="reuse or create the venv here (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as work:  # runners may linger
        py = make_venv(args.venv or os.path.join(work, "venv"))
        handle = os.path.join(os.path.dirname(py), "ostiary-handle")
        os.chmod(work, 0o755)  # actions run as nobody: they must reach their scripts
        cfgs = setup(py, work)
        kinds = ["baseline"] + [
            f"{w}-{h}" for h in ("fast", "plain") for w in ("locked", "success", "success8")
        ]
        has_time = os.access(TIME, os.X_OK)
        if not has_time:
            print(f"{TIME} not found (apt-get install time): no peak RSS figures")
        wall: dict[str, list[float]] = {k: [] for k in kinds}
        rss: dict[str, list[int]] = {k: [] for k in kinds}
        for k in kinds:  # warm-up: page cache, .pyc files
            run_once(k, py, handle, cfgs, False)
        for _ in range(args.runs):
            for k in kinds:
                wall[k].append(run_once(k, py, handle, cfgs, False)[0])
            if has_time:
                for k in kinds:
                    rss[k].append(run_once(k, py, handle, cfgs, True)[1])
    base_w = statistics.median(wall["baseline"])
    base_min = min(wall["baseline"])
    base_r = statistics.median(rss["baseline"]) if has_time else 1
    print(
        f"python {sys.version.split()[0]}, {args.runs} rounds, interleaved; "
        "config: examples/ostiary.cfg (success8: eight ACTIONs)"
    )
    print(
        f"{'command':15} {'median ms':>10} {'p90 ms':>8} {'min ms':>7} {'peak RSS KiB':>13} "
        f"{'wall ratio':>11} {'min ratio':>10} {'RSS ratio':>10}  goal"
    )
    goals = {
        "locked-fast": "wall <= 1.00x, RSS <= 1.00x",
        "success-fast": "wall <= 1.15x, RSS <= 1.00x",
        "success8-fast": "wall <= 1.15x, RSS <= 1.00x",
    }
    for k in kinds:
        m = statistics.median(wall[k])
        r = statistics.median(rss[k]) if has_time else 0
        rr = f"{r / base_r:9.3f}x" if has_time else f"{'n/a':>10}"
        print(
            f"{k:15} {m * 1000:10.2f} {pct(wall[k], 90) * 1000:8.2f} {min(wall[k]) * 1000:7.2f} "
            f"{r:13.0f} {m / base_w:10.3f}x {min(wall[k]) / base_min:9.3f}x {rr}  "
            f"{goals.get(k, '')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
