"""Deployment: ostiary-conf, the service/ directory under real svscan, inetd, xinetd, actions.

Real daemontools (svscan, supervise, svc, svstat, multilog, tai64nlocal),
ucspi-tcp (tcpserver, tcprules) and xinetd; every process started here is
ended by a fixture finalizer, also when a test fails.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, project_tool, require_tool
from kit.procs import wait_for
from kit.servers import unused_port

from ostiary_ucspi.admin import conf
from ostiary_ucspi.store import Store

ACTION_SECRET = b"deploy-test-action-passphrase"
KILL_SECRET = b"deploy-test-kill-passphrase"
IS_ROOT = os.geteuid() == 0


# ---------------------------------------------------------------- helpers


def listening(port: int) -> bool:
    """True when a socket listens on TCP ``port`` (IPv4).

    Read from /proc, not by connecting: to the handler a connection that hangs
    up is a failed attempt, and three of them would lock 127.0.0.1 out.
    """
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def exchange(port: int, secret: bytes | None, source: str = "127.0.0.1") -> bytes:
    """Connect from ``source``, answer the salt with ``secret`` (None: 32 zero bytes).

    Returns every byte the server sent until it closed the connection.
    """
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        got = b""
        while len(got) < 32:
            chunk = s.recv(64)
            if not chunk:
                return got
            got += chunk
        answer = hmac.new(secret, got[:32], hashlib.sha256).digest() if secret else bytes(32)
        s.sendall(answer)
        while True:
            chunk = s.recv(64)
            if not chunk:
                return got
            got += chunk


def secret_file(directory: Path, secret: bytes) -> Path:
    """Write ``secret`` to a mode 600 file for ostiary-client --secret-file."""
    path = directory / f"secret-{hashlib.sha256(secret).hexdigest()[:8]}"
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


def knock(port: int, secret: bytes, directory: Path) -> subprocess.CompletedProcess:
    """Run the real ostiary-client against 127.0.0.1:port."""
    return subprocess.run(
        [
            project_tool("ostiary-client"),
            "-a",
            f"127.0.0.1:{port}",
            "--secret-file",
            str(secret_file(directory, secret)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def tool_path() -> str:
    """PATH for svscan: this interpreter's scripts, daemontools, the system."""
    dirs = [
        sysconfig.get_path("scripts"),
        os.path.dirname(shutil.which("svscan") or "/usr/bin"),
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
    ]
    return ":".join(dict.fromkeys(dirs))


def write_action(path: Path, text: str) -> Path:
    """Create an executable shell-script action."""
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def write_config(path: Path, action: Path, db: str) -> Path:
    """Write a test ostiary.cfg (mode 600)."""
    path.write_text(
        f'KILL="{KILL_SECRET.decode()}"\n'
        f'ACTION="{ACTION_SECRET.decode()}","{action}"\n'
        f"DELAY=0\nCOMM_TIMEOUT=5\nMIN_LOGLEVEL=LOG_INFO\nLOCKOUT_DB={db}\n"
    )
    path.chmod(0o600)
    return path


def run_conf(*args: str) -> subprocess.CompletedProcess:
    """Run the installed ostiary-conf."""
    return subprocess.run(
        [project_tool("ostiary-conf"), *args], capture_output=True, text=True, timeout=30
    )


def log_text(service: Path) -> str:
    """Return the service's whole log: old files (@..., oldest first), then current.

    multilog renames a current it did not finish (killed) to @TIMESTAMP.u on start.
    """
    main = service / "log" / "main"
    files = sorted(main.glob("@*")) + [main / "current"]
    return "".join(f.read_text(errors="replace") for f in files if f.exists())


def svstat(service: Path) -> str:
    """Return svstat's line for ``service``."""
    return subprocess.run(
        ["svstat", str(service)], capture_output=True, text=True, timeout=10
    ).stdout


def tmp_base() -> Path:
    """A directory under /tmp that other accounts may traverse (pytest's tmp_path is 700)."""
    base = Path(tempfile.mkdtemp(prefix="ostiary-deploy-", dir="/tmp"))
    base.chmod(0o755)
    return base


