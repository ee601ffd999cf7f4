"""A store URL that stops answering at any point of a training run (the
first batch, an epoch's start, validation, after a checkpoint) ends it the
way a failure mid-epoch does: one line naming the store, exit status 2, a
checkpoint of the last completed step and the command that resumes it."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import engine
from engine.loader import Loader
from trainers import run_folder
from trainers import train as train_module
from trainers import training
from trainers.checkpoint import last_path, load_checkpoint

from test_object_storage import ROOT, Relay, bucket, s3_store  # noqa: F401 (fixtures)


class OnceRelay(Relay):
    is_cut = False

    def cut(self):
        self.is_cut = True
        super().cut()


def cut_before(monkeypatch, relay, owner, name, when=lambda *a, **k: True):
    """Cut the relay as `owner.name` is called, where `when` holds."""
    original = getattr(owner, name)

    def cutting(*args, **kwargs):
        if not relay.is_cut and when(*args, **kwargs):
            relay.cut()
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, cutting)


def cut_after_train_loader(monkeypatch, relay):
    original = engine.make_loader

    def making(*args, **kwargs):
        loader = original(*args, **kwargs)
        if not relay.is_cut and kwargs.get("split") == "train":
            relay.cut()
        return loader
    monkeypatch.setattr(engine, "make_loader", making)


POINTS = {
    "first batch": cut_after_train_loader,
    # as epoch 1's last batch is taken: the reader workers fail on epoch 2's
    # first batches, while validation reads the batches it has ready
    "epoch start": lambda m, r: cut_before(m, r, Loader, "_next_epoch",
                                           lambda self: self.epoch == 1 and self.planner.fixed is None),
    "validation": lambda m, r: cut_before(m, r, training, "validate"),
    "checkpoint": lambda m, r: cut_before(m, r, training, "save_checkpoint"),
}


@pytest.mark.parametrize("point, workers", [(p, 1) for p in POINTS] + [("first batch", 0)])
def test_storage_that_stops_answering_anywhere_ends_the_run_resumably(
        s3_store, s3_server, tmp_path, monkeypatch, capsys, point, workers):
    relay = OnceRelay(s3_server["endpoint"])
    POINTS[point](monkeypatch, relay)
    run = tmp_path / "run"
    status = train_module.main([
        "--member", "highres_no_ela", "--store", s3_store, "--out", str(run), "--epochs", "3",
        "--encoder-weights", "none", "--encoder", "timm-mobilenetv3_small_minimal_100",
        "--img-size", "64", "--batch-size", "2", "--device", "cpu", "--workers", str(workers),
        "--storage-option", f"endpoint_url={relay.endpoint}"])
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err
    problem = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(problem) == 1 and s3_store in problem[0], err[-3000:]
    assert "cannot reach its storage" in problem[0]
    resume = [line for line in err.splitlines() if "Resume with:" in line]
    assert len(resume) == 1 and "--resume" in resume[0]
    # the checkpoint holds the last completed step, the last the step log has
    steps = run_folder.read_rows(run / "logs" / "highres_no_ela_steps.csv")
    saved = load_checkpoint(last_path(run / "models", "highres_no_ela"))["global_step"]
    assert saved == len(steps) and f"stopped at step {saved};" in err


def test_under_torchrun_every_rank_ends_when_the_storage_stops_answering(
        s3_store, s3_server, tmp_path):
    """Two gloo ranks read through a relay cut after the first checkpoint:
    the job ends (torchrun's agent stops the ranks once one has exited)
    well before the process group's timeout, with the error line, the
    resume command and the checkpoint of the steps done."""
    relay, run = OnceRelay(s3_server["endpoint"]), tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "trainers" / "train.py"), "--member", "highres_no_ela", "--store", s3_store,
         "--out", str(run), "--epochs", "3", "--encoder-weights", "none",
         "--encoder", "timm-mobilenetv3_small_minimal_100", "--img-size", "64",
         "--batch-size", "2", "--device", "cpu", "--workers", "1", "--save-every", "1",
         "--dist-timeout", "10", "--storage-option", f"endpoint_url={relay.endpoint}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = last_path(run / "models", "highres_no_ela")
    deadline = time.monotonic() + 180
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    relay.cut()
    cut_at = time.monotonic()
    err = process.communicate(timeout=300)[1]
    print(f"ended {time.monotonic() - cut_at:.1f} s after the cut")
    assert process.returncode != 0
    assert "cannot reach its storage" in err and "Resume with:" in err, err[-4000:]
    steps = run_folder.read_rows(run / "logs" / "highres_no_ela_steps.csv")
    assert load_checkpoint(last)["global_step"] == len(steps) >= 1
