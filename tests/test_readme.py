"""README's commands, as a new user pastes them on a stock Debian 12 or Ubuntu 24.04.

Debian's own python3 (with its EXTERNALLY-MANAGED marker, PEP 668), a copy of
the clone, a plain user (nobody, when the tests run as root): the serve
command, the knock command under it, and the test command (apt-get stood in
for, pytest only collecting) must work as written. Only the port and the
example's state directory are changed, so that nothing collides with a
running service or another test.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pexpect
import pytest
from conftest import IN_CI, ROOT
from kit.procs import wait_for
from kit.servers import unused_port

DEBIAN_PYTHON = Path("/usr/bin/python3")
EXAMPLE_STATE = "/tmp/ostiary-example"
EXAMPLE_PASSPHRASE = "example-hello-passphrase"


def readme_blocks() -> list[str]:
    """Return README's fenced sh blocks, in order."""
    return re.findall(r"^```sh\n(.*?)\n```$", (ROOT / "README.md").read_text(), re.M | re.S)


def readme_test_command() -> str:
    """README's test command, extracted the way .ci/run does."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- test-command -->", 1)[1]
    return re.search(r"^```sh\n(.*?)\n```$", block, re.M | re.S).group(1)


def ci_packages() -> list[str]:
    """The Debian packages .ci/run installs."""
    text = (ROOT / ".ci" / "run").read_text()
    listed = re.search(r"^packages=\((.*?)\)$", text, re.M | re.S).group(1)
    return [w for line in listed.splitlines() for w in line.split("#")[0].split()]


def test_the_test_command_installs_what_ci_installs():
    words = shlex.split(readme_test_command())
    at = words.index("install")
    installed = []
    for word in words[at + 1 :]:
        if word == "&&":
            break
        if not word.startswith("-"):
            installed.append(word)
    assert sorted(installed) == sorted(ci_packages())


def test_no_command_breaks_system_packages():
    for block in readme_blocks():
        assert "--break-system-packages" not in block
        assert "sudo pip" not in block and "python3 -m pip install" not in block


def debian_python() -> Path:
    """Debian's python3 with its PEP 668 marker; skip without it, fail under CI."""
    markers = list(Path("/usr/lib").glob("python3*/EXTERNALLY-MANAGED"))
    if not (DEBIAN_PYTHON.exists() and markers):
        msg = (
            "needs Debian's python3 with EXTERNALLY-MANAGED (apt-get install python3 python3-venv)"
        )
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    r = subprocess.run([str(DEBIAN_PYTHON), "-c", "import ensurepip"], capture_output=True)
    if r.returncode != 0:
        msg = "Debian's python3 has no venv support (apt-get install python3-venv)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return DEBIAN_PYTHON


class Clone:
    """A copy of the clone, owned by the plain user who runs the commands."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.dir = base / "clone"
        self.state = base / "state"
        self.bin = base / "bin"  # python3 is Debian's; apt-get is a stand-in
        self.home = base / "home"
        for d in (self.dir, self.bin, self.home):
            d.mkdir()
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for name in filter(None, listed.split("\0")):
            source = ROOT / name
            if not os.path.lexists(source):
                continue
            target = self.dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                target.symlink_to(os.readlink(source))
            else:
                shutil.copy2(source, target)
        cfg = self.dir / "examples" / "ostiary.cfg"
        cfg.write_text(cfg.read_text().replace(EXAMPLE_STATE, str(self.state)))
        (self.bin / "python3").symlink_to(debian_python())
        (self.bin / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {base}/apt-get.args\n')
        (self.bin / "apt-get").chmod(0o755)
        self.user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            pw = pwd.getpwnam(self.user)
            os.chmod(base, 0o755)
            for dirpath, dirnames, filenames in os.walk(base):
                for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                    os.lchown(name, pw.pw_uid, pw.pw_gid)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.startswith(("PIP_", "LANG", "LC_"))}
        env.update(PATH=f"{self.bin}:/usr/bin:/bin", HOME=str(self.home), TERM="dumb")
        return env

    def argv(self, command: str) -> list[str]:
        """Run ``command`` with bash in the clone, as the plain user."""
        shell = ["bash", "-c", command]
        if os.geteuid() != 0:
            return shell
        return ["setpriv", "--reuid", self.user, "--regid", "nogroup", "--clear-groups", *shell]

    def adapt(self, command: str, port: int) -> str:
        """The command as written, but for the port and the example's state directory."""
        assert "7050" in command or "pytest" in command, command
        return command.replace("7050", str(port)).replace(EXAMPLE_STATE, str(self.state))


@pytest.fixture(scope="module")
def clone():
    debian_python()
    base = Path(tempfile.mkdtemp(prefix="ostiary-readme-"))
    yield Clone(base)
    shutil.rmtree(base, ignore_errors=True)


def test_serve_and_knock_commands_with_debians_python(clone):
    blocks = readme_blocks()
    serve = next(b for b in blocks if "ostiary-tcpserver" in b)
    knock = blocks[blocks.index(serve) + 1]  # right under the serve command
    assert "ostiary-client" in knock
    port = unused_port()
    log = clone.base / "serve.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            clone.argv(clone.adapt(serve, port)),
            cwd=clone.dir,
            env=clone.env(),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: "tcpserver: status: 0/" in log.read_text() or server.poll() is not None,
            300,
            "the serve command to listen",
        )
        assert server.poll() is None, log.read_text()[-3000:]
        home = (clone.dir / ".venv" / "pyvenv.cfg").read_text()
        assert re.search(r"^executable = /usr/bin/python3", home, re.M), home
        argv = clone.argv(clone.adapt(knock, port))
        child = pexpect.spawn(
            argv[0], argv[1:], cwd=str(clone.dir), env=clone.env(), timeout=60, encoding="utf-8"
        )
        child.expect("Enter command secret: ")
        child.sendline(EXAMPLE_PASSPHRASE)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        wait_for(lambda: "/bin/echo: 127.0.0.1" in log.read_text(), 20, "the action's output")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def test_test_command_with_debians_python(clone):
    env = clone.env()
    env["PYTEST_ADDOPTS"] = "--collect-only"
    r = subprocess.run(
        clone.argv(clone.adapt(readme_test_command(), 0)),
        cwd=clone.dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"\d+ tests collected", r.stdout), r.stdout[-2000:]
    args = (clone.base / "apt-get.args").read_text().splitlines()
    assert args[0] == "update" and args[1].startswith("install -y ")
    venv_python = clone.dir / ".venv" / "bin" / "python"
    assert os.path.realpath(venv_python) == os.path.realpath(DEBIAN_PYTHON)
