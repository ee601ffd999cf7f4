"""Every user-facing CLI, given the usual mistakes (a missing file, the wrong
folder, a bad value), ends with exit status 2 and one line on stderr that
names the problem, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = "no/such/place"

# (CLI, its arguments: {tmp} is a scratch folder, {file} a text file in it,
# {missing} a path that does not exist; what the error line must name)
CASES = [
    ("preprocess/build_zarr.py", ["--source", "{missing}", "--out", "{tmp}/s.zarr"], "{missing}"),
    ("preprocess/build_zarr.py", ["--source", "{file}", "--out", "{tmp}/s.zarr"], "{file}"),
    ("preprocess/build_zarr.py", ["--workers", "0", "--out", "{tmp}/s.zarr"], "--workers"),
    ("preprocess/verify_store.py", ["{missing}"], "{missing}"),
    ("preprocess/verify_store.py", ["{tmp}"], "{tmp}"),
    ("trainers/train.py", ["--member", "highres_no_ela", "--store", "{missing}",
                           "--out", "{tmp}/run"], "{missing}"),
    ("trainers/train.py", ["--member", "no_such_member", "--store", "{tmp}"], "no_such_member"),
    ("trainers/train.py", ["--member", "highres_no_ela", "--store", "{tmp}", "--epochs", "-1"],
     "--epochs"),
    ("trainers/predict.py", ["--images", "{missing}", "--out", "{tmp}/p.csv"], "{missing}"),
    ("trainers/predict.py", ["--images", "{tmp}", "--out", "{tmp}/p.csv"], "{tmp}"),
    ("trainers/predict.py", ["--store", "{tmp}", "--models", "{missing}"], "{missing}"),
    ("trainers/predict.py", ["--store", "{tmp}", "--threshold", "2"], "threshold 2"),
    ("trainers/evaluate.py", ["--store", "{tmp}", "--models", "{missing}", "--out", "{tmp}/e"],
     "{missing}"),
    ("trainers/score.py", ["--solution", "{missing}", "--submission", "{file}"], "{missing}"),
    ("trainers/score.py", ["--solution", "{file}", "--submission", "{file}"], "{file}"),
    ("trainers/run_ensemble.py", ["--store", "{missing}", "--out", "{tmp}/r"], "{missing}"),
    ("trainers/export.py", ["--models", "{missing}", "--out", "{tmp}/x"], "{missing}"),
    ("trainers/export.py", ["--models", "{tmp}", "--out", "{tmp}/x"], "{tmp}"),
    ("benchmarks/loader_throughput.py", ["--store", "{missing}"], "{missing}"),
    ("benchmarks/loader_throughput.py", ["--store", "{tmp}"], "{tmp}"),
]


@pytest.mark.parametrize("cli, args, named", CASES,
                         ids=[f"{c.split('/')[1]}:{' '.join(a)}" for c, a, _ in CASES])
def test_a_user_mistake_is_one_line_and_exit_2(tmp_path, cli, args, named):
    (tmp_path / "notes.txt").write_text("not what was asked for\n")
    where = {"tmp": str(tmp_path), "file": str(tmp_path / "notes.txt"),
             "missing": str(tmp_path / MISSING)}
    done = subprocess.run([sys.executable, cli, *(a.format(**where) for a in args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    problem = [line for line in lines if "error:" in line]
    assert problem and named.format(**where) in problem[0], done.stderr[-3000:]
    assert len(problem) == 1, done.stderr[-3000:]
