"""The package's plan holds: the shim stands alone, private names stay in one module, one version."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ostiary_ucspi

PACKAGE = Path(ostiary_ucspi.__file__).resolve().parent
ROOT = PACKAGE.parent
LEAVES = {"ostiary_ucspi.cdb", "ostiary_ucspi.fail"}  # what the shim may import of the rest


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if node.module is None or node.level:
                found.update(
                    f"{base}.{alias.name}" if not node.module else base for alias in node.names
                )
            else:
                found.add(base)
    return found


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n == "ostiary_ucspi" or n.startswith("ostiary_ucspi.")}


@pytest.mark.parametrize("path", sorted((PACKAGE / "ucspi").glob("*.py")), ids=lambda p: p.name)
def test_the_shim_imports_nothing_of_the_rest_but_the_leaves(path: Path) -> None:
    outside = {n for n in ours(imports(path)) if not n.startswith("ostiary_ucspi.ucspi")}
    assert outside <= LEAVES, (path.name, outside - LEAVES)


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_the_leaves_import_nothing_of_the_package(leaf: str) -> None:
    path = ROOT / (leaf.replace(".", "/") + ".py")
    assert ours(imports(path)) <= {"ostiary_ucspi.__version__"}  # fail.py, for --version


def test_only_cpython_py_imports_private_modules() -> None:
    private = re.compile(r"^_[a-z]")
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cpython.py":
            continue
        names = {n for n in imports(path) if private.match(n.split(".")[0])}
        if names:
            offenders[str(path.relative_to(ROOT))] = names
    assert offenders == {}


def test_one_version_everywhere() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "ostiary_ucspi.__version__" }' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", ostiary_ucspi.__version__)
    releases = re.findall(r"^(\d+\.\d+\.\d+)\s", (ROOT / "NEWS").read_text(), re.M)
    assert releases[0] == ostiary_ucspi.__version__  # the newest entry is this version


def test_the_handler_imports_no_shim_and_no_operator_tool() -> None:
    code = (
        "import sys, ostiary_ucspi.handle; "
        "print(sorted(m for m in sys.modules if m.startswith('ostiary_ucspi')))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd="/", check=True
    ).stdout
    loaded = set(ast.literal_eval(out))
    assert not {m for m in loaded if ".ucspi" in m or ".admin" in m or m.endswith(".client")}


def test_a_handler_serving_a_small_store_loads_no_mmap_module(tmp_path: Path) -> None:
    """Debian's python3 builds mmap as a shared library of its own: a small store reads."""
    cfg = tmp_path / "ostiary.cfg"
    cfg.write_text(f'KILL="k"\nACTION="a","/bin/true"\nLOCKOUT_DB={tmp_path}/lockout.cdb\n')
    code = (
        "import sys, os; from ostiary_ucspi import handle; "
        "os.environ['TCPREMOTEIP'] = '192.0.2.1'; "
        f"handle.main(['ostiary-handle', '-c', {str(cfg)!r}]); "
        "print('mmap' in sys.modules, file=sys.stderr)"
    )
    for run in ("creates the store", "reads it"):
        done = subprocess.run(
            [sys.executable, "-I", "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the salt
            stderr=subprocess.PIPE,
            text=True,
        )
    assert done.stderr.splitlines()[-1] == "False", (run, done.stderr)
