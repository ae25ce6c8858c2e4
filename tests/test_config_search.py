"""Without -c the programs read the first of config.SEARCH that exists, and --check says which."""

from __future__ import annotations

from pathlib import Path

import pytest

from ostiary_ucspi import check, config
from ostiary_ucspi.admin import lockout

VALID = 'KILL="kill-passphrase-long"\nACTION="action-passphrase-1","/bin/true"\nLOCKOUT_DB="{db}"\n'


@pytest.fixture
def search(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """SEARCH pointed at two files of tmp_path, neither there yet."""
    first, second = tmp_path / "etc" / "ostiary.cfg", tmp_path / "etc" / "ostiary" / "ostiary.cfg"
    second.parent.mkdir(parents=True)
    monkeypatch.setattr(config, "SEARCH", (str(first), str(second)))
    monkeypatch.setattr(check, "SEARCH", config.SEARCH)
    (tmp_path / "state").mkdir(mode=0o700)
    return first, second


def write(path: Path, tmp_path: Path) -> None:
    path.write_text(VALID.format(db=tmp_path / "state" / "lockout.cdb"))
    path.chmod(0o600)


def test_the_shipped_search_is_root_only_directories():
    assert config.SEARCH == ("/etc/ostiary.cfg", "/etc/ostiary/ostiary.cfg")
    assert config.DEFAULT_PATH == config.SEARCH[0]


def test_first_that_exists_wins(search, tmp_path):
    first, second = search
    assert config.find() == str(first)  # none: the first, whose absence the error names
    write(second, tmp_path)
    assert config.find() == str(second)
    write(first, tmp_path)
    assert config.find() == str(first)


def test_check_says_which_file_it_used(search, tmp_path, capsys):
    first, second = search
    write(second, tmp_path)
    assert check.check_main(None) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"config {second} (the first of {first}, {second} that exists)\n")
    assert check.check_main(str(second)) == 0
    assert capsys.readouterr().out.startswith(f"config {second}\nlockout store ")


def test_lockout_tool_searches_the_same_way(search, tmp_path):
    first, second = search
    write(second, tmp_path)
    assert lockout.parse_args(["ostiary-lockout", "list"])[0] == str(second)
    assert lockout.parse_args(["ostiary-lockout", "-c", "/x.cfg", "list"])[0] == "/x.cfg"
