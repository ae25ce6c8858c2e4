#!/usr/bin/env python3
"""Connections per second through ostiary-tcpserver against real tcpserver, in one run.

Both servers run with ``-HRl0 -c LIMIT`` on 127.0.0.1 and the same program;
the runs alternate real, shim, real, shim... so machine drift hits both
alike. One run: start the server, warm it up, then keep CONCURRENCY client
connections in flight until CONNS have been served; the time runs from the
first connect until the last connection is closed *and* the server's last
child has exited (a handler may go on working after it hangs up). The
server's own CPU time (parent only) and its children's are read from /proc.

Programs (--program):
  handle  ostiary-handle with the shipped examples/ostiary.cfg (its log level, its
          actions; DELAY=0 as shipped), the store in a temporary directory: the
          client reads the salt and proves the /bin/echo ACTION's passphrase
  true    /bin/true: the server's own cost per connection
  python  python3 -S -c pass: a small Python program
  or any command after ``--``, e.g. ``bench/shim.py -- /bin/cat /etc/hostname``

Prints, per server, the median connections/second and milliseconds per
connection, CPU per connection (parent; children), and the ratio shim/real
of the medians. Goal with ``handle``: ratio >= 0.9.

``--fork`` runs the shim as ``ostiary-tcpserver -F ostiary_ucspi.handle``
(handle only): no exec per connection. It also holds LIMIT connections open
after their salt and reads each live child's private memory (USS:
Private_Clean + Private_Dirty of /proc/PID/smaps_rollup), for both servers.
Goals: conn/s ratio >= 10, CPU per connection ratio <= 0.1, USS <= 1 MiB.
It refuses an editable install, whose exec'd handler starts with ``site``.
The servers' log (LOG_INFO, as shipped) goes to a file, as multilog's would.
``--fork --floor`` forks, instead of the handler, a module whose main only
sends 32 random bytes and reads 32 (the least any -F handler does): the
floor of the forking server itself, against the same exec'd handler.

Usage: python3 bench/shim.py [--program handle|true|python] [--fork [--floor]] [--conns N]
       [--rounds R] [-c LIMIT] [--concurrency K] [-- command ...]
Needs only the standard library, tcpserver (ucspi-tcp) and this project installed.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = b"example-hello-passphrase"  # examples/ostiary.cfg's /bin/echo ACTION
TICK = os.sysconf("SC_CLK_TCK")
FLOOR = """import os


def main(argv):
    os.write(1, os.urandom(32))
    os.read(0, 32)
    return 0
"""


def tool(name: str) -> str:
    """This interpreter's copy of a project command (not a version manager's shim)."""
    path = os.path.join(sysconfig.get_path("scripts"), name)
    found = path if os.path.exists(path) else shutil.which(name)
    if found is None:
        raise SystemExit(f"bench: {name} not found (pip install -e .; apt-get install ucspi-tcp)")
    return found


def installed() -> bool:
    """Whether ostiary_ucspi is installed in this interpreter's site-packages (not editable).

    An editable install's exec'd handler falls back to ``site`` (see
    bin/ostiary-handle): the exec'd side would be slower than a user's.
    """
    import importlib.util

    spec = importlib.util.find_spec("ostiary_ucspi")
    origin = os.path.realpath(spec.origin) if spec and spec.origin else ""
    places = {os.path.realpath(sysconfig.get_path(n)) for n in ("purelib", "platlib")}
    return any(origin.startswith(place + os.sep) for place in places)


def handle_config(work: str) -> str:
    """Copy the shipped examples/ostiary.cfg, its store moved into ``work``; return its path."""
    with open(os.path.join(REPO, "examples", "ostiary.cfg")) as f:
        text = f.read()
    lines = [
        f"LOCKOUT_DB={work}/lockout.cdb" if line.startswith("LOCKOUT_DB=") else line
        for line in text.splitlines()
    ]
    cfg = os.path.join(work, "ostiary.cfg")
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return cfg


def children(pid: int) -> list[int]:
    """Pids of ``pid``'s children."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            found.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
        return found


def cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def load(port: int, total: int, concurrency: int, respond: bool) -> None:
    """Serve ``total`` connections, ``concurrency`` at a time; fail on any error."""
    sel = selectors.DefaultSelector()
    started = finished = 0
    while finished < total:
        while started < total and started - finished < concurrency:
            s = socket.socket()
            # Clients from many loopback addresses, as users come from many: one address
            # gets at most MAX_BAD_CONNS salts at a time (each charge precedes its salt).
            s.bind((f"127.0.0.{2 + started % 250}", 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sel.register(s, selectors.EVENT_READ, [b"", False])
            started += 1
        events = sel.select(timeout=30)
        if not events:
            raise SystemExit("bench: no progress for 30 s")
        for key, _ in events:
            s, state = key.fileobj, key.data
            data = s.recv(4096)
            if data:
                state[0] += data
                if respond and not state[1] and len(state[0]) >= 32:
                    s.send(hmac.new(SECRET, state[0][:32], hashlib.sha256).digest())
                    state[1] = True
                continue
            if respond and not state[1]:
                raise SystemExit(
                    f"bench: connection closed after {len(state[0])} bytes, no salt"
                    f" (see the servers' log)"
                )
            sel.unregister(s)
            s.close()
            finished += 1
    sel.close()


def start(argv: list[str], log: str) -> subprocess.Popen:
    """Start a server (its port on stdout, its log appended to ``log``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCP")}
    with open(log, "ab") as err:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env)


def private_kib(pid: int) -> int:
    """USS of ``pid``: its private pages, clean and dirty, in KiB."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def uss(argv: list[str], held: int, log: str) -> float:
    """Hold ``held`` connections after their salt; return the mean USS (KiB) of the children."""
    server = start(argv, log)
    socks = []
    try:
        port = int(server.stdout.readline())
        for n in range(held):
            s = socket.create_connection(
                ("127.0.0.1", port), source_address=(f"127.0.1.{n + 2}", 0)
            )
            s.recv(32)
            socks.append(s)
        deadline = time.monotonic() + 10
        while len(children(server.pid)) < held and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # each child is in its exchange now, waiting for the response
        kids = children(server.pid)
        return statistics.mean(private_kib(pid) for pid in kids)
    finally:
        for s in socks:
            s.close()
        server.terminate()
        server.wait()
        server.stdout.close()


def measure(
    argv: list[str], conns: int, concurrency: int, respond: bool, log: str
) -> dict[str, float]:
    """Start one server, warm it up, time ``conns`` connections; return the figures."""
    server = start(argv, log)
    try:
        port = int(server.stdout.readline())
        load(port, 2 * concurrency, concurrency, respond)
        while children(server.pid):
            time.sleep(0.002)
        own0, kids0 = cpu(server.pid)
        t0 = time.perf_counter()
        load(port, conns, concurrency, respond)
        while children(server.pid):
            time.sleep(0.001)
        wall = time.perf_counter() - t0
        own1, kids1 = cpu(server.pid)
    finally:
        server.terminate()
        server.wait()
        server.stdout.close()
    return {
        "rate": conns / wall,
        "ms": 1000 * wall / conns,
        "parent_us": 1e6 * (own1 - own0) / conns,
        "kids_us": 1e6 * (kids1 - kids0) / conns,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--program", default="handle", choices=("handle", "true", "python"))
    ap.add_argument("--conns", type=int, help="connections per run (default 300; 2000 for true)")
    ap.add_argument("--rounds", type=int, default=4, help="runs of each server, interleaved")
    ap.add_argument("-c", dest="limit", type=int, default=8, help="tcpserver -c (both)")
    ap.add_argument("--concurrency", type=int, help="client connections in flight (default: -c)")
    ap.add_argument(
        "--fork",
        action="store_true",
        help="the shim forks the imported handler (-F), no exec (handle only)",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="with --fork: fork a module that only sends 32 bytes and reads 32",
    )
    ap.add_argument("command", nargs="*", help="program to run instead (after --)")
    args = ap.parse_args()
    if args.fork and (args.command or args.program != "handle"):
        ap.error("--fork runs ostiary-handle only")
    if args.floor and not args.fork:
        ap.error("--floor needs --fork")
    if args.fork and not installed():
        raise SystemExit(
            "bench: --fork compares with the exec'd handler, which an editable install starts"
            " slowly (site): run it from a venv with a plain 'pip install .'"
        )
    concurrency = args.concurrency or args.limit
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as work:  # runners may linger
        respond = False
        if args.command:
            program, name = args.command, " ".join(args.command)
        elif args.program == "handle":
            program, respond = [tool("ostiary-handle"), "-c", handle_config(work)], True
            name = "ostiary-handle (full exchange, right response)"
        elif args.program == "true":
            program, name = ["/bin/true"], "/bin/true"
        else:
            program, name = [sys.executable, "-S", "-c", "pass"], "python3 -S -c pass"
        conns = args.conns or (2000 if program == ["/bin/true"] else 300)
        flags = ["-1", "-HRl0", "-c", str(args.limit), "127.0.0.1", "0"]
        module = "ostiary_ucspi.handle"
        if args.floor:
            module = "bench_floor"
            with open(os.path.join(work, f"{module}.py"), "w") as f:
                f.write(FLOOR)
            os.environ["PYTHONPATH"] = work  # the shim's; the exec'd handler runs with -I
        fork = ["-F", module] if args.fork else []
        servers = {
            "real": [tool("tcpserver")] + flags + program,
            "shim": [tool("ostiary-tcpserver")] + fork + flags + program,
        }
        log = os.path.join(work, "log")
        results: dict[str, list[dict[str, float]]] = {"real": [], "shim": []}
        for _ in range(args.rounds):
            for which in ("real", "shim"):
                results[which].append(measure(servers[which], conns, concurrency, respond, log))
        memory = {w: uss(servers[w], args.limit, log) for w in servers} if args.fork else {}
    print(f"program: {name}" + (f"; shim: -F {module} (forks, no exec)" if args.fork else ""))
    print(
        f"both: -HRl0 -c {args.limit}; {concurrency} clients in flight; {conns} connections "
        f"per run; {args.rounds} runs each, interleaved real/shim; "
        f"python {sys.version.split()[0]}"
    )
    print(
        f"{'server':6} {'conn/s':>9} {'ms/conn':>8} {'parent CPU us/conn':>19} "
        f"{'children CPU us/conn':>21}  runs (conn/s)"
    )
    medians = {}
    for which in ("real", "shim"):
        rs = results[which]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        medians[which] = med
        runs = " ".join(f"{r['rate']:.0f}" for r in rs)
        print(
            f"{which:6} {med['rate']:9.1f} {med['ms']:8.3f} {med['parent_us']:19.0f} "
            f"{med['kids_us']:21.0f}  {runs}"
        )
    ratio = medians["shim"]["rate"] / medians["real"]["rate"]
    extra = medians["shim"]["ms"] - medians["real"]["ms"]
    print(
        f"ratio shim/real (conn/s): {ratio:.3f}   extra time per connection: {extra * 1000:+.0f} us"
    )
    if args.fork:
        cpu_of = {w: medians[w]["parent_us"] + medians[w]["kids_us"] for w in medians}
        print(
            f"CPU per connection, shim/real: {cpu_of['shim'] / cpu_of['real']:.3f} (goal <= 0.1)"
            f"   conn/s goal >= 10"
        )
        print(
            f"USS per live handler child: real {memory['real']:.0f} KiB, "
            f"shim {memory['shim']:.0f} KiB (goal <= 1024)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
