"""Every user-facing command line answers --help without importing torch or
DALI (seconds of imports): its parser is built from light modules, and the
heavy ones come once the arguments are parsed. Checks the modules imported,
not the time taken."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "nvidia.dali")

CLIS = [
    "trainers/train.py", "trainers/run_ensemble.py", "trainers/predict.py",
    "trainers/evaluate.py", "trainers/export.py", "trainers/score.py",
    "benchmarks/gpu_check.py", "benchmarks/scale.py", "preprocess/build_zarr.py",
    "preprocess/verify_store.py",
]

# Runs the script as `python CLI --help` does, then lists the heavy modules imported.
PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    status = exc.code
else:
    status = 0
print("STATUS", status, sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("cli", CLIS)
def test_help_imports_neither_torch_nor_dali(cli):
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), cli], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    *help_text, last = done.stdout.rstrip().splitlines()
    assert "usage:" in "\n".join(help_text) and "--help" in "\n".join(help_text), done.stdout
    assert last in ("STATUS 0 []", "STATUS None []"), last
