"""Per-row arrays and epoch plans once per node (engine/node_arrays.py): the
loader writes meta/ columns, weights and plans as node-local .npy files that
its reader workers map instead of holding copies; a second loader reuses
them; damaged files are rebuilt, never used; a rebuilt store gets new ones;
and the batches are exactly those of the plan computed from the store."""
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import make_loader, node_arrays, sampling
from engine import store as layout
from engine.recipes import get_recipe
from engine.storage import StorageSettings

MEMBER = "highres_no_ela"
KWARGS = dict(batch_size=4, img_size=32, seed=5)


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: (inode, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _old_plan(store, rank, world_size, epoch, start_batch=0):
    """The training plan computed from the store as the loader computed it
    before node-local files: rows and windows per batch."""
    recipe = get_recipe(MEMBER)
    meta = layout.read_meta(layout.open_store(store))
    weights = sampling.member_weights(recipe.sampling, meta["label"], meta["area_ratio"],
                                      meta["split"], layout.SPLITS["train"], mined=False)
    plan = sampling.EpochPlan.build(weights, sampling.epoch_size(recipe.sampling, weights),
                                    KWARGS["seed"], epoch)
    batches = plan.for_rank(rank, world_size, KWARGS["batch_size"], drop_last=True,
                            start_batch=start_batch)
    return [(b.indices, sampling.crop_windows(recipe.view, b.indices, b.positions, meta["height"],
                                              meta["width"], meta["bbox"], meta["centroid"],
                                              KWARGS["seed"], epoch)) for b in batches]


def _same_plan(loader, old):
    assert len(loader.batches) == len(old) > 0
    for k, (rows, windows) in enumerate(old):
        np.testing.assert_array_equal(loader.batches.rows[k], rows)
        np.testing.assert_array_equal(loader.batches.windows[k], windows)


def test_batches_are_the_plan_computed_from_the_store(demo_store, tmp_path):
    storage = StorageSettings(node_dir=tmp_path / "node")
    for rank in (0, 1):
        loader = make_loader(demo_store, MEMBER, rank=rank, world_size=2, workers=0,
                             storage=storage, **KWARGS)
        _same_plan(loader, _old_plan(demo_store, rank, 2, 0))
        _same_plan(loader.set_epoch(1, start_batch=1), _old_plan(demo_store, rank, 2, 1, 1))
    rows = [3, 1, 4, 1, 5]
    fixed = make_loader(demo_store, MEMBER, rows=rows, workers=0, storage=storage, **KWARGS)
    meta = layout.read_meta(layout.open_store(demo_store))
    np.testing.assert_array_equal(np.concatenate(fixed.batches.rows), rows)
    np.testing.assert_array_equal(np.concatenate(fixed.batches.windows),
                                  [[0, 0, meta["height"][r], meta["width"][r]] for r in rows])


def _mapped_by(pid: int) -> set[str]:
    """Files process `pid` maps."""
    return {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def test_workers_map_the_node_files_and_a_second_loader_reuses_them(demo_store, tmp_path):
    node = tmp_path / "node"
    storage = StorageSettings(node_dir=node)
    with make_loader(demo_store, MEMBER, workers=2, storage=storage, **KWARGS) as loader:
        first = list(loader)   # its end writes epoch 1's plan, which the workers start on
        second = next(iter(loader.set_epoch(1)))
        pids = loader._pipe._py_pool.pids()
        mapped = [_mapped_by(pid) for pid in pids]
    assert len(pids) == 2
    folders = sorted(p.name.split("-")[0] for p in node.iterdir())
    # one of each, shared: meta/ columns, the member's weights, each epoch's plan
    assert folders == ["meta", "plan", "plan", "weights"], folders
    meta = next(node.glob("meta-*"))
    plans = [next(node.glob(f"plan-*-epoch{epoch}")) for epoch in (0, 1)]
    for files in mapped:   # the workers read meta/ and the plans through the node's files
        assert {str(meta / "height.npy"), *(str(p / "rows.npy") for p in plans)} <= files
    before = _files(node)
    again = make_loader(demo_store, MEMBER, workers=0, storage=storage, **KWARGS)
    for a, b in zip(list(again), first):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
    assert torch.equal(next(iter(again.set_epoch(1)))["image"], second["image"])
    assert _files(node) == before   # nothing written again


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_damaged_node_file_is_rebuilt_not_used(demo_store, tmp_path, damage):
    storage = StorageSettings(node_dir=tmp_path / "node")
    expected = make_loader(demo_store, MEMBER, workers=0, storage=storage, **KWARGS).batches
    meta = next((tmp_path / "node").glob("meta-*"))
    height = meta / "height.npy"
    good = height.read_bytes()
    if damage == "truncate":
        height.write_bytes(good[:-8])
    elif damage == "flip":   # same size: only its checksum tells
        height.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    else:
        (meta / node_arrays.MANIFEST).write_text("{")
    loader = make_loader(demo_store, MEMBER, workers=0, storage=storage, **KWARGS)
    assert height.read_bytes() == good
    for k in range(len(expected)):
        np.testing.assert_array_equal(loader.batches.windows[k], expected.windows[k])


def test_a_worker_refuses_a_file_damaged_after_the_check(tmp_path):
    arrays = node_arrays.node_arrays(tmp_path / "a", lambda: {"x": np.arange(1000)})
    shipped = pickle.dumps(arrays)
    assert len(shipped) < 300   # the path, not the array
    path = tmp_path / "a" / "x.npy"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(node_arrays.NodeFileDamaged, match=r"x\.npy: .*truncated"):
        pickle.loads(shipped)["x"]


def test_a_rebuilt_store_gets_new_columns(demo_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(demo_store, store)
    storage = StorageSettings(node_dir=tmp_path / "node")
    make_loader(store, MEMBER, workers=0, storage=storage, **KWARGS)
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"][layout.BUILD_ID] = "0" * 32   # what a rebuild changes
    (store / "zarr.json").write_text(json.dumps(root))
    make_loader(store, MEMBER, workers=0, storage=storage, **KWARGS)
    assert len(list((tmp_path / "node").glob("meta-*"))) == 2


def test_an_unwritable_node_dir_keeps_arrays_in_memory(demo_store, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    storage = StorageSettings(node_dir=blocked / "node")
    loader = make_loader(demo_store, MEMBER, workers=0, storage=storage, **KWARGS)
    assert "node-local arrays cannot be written" in capsys.readouterr().err
    _same_plan(loader, _old_plan(demo_store, 0, 1, 0))
    _same_plan(loader.set_epoch(2), _old_plan(demo_store, 0, 1, 2))
    assert loader.planner.meta.folder is None and len(pickle.dumps(loader.planner.meta)) > 1000


def test_training_writes_its_node_arrays_in_node_dir(demo_store, tmp_path):
    from trainers.train import main as train_main

    node = tmp_path / "node"
    assert train_main(["--member", MEMBER, "--store", str(demo_store), "--out", str(tmp_path / "run"),
                       "--epochs", "1", "--max-steps", "1", "--encoder-weights", "none",
                       "--encoder", "timm-mobilenetv3_small_minimal_100", "--img-size", "64",
                       "--batch-size", "2", "--device", "cpu", "--workers", "0",
                       "--node-dir", str(node)]) == 0
    assert {p.name.split("-")[0] for p in node.iterdir()} >= {"meta", "weights", "plan", "rows"}


def _resident_kb(path: Path) -> int:
    """kB of `path`'s pages resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" not in fields[0]:   # a mapping's first line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_release_drops_the_pages_a_process_read(tmp_path):
    arrays = node_arrays.node_arrays(tmp_path / "a", lambda: {"x": np.arange(1 << 20)})
    x = arrays["x"]
    assert int(x.sum()) == (1 << 20) * ((1 << 20) - 1) // 2   # every page read: 8 MB
    path = tmp_path / "a" / "x.npy"
    assert _resident_kb(path) >= 8000
    arrays.release()
    assert _resident_kb(path) == 0
    assert int(x[12345]) == 12345   # still readable: mapped again from the page cache
