"""Coverage-guided fuzzing (atheris, libFuzzer) of the config, journal and tcprules parsers.

Each harness of ``tests/fuzz/`` runs for FUZZ_SECONDS (default 20) from its
seed corpus (``tests/fuzz/corpus/NAME/``, see the README there) against the
contract of ``kit.parsers``: the parser returns or raises its own one error
type; anything else is a crash, and the test prints the input that caused it.
Without atheris (it has wheels for CPython on x86_64 Linux only) the fuzzing
tests skip, and fail when ``CI`` is set; the corpus itself is checked anyway.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, require_module
from kit.parsers import check_config, check_journal, check_rules

from ostiary_ucspi.config import parse
from ostiary_ucspi.store import Journal
from ostiary_ucspi.ucspi.tcprules import parse_rules

FUZZ = ROOT / "tests" / "fuzz"
CORPUS = FUZZ / "corpus"
SECONDS = int(os.environ.get("FUZZ_SECONDS", "20"))
# Regression inputs (what a fuzzer once found) are named so; the other seeds are real files.
FOUND = "crash-"
CHECKS = {
    "config": lambda data: check_config(data.decode("utf-8", "replace")),
    "journal": check_journal,
    "tcprules": check_rules,
}
# Each seed is a real input its parser accepts: what it yields must not be empty.
ACCEPTS = {
    "config": lambda data: parse(data.decode(), "seed").actions,
    "journal": lambda data: Journal(data, "seed").records(),
    "tcprules": parse_rules,
}
# Left out of what a failure shows: libFuzzer's progress lines and closing
# dictionary, atheris's list of the modules it instruments.
NOISE = re.compile(r'#\d+\s+(NEW|REDUCE|pulse)\s|"|INFO: Instrumenting |WARNING: Failed to find')


def corpus(name: str) -> list:
    """Return the corpus files of parser ``name``."""
    return sorted(p for p in (CORPUS / name).iterdir() if p.is_file())


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_every_corpus_input_meets_the_contract(name):
    files = corpus(name)
    seeds = [p for p in files if not p.name.startswith(FOUND)]
    assert seeds, f"tests/fuzz/corpus/{name}/ has no real seed"
    for path in files:
        CHECKS[name](path.read_bytes())
    for path in seeds:
        assert ACCEPTS[name](path.read_bytes()), f"{path}: the parser takes nothing from it"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_fuzzer_finds_no_crash(name, tmp_path):
    require_module("atheris", "pip install -e '.[test]' on CPython, x86_64 Linux")
    grown = tmp_path / "corpus"  # what the fuzzer adds: never into the repository
    grown.mkdir()
    argv = [
        sys.executable,
        str(FUZZ / f"fuzz_{name}.py"),
        f"-max_total_time={SECONDS}",
        "-timeout=10",
        "-rss_limit_mb=1024",
        "-print_final_stats=1",
        f"-dict={FUZZ / name}.dict",
        f"-artifact_prefix={tmp_path}/",
        str(grown),
        str(CORPUS / name),
    ]
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # atheris prints the traceback on stdout, libFuzzer on stderr
        text=True,
        errors="backslashreplace",
        timeout=SECONDS + 120,
    )
    log = "\n".join(line for line in proc.stdout.splitlines() if not NOISE.match(line))
    found = sorted(p for p in tmp_path.iterdir() if p.is_file())
    shown = "".join(f"\n{p.name}: {p.read_bytes()[:2000]!r}" for p in found)
    assert proc.returncode == 0 and not found, (
        f"fuzz_{name}.py exited {proc.returncode}; input(s):{shown}\n{log[-6000:]}"
    )
    runs = re.search(r"^stat::number_of_executed_units: (\d+)$", log, re.M)
    assert runs and int(runs.group(1)) > 0, log[-3000:]
    # Coverage guidance works: the instrumented parser led the fuzzer to new inputs.
    assert any(grown.iterdir()), f"no input reached new code in {SECONDS} s\n{log[-3000:]}"
    print(f"fuzz_{name}: {runs.group(1)} inputs in {SECONDS} s, {len(list(grown.iterdir()))} new")
