"""Ending quietly: the build, a finished training run and one stopped by
Ctrl-C print no worker tracebacks and no leaked-semaphore warnings. Ctrl-C is
sent as a terminal sends it: SIGINT to the whole process group, DALI's
reader workers included."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TRAIN = [sys.executable, "trainers/train.py", "--member", "highres_no_ela",
         "--encoder", "timm-mobilenetv3_small_minimal_100", "--encoder-weights", "none",
         "--img-size", "64", "--batch-size", "2", "--device", "cpu", "--workers", "2"]


def assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "leaked semaphore" not in stderr, stderr


def test_the_build_ends_without_leaked_semaphores(demo_source, tmp_path):
    done = subprocess.run([sys.executable, "preprocess/build_zarr.py", "--source", str(demo_source),
                           "--out", str(tmp_path / "s.zarr"), "--workers", "2"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_quiet(done.stderr)


def test_a_finished_run_ends_quietly(store, tmp_path):
    done = subprocess.run(TRAIN + ["--store", str(store), "--out", str(tmp_path), "--epochs", "1",
                                   "--max-steps", "2"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_quiet(done.stderr)


def test_ctrl_c_during_training_ends_quietly(store, tmp_path):
    run = subprocess.Popen(TRAIN + ["--store", str(store), "--out", str(tmp_path), "--epochs", "3",
                                    "--max-steps", "500"],
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        seen = _read_until(run, b" 2/", deadline=time.monotonic() + 240)   # the progress bar's step 2
        os.killpg(run.pid, signal.SIGINT)
        _, rest = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    stderr = (seen + rest).decode(errors="replace")
    assert run.returncode == 130, stderr
    assert "interrupted at step" in stderr
    assert_quiet(stderr)


def _read_until(run: subprocess.Popen, marker: bytes, deadline: float) -> bytes:
    """stderr of `run` up to and including `marker`'s chunk."""
    os.set_blocking(run.stderr.fileno(), False)
    seen = b""
    while marker not in seen:
        assert time.monotonic() < deadline and run.poll() is None, seen.decode(errors="replace")
        seen += run.stderr.read() or b""
        time.sleep(0.2)
    os.set_blocking(run.stderr.fileno(), True)
    return seen
