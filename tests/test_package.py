"""The Debian package: build, lintian, install, a smoke test of the installed files only, purge.

Needs root, dpkg-buildpackage and apt-get (CI has them: there it fails instead
of skipping). It refuses to run where ostiary-ucspi is installed or
/etc/ostiary.cfg exists, and leaves the machine as it found it: purge, then
the accounts the install created are removed.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import IN_CI, ROOT, require_tool
from kit.procs import wait_for
from kit.servers import unused_port

PROGRAMS = (
    "ostiary-handle",
    "ostiary-client",
    "ostiary-lockout",
    "ostiary-tcpserver",
    "ostiary-tcprules",
    "ostiary-conf",
)
PAGES = [(1, p) for p in PROGRAMS] + [(5, "ostiary.cfg")]
ACCOUNTS = ("ostiary", "ostiarylog")
CONFIG = Path("/etc/ostiary.cfg")
STATE = Path("/var/lib/ostiary")
PRIVATE = Path("/usr/lib/ostiary-ucspi")
UNITS = Path("/lib/systemd/system")
# Where a package of ours could leave something; dpkg's and apt's own records
# and caches are theirs.
WATCHED = (
    "/etc",
    "/var/lib",
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib/ostiary-ucspi",
    "/lib/systemd/system",
    "/usr/share/man/man1",
    "/usr/share/man/man5",
    "/usr/share/doc",
    "/usr/share/ostiary-ucspi",
    "/usr/local",
)
NOT_OURS = ("/var/lib/dpkg/", "/var/lib/apt/", "/var/lib/man-db/", "/etc/ld.so.cache")


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 600)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def files() -> set[str]:
    """Every path under WATCHED, but dpkg's, apt's and man-db's records."""
    found = set()
    for top in WATCHED:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if not path.startswith(NOT_OURS):
                    found.add(path)
    return found


def account_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """Build the .deb from a copy of the tree (what git tracks, and new files)."""
    if os.geteuid() != 0:
        msg = "needs root: installs and purges the package"
        if IN_CI:
            pytest.fail(msg + "; CI runs as root")
        pytest.skip(msg)
    require_tool("dpkg-buildpackage")
    require_tool("apt-get")
    out = tmp_path_factory.mktemp("deb")
    src = out / "src"
    listed = run("git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z")
    assert listed.returncode == 0, listed.stderr
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if not os.path.lexists(source):
            continue  # deleted in the work tree
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    built = run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    debs = sorted(out.glob("ostiary-ucspi_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def test_lintian_is_clean(deb):
    lintian = require_tool("lintian")
    changes = sorted(deb.parent.glob("ostiary-ucspi_*.changes"))
    r = run(lintian, "-I", "--pedantic", str(changes[0]))
    tags = [line for line in (r.stdout + r.stderr).splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert tags == [], "\n".join(tags)


def test_install_smoke_and_purge(deb, tmp_path):
    if run("dpkg-query", "-W", "-f", "${Status}", "ostiary-ucspi").stdout.startswith("install"):
        pytest.fail("ostiary-ucspi is installed already: purge it first")
    if os.path.lexists(CONFIG) or os.path.lexists(STATE):
        pytest.fail(f"{CONFIG} or {STATE} exists: this test would take it over")
    tcpserver = require_tool("tcpserver")
    analyze = require_tool("systemd-analyze")
    require_tool("man")
    had = {a for a in ACCOUNTS if account_exists(a)}
    before = files()
    server = None
    try:
        r = run(
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            str(deb),
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr
        for name in PROGRAMS:
            assert os.access(f"/usr/bin/{name}", os.X_OK), name
        # Its own pure-cdb, in its own directory: the system's python3 does not see it.
        assert (PRIVATE / "cdblib" / "cdblib.py").is_file()
        assert run("/usr/bin/python3", "-I", "-c", "import cdblib").returncode != 0
        assert run("/usr/bin/python3", "-I", "-c", "import ostiary_ucspi").returncode != 0
        for account in ACCOUNTS:
            assert account_exists(account), account
        st = STATE.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == pwd.getpwnam("ostiary").pw_uid
        cst = CONFIG.stat()
        assert stat.S_IMODE(cst.st_mode) == 0o600 and cst.st_uid == 0
        for section, page in PAGES:
            r = run("man", "-w", str(section), page)
            assert r.returncode == 0 and r.stdout.startswith("/usr/share/man/"), (page, r.stderr)
        for unit in ("ostiary.socket", "ostiary@.service"):
            assert (UNITS / unit).is_file(), unit
        r = run(analyze, "verify", str(UNITS / "ostiary.socket"), str(UNITS / "ostiary@.service"))
        assert r.returncode == 0 and "ostiary" not in r.stderr, r.stderr
        assert not list(Path("/etc/systemd/system").rglob("ostiary*")), "a unit was enabled"
        assert (Path("/usr/share/ostiary-ucspi/service/ostiary/run")).is_file()
        check = run("/usr/bin/ostiary-handle", "--check", env={"PATH": "/usr/bin:/bin"})
        assert check.returncode == 0, check.stderr
        assert check.stdout.startswith(f"config {CONFIG} (the first of ")

        # The card: tcpserver ... ostiary-handle, no -c; knocked by the installed client.
        config = CONFIG.read_text()
        secret = re.search(r'^ACTION="([^"]+)"', config, re.M).group(1)
        port = unused_port()
        log = tmp_path / "log"
        with open(log, "wb") as sink:
            server = subprocess.Popen(
                [tcpserver, "-v", "-HRl0", "127.0.0.1", str(port), "/usr/bin/ostiary-handle"],
                env={"PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                start_new_session=True,
            )
        wait_for(lambda: "tcpserver: status: 0/" in log.read_text(), 10, "tcpserver to listen")
        secret_file = tmp_path / "secret"
        secret_file.write_text(secret + "\n")
        secret_file.chmod(0o600)
        knock = run(
            "/usr/bin/ostiary-client",
            "-a",
            f"127.0.0.1:{port}",
            "--secret-file",
            str(secret_file),
            env={"PATH": "/usr/bin:/bin"},
            timeout=30,
        )
        assert knock.returncode == 0, knock.stderr
        wait_for(
            lambda: "ostiary-handle: info: 127.0.0.1 /bin/echo: 127.0.0.1" in log.read_text(),
            15,
            "the installed action's output",
        )

        # An upgrade (here: a reinstall) leaves the config alone.
        r = run(
            "apt-get",
            "install",
            "-y",
            "--reinstall",
            str(deb),
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        assert r.returncode == 0, r.stderr
        assert CONFIG.read_text() == config
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
        purged = run(
            "apt-get",
            "purge",
            "-y",
            "ostiary-ucspi",
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        for account in set(ACCOUNTS) - had:
            if account_exists(account):
                run("deluser", "--system", account)
    assert purged.returncode == 0, purged.stderr
    for path in (CONFIG, STATE, PRIVATE, UNITS / "ostiary.socket", Path("/usr/bin/ostiary-handle")):
        assert not os.path.lexists(path), path
    left = sorted(files() - before)
    assert left == [], left
