"""The documentation: doc/ pages render to man pages, exit codes match the code, citations exist."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
from conftest import IN_CI, ROOT, require_tool

DOC = ROOT / "doc"
# page -> the module whose EXITS its "Exit codes" section must list
PROGRAMS = {
    "ostiary-handle": "ostiary_ucspi.handle",
    "ostiary-client": "ostiary_ucspi.client",
    "ostiary-lockout": "ostiary_ucspi.admin.lockout",
    "ostiary-tcpserver": "ostiary_ucspi.ucspi.tcpserver",
    "ostiary-tcprules": "ostiary_ucspi.ucspi.tcprules",
    "ostiary-conf": "ostiary_ucspi.admin.conf",
}
MAN_PAGES = {**{name: "1" for name in PROGRAMS}, "ostiary.cfg": "5"}
HEADINGS = ["Synopsis", "Interface", "Options", "Environment", "Files", "Exit codes", "Notes"]
# tests/test_x.py::name or test_x.py::name, with an optional parametrised id
CITATION = re.compile(r"((?:tests/(?:\w+/)*)?test_\w+\.py)::(\w+)(?:\[[^\]\s]*\])?")


def docutils_or_skip():
    """Return docutils.core; skip without docutils, fail under CI."""
    try:
        import docutils.core
    except ImportError:
        if IN_CI:
            pytest.fail("docutils is not installed (pip install docutils); CI must have it")
        pytest.skip("docutils is not installed")
    return docutils.core


def doctree(name: str):
    """Parse doc/NAME.rst, halting on any warning."""
    core = docutils_or_skip()
    source = (DOC / f"{name}.rst").read_text()
    return core.publish_doctree(
        source, source_path=f"{name}.rst", settings_overrides={"halt_level": 2, "report_level": 2}
    )


def sections(tree) -> dict[str, object]:
    """Return {title: section node} of a page's top-level sections."""
    from docutils import nodes

    found = {}
    for sec in tree.children:
        if isinstance(sec, nodes.section):
            found[sec.next_node(nodes.title).astext()] = sec
    return found


def exit_codes(section) -> set[int]:
    """The statuses an "Exit codes" section lists: its definition-list terms."""
    from docutils import nodes

    codes = set()
    for term in section.findall(nodes.term):
        text = term.astext().strip()
        assert text.isdigit(), f"exit-code term is not a number: {text!r}"
        codes.add(int(text))
    return codes


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_program_pages_have_the_same_headings_in_order(name: str) -> None:
    assert list(sections(doctree(name))) == HEADINGS


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_exit_codes_on_each_page_are_the_codes_the_program_has(name: str) -> None:
    listed = exit_codes(sections(doctree(name))["Exit codes"])
    module = importlib.import_module(PROGRAMS[name])
    assert listed == set(module.EXITS), f"doc/{name}.rst lists {sorted(listed)}"


@pytest.mark.parametrize("name", sorted(MAN_PAGES))
def test_every_page_renders_to_a_man_page_without_warnings(name: str, tmp_path) -> None:
    core = docutils_or_skip()
    from docutils.writers import manpage

    source = (DOC / f"{name}.rst").read_text()
    page = core.publish_string(
        source,
        source_path=f"{name}.rst",
        writer=manpage.Writer(),
        settings_overrides={"halt_level": 2, "report_level": 2},
    )
    text = page.decode() if isinstance(page, bytes) else page
    title = rf'^\.TH "?{re.escape(name)}"? "?{MAN_PAGES[name]}"?'
    assert re.search(title, text, re.M | re.I), text[:400]
    if shutil.which("man") is None:  # man-db is optional here; docutils alone is the check
        return
    out = tmp_path / f"{name}.{MAN_PAGES[name]}"
    out.write_text(text)
    env = {**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8"}
    done = subprocess.run(
        ["man", "--warnings", "-l", str(out)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "synopsis" in done.stdout.lower()


@pytest.mark.parametrize("name", ["benchmarks", "deployment", "store", "tests"])
def test_guide_pages_parse_without_warnings(name: str) -> None:
    tree = doctree(name)  # a warning raises
    assert tree.get("title", "").startswith(name), tree.get("title")
    assert sections(tree), f"doc/{name}.rst has no sections"


def test_make_man_writes_every_page(tmp_path) -> None:
    make = require_tool("make")
    docutils_or_skip()
    work = tmp_path / "doc"
    shutil.copytree(DOC, work, ignore=shutil.ignore_patterns("man"))
    path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    done = subprocess.run(
        [make, "-C", str(work), "man"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (work / "man").iterdir())
    assert written == sorted(f"{n}.{s}" for n, s in MAN_PAGES.items())


def cited_files() -> list:
    return [ROOT / "SECURITY.md", ROOT / "README.md", *sorted(DOC.glob("*.rst"))]


def test_every_cited_test_exists() -> None:
    citations = []
    for doc in cited_files():
        for m in CITATION.finditer(doc.read_text()):
            citations.append((doc.name, m.group(1), m.group(2)))
    assert citations, "no test citations found: the pattern is wrong"
    missing = []
    for doc, file, name in citations:
        found = (
            [ROOT / file] if file.startswith("tests/") else sorted(ROOT.glob(f"tests/**/{file}"))
        )
        path = found[0] if found else ROOT / "tests" / file
        if not path.is_file() or not re.search(
            rf"^\s*(?:async\s+)?def {name}\(", path.read_text(), re.M
        ):
            missing.append(f"{doc}: {file}::{name}")
    assert not missing, "stale citations:\n" + "\n".join(missing)


def test_readme_links_exist() -> None:
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#:]+)\)", text)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
