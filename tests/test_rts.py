"""Golden transcripts: every program's usage and error lines, exit statuses (tests/rts/)."""

import os
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

from ostiary_ucspi import __version__

RTS = Path(__file__).resolve().parent / "rts"


def sections(text: str) -> dict[str, str]:
    """Split a transcript into {program: its lines}, at the ``=== PROGRAM`` lines."""
    parts = re.split(r"^=== (\S+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module")
def transcript(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Run rts.tests once in an empty directory; DIR and VERSION stand for what varies."""
    work = tmp_path_factory.mktemp("rts")
    scripts = sysconfig.get_path("scripts")
    env = {"PATH": f"{scripts}:/usr/bin:/bin", "LC_ALL": "C"}
    out = subprocess.run(
        ["sh", str(RTS / "rts.tests")],
        cwd=work,
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    out = out.replace(str(work), "DIR").replace(f" {__version__}\n", " VERSION\n")
    return sections(out)


EXPECTED = sections((RTS / "rts.exp").read_text())


@pytest.mark.parametrize("program", sorted(EXPECTED))
def test_transcript(transcript: dict[str, str], program: str) -> None:
    assert transcript.get(program) == EXPECTED[program]


def test_every_program_has_a_transcript() -> None:
    installed = {
        line.split("=")[0].strip()
        for line in (RTS.parent.parent / "pyproject.toml").read_text().splitlines()
        if line.startswith("ostiary-")
    }
    assert installed | {"ostiary-handle"} <= set(EXPECTED)
    assert os.path.exists(RTS / "rts.tests")
