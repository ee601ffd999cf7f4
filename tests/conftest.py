"""Shared fixtures: a small demo source folder and the store built from it,
made once per test session (a few seconds)."""
from __future__ import annotations

import shutil

import pytest
import torch

from preprocess.build_zarr import build_store
from preprocess.demo_data import write_demo

DEMO_COUNT = 32
DEMO_SUPPLEMENTAL = 4
DEMO_SEED = 7
DEMO_SIDES = (64, 700)


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory):
    """A Kaggle-layout folder: 32 training and 4 supplemental images, 64-700 px."""
    folder = tmp_path_factory.mktemp("demo") / "source"
    write_demo(folder, count=DEMO_COUNT, seed=DEMO_SEED, min_side=DEMO_SIDES[0],
               max_side=DEMO_SIDES[1], supplemental=DEMO_SUPPLEMENTAL, progress=False)
    return folder


@pytest.fixture(scope="session")
def demo_store(demo_source, tmp_path_factory):
    """Path of the complete store built from demo_source (read it, don't modify it)."""
    out = tmp_path_factory.mktemp("store") / "store.zarr"
    build_store(demo_source, out, workers=2, progress=False, figure=False)
    return out


@pytest.fixture(scope="module")
def store(demo_store, tmp_path_factory):
    """A private copy of the demo store for one test module: mining writes into it."""
    copy = tmp_path_factory.mktemp("store") / "store.zarr"
    shutil.copytree(demo_store, copy)
    return copy


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny tensors: one torch thread beats two spinning OpenMP
    threads on a 2-core machine shared with DALI's threads and workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