def log_account() -> str:
    """An account other than ours for multilog when we are root, else ourselves."""
    return "nobody" if IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name


# ---------------------------------------------------------------- shipped files


def test_shipped_service_directory_is_what_conf_writes():
    shipped = ROOT / "service" / "ostiary"
    expected = conf.service_files(
        "root",
        conf.SHIPPED_LOGACCOUNT,
        conf.DEFAULT_CONFIG,
        conf.DEFAULT_IP,
        conf.DEFAULT_PORT,
        "",
        None,
    )
    found = {str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file()}
    assert found == set(expected)
    for name, text in expected.items():
        path = shipped / name
        assert path.read_text() == text, name
        executable = bool(path.stat().st_mode & stat.S_IXUSR)
        assert executable == name.endswith("run"), name
    for script in ("run", "log/run"):
        subprocess.run(["sh", "-n", str(shipped / script)], check=True)


def test_shipped_env_reads_through_envdir():
    require_tool("envdir")
    out = subprocess.run(
        ["envdir", str(ROOT / "service/ostiary/env"), "env"],
        capture_output=True,
        text=True,
        check=True,
        env={},
    ).stdout
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert env == {
        "IP": "0",
        "PORT": "7050",
        "CONFIG": "/etc/ostiary.cfg",
        "CONCURRENCY": "10",
        "RULES": "",
        "ACCOUNT": "root",
    }


# ---------------------------------------------------------------- ostiary-conf


@pytest.fixture
def base():
    path = tmp_base()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_conf_usage_errors(base):
    for args in (
        [],
        ["root"],
        ["root", "root", "relative/dir"],
        ["root", "root", str(base / "s"), "relative.cfg"],
        ["root", "root", str(base / "s"), "/c", "0", "70000"],
        ["root", "root", str(base / "s"), "/c", "0", "x"],
        ["root", "root", str(base / "s b")],
        ["a", "b", "/c", "/d", "e", "1", "2"],
    ):
        r = run_conf(*args)
        assert r.returncode == 100, (args, r.stderr)
        assert r.stderr.startswith("ostiary-conf: "), r.stderr
    assert not (base / "s").exists()


def test_conf_refuses_unknown_account_and_existing_dir(base):
    me = pwd.getpwuid(os.geteuid()).pw_name
    r = run_conf("no-such-account-ostiary", me, str(base / "s"), str(base / "c"))
    assert r.returncode == 111 and "no such account: no-such-account-ostiary" in r.stderr
    assert not (base / "s").exists()
    (base / "s").mkdir()
    (base / "s" / "mine").write_text("keep")
    r = run_conf(me, me, str(base / "s"), str(base / "c"))
    assert r.returncode == 111 and "refusing" in r.stderr
    assert [p.name for p in (base / "s").iterdir()] == ["mine"]
    assert not (base / "c").exists()


