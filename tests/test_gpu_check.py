"""benchmarks/gpu_check.py: without a GPU it says so and passes; with a GPU the
driver cannot serve it fails; its CPU rehearsal runs every stage end to end
(so the first run on a lent GPU spends its minutes on the GPU, not on this
script's own bugs); a failing stage fails the check."""
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check
from engine import device

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# this environment less PYTHONPATH: the repo root only from the script's own path
NOT_INSTALLED = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_without_a_gpu_it_says_so_in_one_line_and_passes(capsys, monkeypatch):
    monkeypatch.setattr(device, "gpus_seen_by_driver", lambda: [])
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA GPU" in out[0]


def test_a_gpu_the_driver_sees_but_torch_cannot_use_fails(capsys, monkeypatch):
    monkeypatch.setattr(device, "gpus_seen_by_driver", lambda: ["GPU 0: NVIDIA H100"])
    assert gpu_check.main([]) == 1
    assert "FAIL cuda" in capsys.readouterr().out


def test_the_cpu_rehearsal_passes_every_stage(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--work", str(tmp_path / "w")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = [line.split()[1] for line in lines if line.startswith("PASS ") and "gpu-check" not in line]
    assert passed == [name for name, _ in gpu_check.STAGES]
    assert lines[-1].startswith("PASS gpu-check: 8/8 stages passed")
    # every stage summarises what it checked
    summaries = {line.split()[1]: line for line in lines if line.startswith("PASS ")}
    assert "alignment >=" in summaries["loader"]
    assert "grey-level difference" in summaries["photometric"]
    assert "world size 2 (gloo)" in summaries["torchrun"]
    assert "rows" in summaries["predict"] and "samples" not in summaries["predict"]
    assert "opencv" in summaries["throughput"] and "dali" in summaries["throughput"]


def test_a_failing_stage_fails_the_check_and_shows_why(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--work", str(tmp_path / "empty"),
                           "--only", "predict"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert any(line.startswith("FAIL predict") for line in done.stdout.splitlines())
    assert "FAIL gpu-check: 0/1 stages passed" in done.stdout
    assert "    | " in done.stdout   # the stage's own output, indented


def test_it_runs_from_a_checkout_without_installing(tmp_path):
    # the lent GPU machine runs it from an unpacked project: no PYTHONPATH, another folder
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                          env=NOT_INSTALLED, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA GPU" in done.stdout


def test_the_quick_budgets_fit_one_ten_minute_command():
    assert sum(timeout for _, timeout in gpu_check.QUICK_STAGES) < 480
    assert {name for name, _ in gpu_check.QUICK_STAGES} <= set(gpu_check.STAGE_FUNCTIONS)


def test_the_quick_cpu_rehearsal_passes_and_prints_its_budgets(tmp_path):
    # on these shared 2 cores the budgets, set for an H200, are tripled
    done = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--quick", "--timeout-scale", "3",
                           "--work", str(tmp_path / "w")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=NOT_INSTALLED)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert lines[1] == "stage budgets: " + ", ".join(
        f"{name} {3 * budget} s" for name, budget in gpu_check.QUICK_STAGES) + \
        f" = {3 * sum(b for _, b in gpu_check.QUICK_STAGES)} s"
    summaries = {line.split()[1]: line for line in lines if line.startswith("PASS ")}
    assert list(summaries)[:-1] == [name for name, _ in gpu_check.QUICK_STAGES]
    assert "Numba cache warm" in summaries["data"] and "world size 2 (gloo)" in summaries["torchrun"]
    assert "highres_no_ela with flip TTA" in summaries["predict"]
    assert lines[-1].startswith(f"PASS gpu-check: {len(gpu_check.QUICK_STAGES)}/")
