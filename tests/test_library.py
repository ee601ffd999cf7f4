"""The engine as a library: the torch Dataset adapter, the example script
that trains with it, and the error for a script without the spawn guard."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from engine.loader import SpawnGuardError, check_spawn_guard, make_loader
from engine.torch_dataset import LoaderDataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
OPTIONS = dict(batch_size=2, img_size=32, seed=3, workers=0)


def test_a_dataloader_over_the_dataset_gives_the_loaders_batches(demo_store):
    expected = list(make_loader(demo_store, "highres_no_ela", **OPTIONS))
    with LoaderDataset(demo_store, "highres_no_ela", **OPTIONS) as dataset:
        got = list(DataLoader(dataset, batch_size=None))
        assert len(dataset) == len(expected) == len(got)
    for mine, theirs in zip(got, expected):
        assert all(torch.equal(mine[key], theirs[key]) for key in ("image", "mask", "index"))


def test_dataloader_workers_are_refused(demo_store):
    dataset = LoaderDataset(demo_store, "highres_no_ela", **OPTIONS)
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(DataLoader(dataset, batch_size=None, num_workers=1)))


def test_the_example_trains_with_reader_workers(demo_store):
    done = subprocess.run([sys.executable, "examples/train_with_loader.py", "--store", str(demo_store),
                           "--steps", "2", "--img-size", "32", "--batch-size", "2", "--workers", "1"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 2: loss" in done.stdout


def test_a_script_without_the_spawn_guard_is_told_to_add_it(demo_store, tmp_path):
    script = tmp_path / "my_loop.py"
    script.write_text("from engine.loader import make_loader\n"
                      f"loader = make_loader({str(demo_store)!r}, 'highres_no_ela', batch_size=2, "
                      "img_size=16, workers=1)\n"
                      "for batch in loader:\n    print(batch['image'].shape)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert f"{script}: make_loader starts reader worker processes" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
    # refused in the script's own process, before DALI starts a worker
    assert done.stderr.strip().splitlines()[-1].startswith("engine.loader.SpawnGuardError: ")
    assert "nvidia/dali" not in done.stderr


def test_a_worker_importing_the_script_again_is_refused(monkeypatch):
    """What a spawned worker sees when the parent's check could not run (the
    script's source unreadable): its main module is __mp_main__."""
    reimported = types.ModuleType("__mp_main__")
    reimported.__file__ = "/work/my_loop.py"
    monkeypatch.setitem(sys.modules, "__main__", reimported)
    with pytest.raises(SpawnGuardError, match="^/work/my_loop.py: .*__name__"):
        check_spawn_guard(workers=0)