def test_conf_makes_a_complete_service_directory(base):
    me = pwd.getpwuid(os.geteuid()).pw_name
    logacct = log_account()
    target, cfg = base / "ostiary", base / "ostiary.cfg"
    r = run_conf(me, logacct, str(target), str(cfg), "127.0.0.1", "7051")
    assert r.returncode == 0, r.stderr
    assert "random passphrases" in r.stdout

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.lstat().st_mode)

    assert mode(target) & stat.S_ISVTX and mode(target) & 0o755 == 0o755
    for script in ("run", "log/run"):
        assert mode(target / script) == 0o755
    main = (target / "log" / "main").stat()
    assert main.st_uid == pwd.getpwnam(logacct).pw_uid and stat.S_IMODE(main.st_mode) == 0o755
    assert mode(target / "state") == 0o700 and (target / "state").stat().st_uid == os.geteuid()
    assert mode(cfg) == 0o600 and cfg.stat().st_uid == os.geteuid()
    env = {p.name: p.read_text().split("\n", 1)[0] for p in (target / "env").iterdir()}
    assert env == {
        "IP": "127.0.0.1",
        "PORT": "7051",
        "CONFIG": str(cfg),
        "CONCURRENCY": "10",
        "RULES": f"{target}/tcprules/ostiary.cdb",
        "ACCOUNT": me,
        "PATH": conf.default_path(),
    }
    assert (target / "run").read_text() == (ROOT / "service/ostiary/run").read_text()
    assert f"account={logacct}\n" in (target / "log/run").read_text()
    # The skeleton passes --check as it is; its two passphrases are random.
    check = subprocess.run(
        [project_tool("ostiary-handle"), "--check", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    assert f"lockout store {target}/state/lockout.cdb" in check.stdout
    secrets = re.findall(r'^(?:KILL|ACTION)="([-\w]{32})"', cfg.read_text(), re.M)
    assert len(secrets) == 2 and secrets[0] != secrets[1]
    # tcprules/ostiary.cdb is what tcprules makes of tcprules/ostiary.
    require_tool("tcprules")
    rules = target / "tcprules"
    with open(rules / "ostiary", "rb") as f:
        subprocess.run(
            ["tcprules", str(base / "real.cdb"), str(base / "real.tmp")], stdin=f, check=True
        )
    assert (rules / "ostiary.cdb").read_bytes() == (base / "real.cdb").read_bytes()
    # An existing config is left alone.
    before = cfg.read_bytes()
    r = run_conf(me, logacct, str(base / "second"), str(cfg))
    assert r.returncode == 0 and "left as it is" in r.stdout
    assert cfg.read_bytes() == before


def test_conf_lets_an_unprivileged_account_take_its_service_down(base):
    """KILL under a non-root ACCOUNT: it may create down and svc -d, and touch nothing else."""
    if not IS_ROOT:
        pytest.skip("needs root: the service runs as another account")
    require_tool("supervise")
    target = base / "svc"
    r = run_conf("nobody", "nobody", str(target), str(base / "ostiary.cfg"))
    assert r.returncode == 0, r.stderr
    assert (base / "ostiary.cfg").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    # Stand in for tcpserver: the handler's own path needs this interpreter, out of reach of nobody.
    (target / "run").write_text("#!/bin/sh\nexec sleep 600\n")
    sup = subprocess.Popen(
        ["supervise", str(target)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: ": up " in svstat(target), 10, "supervise to start run")
        as_nobody = ["setuidgid", "nobody", "sh", "-c"]
        r = subprocess.run(
            as_nobody + [f"touch {target}/down && svc -d {target}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert r.returncode == 0, r.stderr
        wait_for(lambda: ": down " in svstat(target), 10, "svc -d run by nobody")
        for attack in (
            f"echo x >> {target}/run",
            f"mv {target}/run {target}/old",
            f"rm -f {target}/env/CONFIG",
            f"echo x > {target}/env/PATH",
        ):
            r = subprocess.run(as_nobody + [attack], capture_output=True, timeout=10)
            assert r.returncode != 0, attack
        assert (target / "run").read_text() == "#!/bin/sh\nexec sleep 600\n"
        subprocess.run(["svc", "-dx", str(target)], check=True, timeout=10)
        sup.wait(timeout=10)
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait()


# ---------------------------------------------------------------- daemontools


class Scan:
    """svscan on a directory, in its own process group, started and ended on demand."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {"PATH": tool_path()}
        self.proc = subprocess.Popen(
            ["svscan", str(self.directory)],
            env=env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def crash(self) -> None:
        """End svscan, every supervise and every service at once, as a reboot does."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        """Take every service down and end supervise, then svscan; crash what is left."""
        if self.proc is None:
            return
        dirs = [d for d in self.directory.iterdir() if d.is_dir()]
        dirs += [d / "log" for d in dirs if (d / "log").is_dir()]
        subprocess.run(["svc", "-dx", *map(str, dirs)], capture_output=True, timeout=10)
        time.sleep(0.3)
        self.crash()


@pytest.fixture(scope="module")
def deployed():
    """Three services under one real svscan: 'ostiary' and 'broken' made by ostiary-conf,
    'handmade' copied from the project's service/ostiary."""
    if not IS_ROOT:
        pytest.skip("a deployment runs as root (supervise, setuidgid, log account)")
    for tool in (
        "svscan",
        "supervise",
        "svc",
        "svok",
        "svstat",
        "multilog",
        "tai64nlocal",
        "envdir",
        "tcpserver",
        "tcprules",
        "make",
    ):
        require_tool(tool)
    base = tmp_base()
    scan = Scan(base / "service")
    try:
        (base / "service").mkdir()
        action = write_action(base / "action", 'echo "knock from $1"\n')
        services = {}
        for name in ("ostiary", "broken"):
            target = base / name
            port = unused_port()
            cfg = write_config(base / f"{name}.cfg", action, f"{target}/state/lockout.cdb")
            r = run_conf("root", log_account(), str(target), str(cfg), "127.0.0.1", str(port))
            assert r.returncode == 0, r.stderr
            (base / "service" / name).symlink_to(target)
            services[name] = (base / "service" / name, port, cfg)
        services["broken"][2].write_text('ACTION="x-passphrase-long","/bin/echo"\n')
        # By hand, without ostiary-conf: a copy of the project's service/ostiary.
        handmade, port = base / "handmade", unused_port()
        shutil.copytree(ROOT / "service" / "ostiary", handmade, symlinks=True)
        handmade.chmod(0o1755)
        (handmade / "log" / "main").mkdir()
        try:
            shutil.chown(handmade / "log" / "main", conf.SHIPPED_LOGACCOUNT)
        except LookupError:
            pass  # no such account: log/run runs multilog as root
        (handmade / "state").mkdir()
        cfg = write_config(base / "handmade.cfg", action, f"{handmade}/state/lockout.cdb")
        for name, value in (("IP", "127.0.0.1"), ("PORT", str(port)), ("CONFIG", str(cfg))):
            text = (handmade / "env" / name).read_text()
            (handmade / "env" / name).write_text(value + "\n" + text.split("\n", 1)[1])
        (base / "service" / "handmade").symlink_to(handmade)
        services["handmade"] = (base / "service" / "handmade", port, cfg)
        scan.start()
        yield base, scan, services
    finally:
        scan.stop()
        shutil.rmtree(base, ignore_errors=True)


def up_and_serving(service: Path, port: int) -> None:
    """Bring ``service`` up and wait until it accepts connections."""
    subprocess.run(["svc", "-u", str(service)], check=True, timeout=10)
    wait_for(lambda: listening(port), 15, f"{service} to listen on {port}")


def test_service_comes_up_and_an_action_is_logged_with_tai64n(deployed):
    base, _, services = deployed
    service, port, _ = services["ostiary"]
    wait_for(lambda: listening(port), 15, "the service to listen")
    assert re.match(r"^\S+: up \(pid \d+\) \d+ seconds", svstat(service))
    assert ": up " in svstat(service / "log")
    r = knock(port, ACTION_SECRET, base)
    assert r.returncode == 0, r.stderr
    line = wait_for(
        lambda: re.search(r"^@[0-9a-f]{24} .*knock from 127\.0\.0\.1$", log_text(service), re.M),
        15,
        "the action's log line",
    )
    local = subprocess.run(
        ["tai64nlocal"], input=line.group(0) + "\n", capture_output=True, text=True, check=True
    ).stdout
    stamp = re.match(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.\d{9} ", local)
    assert stamp, local
    when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S"))
    assert abs(when - time.time()) < 120
    text = log_text(service)
    assert "action 1 " in text and "finished: exit 0" in text
    assert (service / "log" / "main").stat().st_uid == pwd.getpwnam(log_account()).pw_uid


def test_the_shipped_service_directory_runs_as_copied(deployed):
    """service/ostiary copied by hand, env/ edited: it serves and logs."""
    base, _, services = deployed
    service, port, _ = services["handmade"]
    wait_for(lambda: listening(port), 15, "the copied service to listen")
    assert len(exchange(port, None)) == 32
    wait_for(
        lambda: "127.0.0.1 failed: wrong response" in log_text(service),
        10,
        "the failure's log line",
    )
    assert re.search(r"^@[0-9a-f]{24} tcpserver: status: 0/10$", log_text(service), re.M)


def test_svc_down_and_up(deployed):
    base, _, services = deployed
    service, port, _ = services["ostiary"]
    up_and_serving(service, port)
    subprocess.run(["svc", "-d", str(service)], check=True, timeout=10)
    wait_for(lambda: not listening(port), 10, "svc -d to stop tcpserver")
    assert re.match(r"^\S+: down \d+ seconds", svstat(service))
    subprocess.run(["svc", "-u", str(service)], check=True, timeout=10)
    wait_for(lambda: listening(port), 15, "svc -u to start it again")
    assert ": up " in svstat(service)
    assert len(exchange(port, ACTION_SECRET)) == 32


def test_tcprules_make_denies_without_the_handler(deployed):
    base, _, services = deployed
    service, port, _ = services["ostiary"]
    up_and_serving(service, port)
    db = Store(str(base / "ostiary" / "state" / "lockout.cdb"))
    # Allowed by the shipped rules: the handler answers, and charges a wrong response.
    assert len(exchange(port, None, source="127.0.0.2")) == 32
    wait_for(lambda: "127.0.0.2 failed: wrong response" in log_text(service), 10, "the failure")
    record = db.view().get(b"127.0.0.2")
    assert record is not None
    rules = base / "ostiary" / "tcprules"
    text = (rules / "ostiary").read_text()
    (rules / "ostiary").write_text(
        text.replace("127.0.0.1:allow\n", "127.0.0.1:allow\n127.0.0.2:deny\n")
    )
    made = subprocess.run(["make"], cwd=rules, capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    assert "ostiary.cdb ostiary.tmp < ostiary" in made.stdout
    assert exchange(port, None, source="127.0.0.2") == b""
    wait_for(
        lambda: re.search(r"tcpserver: deny \d+ .*127\.0\.0\.2", log_text(service)),
        10,
        "tcpserver's deny line",
    )
    assert db.view().get(b"127.0.0.2") == record  # the handler never ran
    assert len(exchange(port, ACTION_SECRET)) == 32  # 127.0.0.1 is still served
    (rules / "ostiary").write_text(text)
    subprocess.run(["make"], cwd=rules, capture_output=True, check=True, timeout=30)


def test_broken_config_does_not_serve_and_the_log_says_why(deployed):
    base, _, services = deployed
    service, port, cfg = services["broken"]
    fatal = "run: fatal: " + str(cfg) + " does not pass ostiary-handle --check"
    wait_for(lambda: log_text(service).count(fatal) >= 2, 20, "supervise to retry")
    text = log_text(service)
    assert f"ostiary-handle: fatal: {cfg}: KILL is mandatory" in text
    assert not listening(port)
    write_config(cfg, base / "action", f"{base}/broken/state/lockout.cdb")
    subprocess.run(["svc", "-t", str(service)], check=True, timeout=10)
    wait_for(lambda: listening(port), 4, "svc -t to retry at once")


def test_kill_takes_it_down_until_revived_across_svscan_restarts(deployed):
    base, scan, services = deployed
    service, port, cfg = services["ostiary"]
    up_and_serving(service, port)
    r = knock(port, KILL_SECRET, base)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: ": down " in svstat(service), 10, "KILL to take the service down")
    assert (service / "down").exists()
    assert not listening(port)
    text = log_text(service)
    assert "127.0.0.1 proved KILL" in text
    assert f"{service.resolve()}: supervise told to take the service down" in text

    scan.crash()  # a reboot: svscan, supervise and tcpserver all gone
    scan.start()
    wait_for(
        lambda: subprocess.run(["svok", str(service)]).returncode == 0, 15, "supervise to run again"
    )
    time.sleep(1.5)  # supervise would have started ./run by now
    assert ": down " in svstat(service) and not listening(port)
    assert ": up " in svstat(service / "log")

    # Revived by hand without ostiary-lockout: it serves, but closes every connection.
    subprocess.run(["svc", "-u", str(service)], check=True, timeout=10)
    wait_for(lambda: listening(port), 15, "svc -u before the revival")
    assert exchange(port, ACTION_SECRET) == b""
    wait_for(
        lambda: (
            "127.0.0.1 closed at once: service stopped: KILL from 127.0.0.1" in log_text(service)
        ),
        10,
        "the refusal's log line",
    )
    subprocess.run(["svc", "-d", str(service)], check=True, timeout=10)

    revive = subprocess.run(
        [project_tool("ostiary-lockout"), "-c", str(cfg), "revive"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert revive.returncode == 0, revive.stderr
    (service / "down").unlink()
    up_and_serving(service, port)
    assert knock(port, ACTION_SECRET, base).returncode == 0
    wait_for(
        lambda: log_text(service).count("knock from 127.0.0.1") >= 2,
        10,
        "an action after the revival",
    )


def test_run_uses_ostiary_tcpserver_without_tcpserver(base):
    """No tcpserver on PATH: run serves through ostiary-tcpserver, same flags, same rules."""
    require_tool("envdir")
    me = pwd.getpwuid(os.geteuid()).pw_name
    target, port = base / "svc", unused_port()
    cfg = write_config(
        base / "ostiary.cfg",
        write_action(base / "action", "echo hi\n"),
        f"{target}/state/lockout.cdb",
    )
    assert run_conf(me, me, str(target), str(cfg), "127.0.0.1", str(port)).returncode == 0
    bin_dir = base / "bin"  # what run needs, and no tcpserver
    bin_dir.mkdir()
    for tool in ("sh", "envdir", "setuidgid", "envuidgid"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").symlink_to(sys.executable)  # run's bind probe
    for tool in ("ostiary-handle", "ostiary-lockout", "ostiary-tcpserver"):
        (bin_dir / tool).symlink_to(project_tool(tool))
    (target / "env" / "PATH").write_text(f"{bin_dir}\n")
    if not IS_ROOT:
        (target / "env" / "ACCOUNT").write_text("root\n")  # only root can setuidgid
    proc = subprocess.Popen(
        ["./run"],
        cwd=target,
        env={"PATH": str(bin_dir)},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, 15, "ostiary-tcpserver")
        assert proc.poll() is None, proc.stdout.read()
        assert len(exchange(port, ACTION_SECRET)) == 32
        # run execs all the way down: its process is now ostiary-tcpserver.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        argv = cmdline.rstrip("\0").split("\0")
        assert any(a.endswith("ostiary-tcpserver") for a in argv), argv
        assert argv[-12:-7] == ["-c", "10", "-x", f"{target}/tcprules/ostiary.cdb", "127.0.0.1"], (
            argv
        )
        # the handler starts without site, under its own interpreter (bin/ostiary-handle)
        handler = project_tool("ostiary-handle")
        with open(handler) as f:
            python = f.readline()[2:].split()[0]
        assert argv[-6:-1] == [python, "-I", "-S", str(bin_dir / "ostiary-handle"), "-c"], argv
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


# ---------------------------------------------------------------- inetd and xinetd


def inetd_fields() -> list[str]:
    """Return the fields of the one service line in service/inetd/inetd.conf."""
    lines = [
        ln
        for ln in (ROOT / "service/inetd/inetd.conf").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert len(lines) == 1
    return lines[0].split()


def inetd_setup(base: Path, marks: Path) -> Path:
    """Write a config whose action, run as root, leaves a mark; return the config."""
    action = write_action(base / "mark", f'echo "$1" >> {marks}/knocks\n')
    cfg = base / "inetd.cfg"
    cfg.write_text(
        f'KILL="{KILL_SECRET.decode()}"\n'
        f'ACTION="{ACTION_SECRET.decode()}","{action}",0,0\n'
        f"DELAY=0\nLOCKOUT_DB={base}/lockout.cdb\n"
    )
    cfg.chmod(0o600)
    return cfg


def assert_only_the_salt(port: int, cfg: Path, marks: Path) -> None:
    """Full exchanges give exactly 32 bytes; a broken config gives none."""
    assert len(exchange(port, ACTION_SECRET)) == 32
    wait_for(
        lambda: (marks / "knocks").exists() and (marks / "knocks").read_text() == "127.0.0.1\n",
        10,
        "the action's mark",
    )
    assert len(exchange(port, None)) == 32
    good = cfg.read_text()
    cfg.write_text("KILL=\n")
    try:
        assert exchange(port, ACTION_SECRET) == b""
    finally:
        cfg.write_text(good)
    assert len(exchange(port, ACTION_SECRET)) == 32


def test_inetd_line_fields():
    fields = inetd_fields()
    service, socktype, proto, wait, user, server = fields[:6]
    assert re.fullmatch(r"(\S+:)?\d+", service)
    assert (socktype, proto, user) == ("stream", "tcp", "root")
    assert re.fullmatch(r"nowait\.\d+", wait)
    assert server == "/usr/local/bin/ostiary-handle"
    assert fields[6:] == ["ostiary-handle", "-c", "/etc/ostiary.cfg"]


def test_inetd_path_sends_nothing_but_the_salt(base):
    """What inetd does: the accepted socket as descriptors 0, 1 and 2, argv from the line."""
    if not IS_ROOT:
        pytest.skip("the shipped line runs the handler as root")
    fields = inetd_fields()
    argv = [a.replace("/etc/ostiary.cfg", str(base / "inetd.cfg")) for a in fields[6:]]
    marks = base / "marks"
    marks.mkdir()
    cfg = inetd_setup(base, marks)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        handlers: list[subprocess.Popen] = []

        def serve() -> None:
            for _ in range(4):
                conn, _ = listener.accept()
                with conn:
                    handlers.append(
                        subprocess.Popen(
                            argv,
                            executable=project_tool("ostiary-handle"),
                            stdin=conn,
                            stdout=conn,
                            stderr=conn,
                            env={},
                        )
                    )

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            assert_only_the_salt(port, cfg, marks)
            server.join(timeout=10)
        finally:
            for proc in handlers:
                proc.wait(timeout=30)


def test_real_xinetd_runs_the_shipped_stanza(base):
    xinetd = require_tool("xinetd")
    if not IS_ROOT:
        pytest.skip("the shipped stanza has user = root")
    port = unused_port()
    marks = base / "marks"
    marks.mkdir()
    cfg = inetd_setup(base, marks)
    stanza = (ROOT / "service/inetd/xinetd.d/ostiary").read_text()
    for attribute in ("instances", "per_source", "cps"):
        assert re.search(rf"^\s*{attribute}\s*=\s*\d", stanza, re.M), attribute
    stanza, n = re.subn(r"^(\s*port\s*=\s*)7050$", rf"\g<1>{port}", stanza, flags=re.M)
    assert n == 1
    stanza = stanza.replace("/usr/local/bin/ostiary-handle", project_tool("ostiary-handle"))
    stanza = stanza.replace("/etc/ostiary.cfg", str(cfg))
    stanza = stanza.replace("}", "\tbind\t\t= 127.0.0.1\n}")  # tests stay on loopback
    (base / "xinetd.conf").write_text(stanza)
    log = base / "xinetd.log"
    proc = subprocess.Popen(
        [xinetd, "-f", str(base / "xinetd.conf"), "-dontfork", "-filelog", str(log)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: log.exists() and "Started working" in log.read_text(), 10, "xinetd to start"
        )
        assert "Started working: 1 available service" in log.read_text(), log.read_text()
        wait_for(lambda: listening(port), 10, "xinetd to listen")
        assert_only_the_salt(port, cfg, marks)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
