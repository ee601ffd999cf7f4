"""One loader for the whole run: a persistent loader re-planned per epoch
yields exactly the batches of one-epoch loaders, resumes mid-epoch, keeps its
reader workers across epochs, and close() ends them and their shared memory."""
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import make_loader

KWARGS = dict(batch_size=4, img_size=32, seed=3)
MEMBER = "highres_no_ela"


def _equal(one, other):
    assert len(one) == len(other)
    for a, b in zip(one, other):
        for key in ("image", "mask", "index"):
            assert torch.equal(a[key], b[key]), key


def _worker_pids(loader) -> list[int]:
    pool = getattr(loader._pipe, "_py_pool", None) if loader._pipe is not None else None
    return sorted(pool.pids()) if pool is not None else []


def _alive(pids) -> list[int]:
    """Those of `pids` still running (not zombies)."""
    alive = []
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        try:
            if stat.read_text().split(")")[-1].split()[0] != "Z":
                alive.append(pid)
        except OSError:
            pass
    return alive


@pytest.mark.parametrize("workers", [0, 2])
def test_three_epochs_of_one_loader_are_three_one_epoch_loaders(demo_store, workers):
    kwargs = dict(KWARGS, workers=workers)
    single = [list(make_loader(demo_store, MEMBER, epoch=e, **kwargs)) for e in range(3)]
    assert all(len(epoch) > 1 for epoch in single)
    assert any(not torch.equal(a["index"], b["index"]) for a, b in zip(single[0], single[1]))
    with make_loader(demo_store, MEMBER, epoch=0, **kwargs) as loader:
        pids = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            assert len(loader) == len(single[epoch])
            _equal(list(loader), single[epoch])
            pids.append(_worker_pids(loader))
    assert len(pids[0]) == workers
    assert pids[0] == pids[1] == pids[2]   # the same processes: no new workers per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_exactly(demo_store, workers):
    kwargs = dict(KWARGS, workers=workers)
    epoch1 = list(make_loader(demo_store, MEMBER, epoch=1, **kwargs))
    epoch2 = list(make_loader(demo_store, MEMBER, epoch=2, **kwargs))
    with make_loader(demo_store, MEMBER, epoch=1, start_batch=2, **kwargs) as loader:
        assert len(loader) == len(epoch1) - 2
        _equal(list(loader), epoch1[2:])
        pids = _worker_pids(loader)
        loader.set_epoch(2)
        _equal(list(loader), epoch2)
        assert _worker_pids(loader) == pids
        # an epoch left unfinished, or one out of order, builds the pipeline again
        loader.set_epoch(1)
        first = next(iter(loader))
        assert torch.equal(first["image"], epoch1[0]["image"])
        loader.set_epoch(2, start_batch=1)
        _equal(list(loader), epoch2[1:])


def test_validation_rows_are_the_same_every_epoch(demo_store):
    kwargs = dict(KWARGS, workers=1, split="val", augment=False)
    once = list(make_loader(demo_store, MEMBER, **kwargs))
    with make_loader(demo_store, MEMBER, **kwargs) as loader:
        pids = None
        for epoch in range(3):
            loader.set_epoch(epoch)
            _equal(list(loader), once)
            pids = pids or _worker_pids(loader)
            assert _worker_pids(loader) == pids


def _shm_in_use(pids) -> set[str]:
    """/dev/shm entries (DALI's buffers, multiprocessing's named semaphores)
    that these processes map: ours, whatever else runs on the machine."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[-1] if len(line.split()) >= 6 else ""
            if path.startswith("/dev/shm/") and not path.endswith("(deleted)"):
                found.add(path)
    return found


def _left_behind(entries) -> list[str]:
    return [path for path in entries if os.path.exists(path)]


def test_close_ends_the_workers_and_their_shared_memory(demo_store):
    """No worker outlives close(), and no /dev/shm entry the loader's processes
    mapped is left (checked by name: other processes may use /dev/shm too)."""
    loader = make_loader(demo_store, MEMBER, workers=2, **KWARGS)
    batches = iter(loader)
    next(batches)   # mid-epoch, workers busy prefetching
    pids = _worker_pids(loader)
    assert len(pids) == 2 and not set(pids) & {os.getpid()}
    used = _shm_in_use([os.getpid(), *pids])
    assert used   # multiprocessing's named semaphores of DALI's worker pool, at least
    loader.close()
    assert _wait_gone(pids), "reader workers outlived close()"
    assert not _left_behind(used), "shared memory left behind"
    loader.close()   # twice is fine
    # a closed loader builds a new pipeline when iterated again
    with loader:
        again = list(loader)
        new_pids = _worker_pids(loader)
        used = _shm_in_use([os.getpid(), *new_pids])
    assert len(again) == len(loader) and new_pids and not set(new_pids) & set(pids)
    assert _wait_gone(new_pids)
    assert not _left_behind(used)


def _wait_gone(pids, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pids)


def test_an_error_in_the_consumer_closes_nothing_it_should_not_and_close_is_clean(demo_store):
    """The trainer's pattern: an exception mid-epoch, then close() in a finally."""
    loader = make_loader(demo_store, MEMBER, workers=1, **KWARGS)
    with pytest.raises(RuntimeError, match="boom"):
        try:
            for _ in loader:
                raise RuntimeError("boom")
        finally:
            pids = _worker_pids(loader)
            used = _shm_in_use([os.getpid(), *pids])
            loader.close()
    assert pids and _wait_gone(pids)
    assert not _left_behind(used)
    np.testing.assert_array_equal(loader.batches.rows[0], make_loader(
        demo_store, MEMBER, workers=0, **KWARGS).batches.rows[0])
