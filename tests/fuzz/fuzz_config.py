"""Coverage-guided fuzzing of ostiary.cfg's parser (atheris); seeds: corpus/README.md.

Usage: python tests/fuzz/fuzz_config.py [libFuzzer flags] [corpus dirs]
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for kit
with atheris.instrument_imports(include=["ostiary_ucspi"]):
    from kit.parsers import check_config


def one_input(data: bytes) -> None:
    """Parse ``data`` as load() would hand it over: decoded, invalid UTF-8 replaced."""
    check_config(data.decode("utf-8", "replace"))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
