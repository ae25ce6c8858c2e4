"""Coverage-guided fuzzing of ostiary-tcprules' parser (atheris); seeds: corpus/README.md.

Usage: python tests/fuzz/fuzz_tcprules.py [libFuzzer flags] [corpus dirs]
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for kit
with atheris.instrument_imports(include=["ostiary_ucspi"]):
    from kit.parsers import check_rules

if __name__ == "__main__":
    atheris.Setup(sys.argv, check_rules)
    atheris.Fuzz()
