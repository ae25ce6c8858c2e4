"""Every way the package is installed starts ostiary-handle and serves; the fast start where it can.

The fast start (``python -I -S ostiary-handle``, as service/ostiary/run starts
it) finds the package next to the script's own installation without running
``site``; where it cannot (an editable install), ``site`` runs after all.
``-X importtime`` shows which: the fast start never imports site.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import project_tool

ROOT = Path(__file__).resolve().parent.parent
BASE_PYTHON = os.path.join(
    sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built once as a wheel."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    return next(out.glob("ostiary_ucspi-*.whl"))


def pip_install(python: str, *args: str, env: dict[str, str] | None = None) -> None:
    """``python -m pip install ARGS``, where PEP 668 would refuse a scratch install too."""
    marker = Path(
        sys.base_prefix,
        "lib",
        f"python{sys.version_info[0]}.{sys.version_info[1]}",
        "EXTERNALLY-MANAGED",
    )
    extra = ["--break-system-packages"] if marker.exists() and "venv" not in python else []
    subprocess.run(
        [python, "-m", "pip", "install", "-q", *extra, *args], check=True, timeout=300, env=env
    )


def serve_once(handler: str, cfg: Path, env: dict[str, str], fast: bool) -> tuple[bytes, bool]:
    """One connection to ``handler``; return (bytes the client got, whether site was imported)."""
    with open(handler) as f:
        python = f.readline()[2:].split()[0]
    if fast:
        argv = [python, "-X", "importtime", "-I", "-S", handler]
    else:  # as pip's shebang starts it: no -I, so the variable works
        argv, env = [handler], {**env, "PYTHONPROFILEIMPORTTIME": "1"}
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen(
            [*argv, "-c", str(cfg)],
            stdin=theirs,
            stdout=theirs,
            stderr=subprocess.PIPE,
            env={**env, "TCPREMOTEIP": "127.0.0.1"},
        )
        theirs.close()
        ours.settimeout(30)
        got = ours.recv(64)
        ours.shutdown(socket.SHUT_WR)
        err = proc.communicate(timeout=30)[1].decode()
    assert proc.returncode == 0, err
    assert "ostiary_ucspi.handle" in err  # importtime did report
    return got, bool(re.search(r"\|\s+site$", err, re.M))


def config(tmp: Path) -> Path:
    (tmp / "state").mkdir()
    cfg = tmp / "ostiary.cfg"
    cfg.write_text(
        f'KILL="install-kill-passphrase"\nACTION="install-open-passphrase","/bin/true"\n'
        f"LOCKOUT_DB={tmp}/state/lockout.cdb\nDELAY=0\n"
    )
    cfg.chmod(0o600)
    return cfg


@pytest.mark.parametrize("kind", ["venv", "user", "prefix"])
def test_an_installed_handler_starts_fast_and_serves(
    wheel: Path, tmp_path: Path, kind: str
) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    if kind == "venv":
        subprocess.run([BASE_PYTHON, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
        pip_install(str(tmp_path / "venv" / "bin" / "python"), str(wheel))
        handler = tmp_path / "venv" / "bin" / "ostiary-handle"
    elif kind == "user":
        pip_install(BASE_PYTHON, "--user", str(wheel), env={**os.environ, **env})
        handler = tmp_path / "home" / ".local" / "bin" / "ostiary-handle"
    else:  # a system-style install under a prefix (/usr/local, say)
        prefix = tmp_path / "usr" / "local"
        pip_install(BASE_PYTHON, "--prefix", str(prefix), str(wheel))
        # Debian's python3 run outside a venv puts --prefix P under P/local (its
        # posix_local scheme); the fast start looks next to the script either way.
        places = [prefix / "bin", prefix / "local" / "bin"]
        handler = next(p / "ostiary-handle" for p in places if (p / "ostiary-handle").exists())
    cfg = config(tmp_path)
    got, site = serve_once(str(handler), cfg, env, fast=True)
    assert len(got) == 32
    assert not site, "the fast start ran site"
    if kind != "prefix":  # site knows no scratch prefix; it does know /usr/local
        got, site = serve_once(str(handler), cfg, env, fast=False)  # as pip's shebang starts it
        assert len(got) == 32 and site


def test_an_editable_install_falls_back_to_site_and_serves(tmp_path: Path) -> None:
    handler = project_tool("ostiary-handle")
    pkg = Path(handler).resolve().parent.parent / "lib"
    if list(pkg.glob("python*/site-packages/ostiary_ucspi/handle.py")):
        pytest.skip("the test interpreter's install is not editable: the kinds above cover it")
    got, site = serve_once(handler, config(tmp_path), {"PATH": "/usr/bin:/bin"}, fast=True)
    assert len(got) == 32
    assert site, "an editable install needs site's .pth files"
