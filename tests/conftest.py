"""Gates and fixtures shared by every test; the helpers themselves are in ``kit/``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))


def require_tool(name: str) -> str:
    """Return the path of system tool ``name``; skip without it, fail under CI."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (apt-get install ucspi-tcp daemontools xinetd ipsvd)"
        if IN_CI:
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)
    return path


def require_module(name: str, install: str) -> None:
    """Skip unless Python module ``name`` can be imported (``install`` says how); fail under CI."""
    if importlib.util.find_spec(name) is None:
        msg = f"the Python module {name} is not installed ({install})"
        if IN_CI:
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)


def project_tool(name: str) -> str:
    """Return the path of one of this project's installed commands.

    The interpreter's own scripts directory comes first, so a version manager's
    shell-script shims (slow, and not what users run) are not measured.
    """
    scripts = Path(sysconfig.get_path("scripts")) / name
    path = str(scripts) if scripts.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: install the project first (pip install -e '.[test]')")
    return path


from kit.site import rig  # noqa: E402,F401  (a fixture: every test may ask for a Rig)
