"""make_loader end to end: alignment through every member's pipeline,
determinism, rank slices, resume, the specialist's windows, and errors."""
import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from benchmarks.golden import alignment, rgb_of, write_golden_source, write_mining_flags
from engine import make_loader
from engine.augment import GEOMETRIC_OPS
from engine import store as layout
from engine import loader as engine_loader
from engine.device import gpus_seen_by_driver, resolve_device
from engine.loader import SharedMemoryError, check_shared_memory, cores_per_process, planar_float
from engine.recipes import RECIPES, get_recipe
from preprocess.build_zarr import main as build_main

SIZE = 64



@pytest.fixture(scope="module")
def green_store(tmp_path_factory):
    """benchmarks/golden.py's set: the mask must keep covering exactly the
    green pixels through any geometry."""
    root = write_golden_source(tmp_path_factory.mktemp("green"))
    store = root / "store.zarr"
    assert build_main(["--source", str(root), "--out", str(store), "--workers", "1"]) in (0, None)
    meta = layout.read_meta(layout.open_store(store))
    write_mining_flags(store, {"hard_negative": np.flatnonzero(meta["label"] == 0)[:3],
                          "hard_fn": np.flatnonzero(meta["label"] == 1)[:3]})
    return store


def _geometric_only(recipe):
    return dataclasses.replace(recipe, augment=tuple(op for op in recipe.augment if op[0] in GEOMETRIC_OPS),
                               copy_paste=None)


BACKENDS = ("dali", "opencv")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("member", list(RECIPES))
def test_mask_covers_exactly_the_forged_colour_through_each_pipeline(green_store, member, backend):
    """Green pixels lie on the mask and mask pixels on green, up to the one
    pixel that antialiasing blends at a region's edge."""
    recipe = _geometric_only(get_recipe(member))
    loader = make_loader(green_store, recipe, batch_size=4, img_size=SIZE, seed=5, workers=0,
                         backend=backend)
    batches = list(loader)
    for batch in batches:
        assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    green_on_mask, mask_on_green = alignment(batches)
    assert green_on_mask > 0.97, f"{member}: green off the mask"
    assert mask_on_green > 0.97, f"{member}: mask off the green"


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_have_the_contracted_shapes_and_values(demo_store, backend):
    loader = make_loader(demo_store, "comprehensive", batch_size=3, img_size=SIZE, workers=0,
                         backend=backend)
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (3, 4, SIZE, SIZE)
    assert batch["mask"].shape == (3, 1, SIZE, SIZE)
    assert batch["index"].dtype == torch.int64
    ela = batch["image"][:, 3]
    assert ela.min() >= 0 and ela.max() <= 1
    meta = layout.read_meta(layout.open_store(demo_store))
    assert (meta["label"][batch["index"].numpy()] == 1).all()   # forged only for this member
    assert len(loader) == sum(1 for _ in loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_and_parallel_workers_agree(demo_store, backend):
    kwargs = dict(batch_size=4, img_size=SIZE, seed=11, epoch=2, backend=backend)
    first = list(make_loader(demo_store, "small_specialist", workers=0, **kwargs))
    again = list(make_loader(demo_store, "small_specialist", workers=2, **kwargs))
    other = list(make_loader(demo_store, "small_specialist", workers=0, **{**kwargs, "epoch": 3}))
    assert len(first) == len(again) > 0
    for a, b in zip(first, again):
        for key in ("image", "mask", "index"):
            assert torch.equal(a[key], b[key])
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_both_backends_make_nearly_the_same_unaugmented_batches(demo_store):
    """Whole images, no augmentation: DALI's resize and the opencv backend's
    differ only by filter details (PSNR on 0-255 RGB and ELA, mask overlap)."""
    kwargs = dict(rows=np.arange(12), batch_size=4, img_size=SIZE, workers=0)
    dali = list(make_loader(demo_store, "comprehensive", backend="dali", **kwargs))
    opencv = list(make_loader(demo_store, "comprehensive", backend="opencv", **kwargs))
    assert len(dali) == len(opencv) == 3
    for a, b in zip(dali, opencv):
        assert torch.equal(a["index"], b["index"]) and a["image"].shape == b["image"].shape
        for channels, pixels in ((slice(0, 3), rgb_of), (slice(3, 4), lambda x: x[:, 3:])):
            error = ((pixels(a["image"]) - pixels(b["image"])) * 255).pow(2).mean()
            assert 10 * torch.log10(255 ** 2 / error) > 30, channels
        union = (a["mask"] + b["mask"]).clamp(max=1).sum()
        if union:
            assert (a["mask"] * b["mask"]).sum() / union > 0.9


@pytest.mark.parametrize("member", ["highres_no_ela", "high_recall", "enhanced_aug"])
def test_one_seed_gives_one_geometry_on_both_backends(green_store, member):
    """Augmentation on: each sample's flips, turns and affine are drawn in the
    reader worker from its seed, so both backends move it the same way (masks
    differ by resize details only)."""
    recipe = _geometric_only(get_recipe(member))
    # at 128 px the two resizes' edge pixels weigh little (at 64: IoU 0.88-0.99
    # with augmentation off and on alike)
    kwargs = dict(batch_size=4, img_size=2 * SIZE, seed=9, workers=0)
    dali = list(make_loader(green_store, recipe, backend="dali", **kwargs))
    opencv = list(make_loader(green_store, recipe, backend="opencv", **kwargs))
    assert len(dali) == len(opencv) > 0
    checked = 0
    for a, b in zip(dali, opencv):
        assert torch.equal(a["index"], b["index"])
        union = (a["mask"] + b["mask"]).clamp(max=1).sum()
        if union:
            assert (a["mask"] * b["mask"]).sum() / union > 0.9
            checked += 1
    assert checked
    unaugmented = list(make_loader(green_store, recipe, backend="dali", augment=False, **kwargs))
    assert any(not torch.equal(a["mask"], u["mask"]) for a, u in zip(dali, unaugmented))


@pytest.mark.parametrize("member, channels", [("comprehensive", 4), ("enhanced_aug", 3)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_hand_uint8_to_the_loader_which_normalises(demo_store, backend, member, channels,
                                                                 monkeypatch):
    """DALI's output to torch is uint8 on both backends, through every
    photometric op (a quarter of the bytes of floats); the loader's to_float
    makes the float32 batch."""
    handed = []
    to_float = engine_loader.Loader.to_float

    def spy(self, pixels, mask, geometry=None):
        handed.append((pixels.dtype, pixels.shape, mask.dtype, mask.shape))
        return to_float(self, pixels, mask, geometry)

    monkeypatch.setattr(engine_loader.Loader, "to_float", spy)
    batch = next(iter(make_loader(demo_store, member, batch_size=3, img_size=SIZE, workers=0,
                                  backend=backend)))
    assert handed == [(torch.uint8, (3, SIZE, SIZE, channels), torch.uint8, (3, SIZE, SIZE, 1))]
    assert batch["image"].dtype == batch["mask"].dtype == torch.float32


def test_the_dali_backend_fills_affine_borders_and_dropout_holes_with_black_like_opencv(green_store):
    """The dali backend applies the geometry to scaled, not yet shifted,
    pixels: what the affine's border and the dropout's holes leave is black,
    as on the opencv backend's uint8, not the normalised zero (the mean colour)."""
    recipe = dataclasses.replace(get_recipe("highres_no_ela"), copy_paste=None, augment=(
        ("affine", {"p": 1.0, "shift": 0.0, "scale": 0.5, "rotate": 30}),
        ("coarse_dropout", {"p": 1.0, "holes": (4, 4), "size": (12, 12)})))
    kwargs = dict(batch_size=4, img_size=SIZE, seed=2, workers=0)
    dali = list(make_loader(green_store, recipe, backend="dali", **kwargs))
    opencv = list(make_loader(green_store, recipe, backend="opencv", **kwargs))
    assert len(dali) == len(opencv) > 0
    for a, b in zip(dali, opencv):
        black = rgb_of(b["image"]).amax(dim=1) < 1 / 255 + 1e-4   # opencv: border and holes
        assert black.float().mean() > 0.2
        dali_black = rgb_of(a["image"]).amax(dim=1) < 2 / 255
        assert (dali_black & black).sum() / black.sum() > 0.95


def test_planar_float_is_the_normalisation_torch_would_do():
    pixels = torch.randint(0, 256, (2, 5, 7, 4), dtype=torch.uint8)
    scale, shift = torch.rand(1, 4, 1, 1), torch.randn(1, 4, 1, 1)
    want = pixels.permute(0, 3, 1, 2).float() * scale + shift
    torch.testing.assert_close(planar_float(pixels, scale, shift), want)
    torch.testing.assert_close(planar_float(pixels[..., :1], 1.0, 0.0), pixels[..., :1].permute(0, 3, 1, 2).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_split_the_plan_and_resume_continues_it(demo_store, backend):
    kwargs = dict(batch_size=2, img_size=16, seed=1, workers=0, augment=False, backend=backend)
    whole = make_loader(demo_store, "highres_no_ela", **kwargs)
    ranks = [make_loader(demo_store, "highres_no_ela", rank=r, world_size=2, **kwargs) for r in (0, 1)]
    positions = [np.concatenate(r.batches.positions) for r in ranks]
    assert not set(positions[0]) & set(positions[1])
    assert set(np.concatenate(whole.batches.positions)) <= set(positions[0]) | set(positions[1])
    full = list(whole)
    resumed = list(make_loader(demo_store, "highres_no_ela", start_batch=2, **kwargs))
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])


def specialist_windows(loader, meta):
    """(window holds the whole forgery, window misses it) per planned sample,
    over the samples whose forgery fits twice in the image's short side."""
    holds, missed = [], []
    for rows, windows in zip(loader.batches.rows, loader.batches.windows):
        for row, (y0, x0, y1, x1) in zip(rows, windows):
            by0, bx0, by1, bx1 = meta["bbox"][row]
            assert 0 < meta["area_ratio"][row] < 0.02
            if 2 * max(by1 - by0, bx1 - bx0) <= min(meta["height"][row], meta["width"][row]):
                holds.append(y0 <= by0 and x0 <= bx0 and y1 >= by1 and x1 >= bx1)
                missed.append(y1 <= by0 or y0 >= by1 or x1 <= bx0 or x0 >= bx1)
    return np.array(holds), np.array(missed)


def test_specialist_windows_hold_the_whole_forgery_or_none_of_it(demo_store):
    meta = layout.read_meta(layout.open_store(demo_store))
    loader = make_loader(demo_store, "small_specialist", batch_size=4, img_size=SIZE, workers=0)
    holds, missed = specialist_windows(loader, meta)
    # (the demo's small figures leave little room for negatives: the golden set's below)
    assert holds.any() and np.all(holds ^ missed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_windows_reach_the_batches_on_both_backends(green_store, backend):
    """The recipe's negative share is drawn in the plan, so both backends read
    the same windows: a batch's mask is empty exactly where the plan placed
    a window away from the forgery."""
    meta = layout.read_meta(layout.open_store(green_store))
    recipe = get_recipe("small_specialist")
    loader = make_loader(green_store, recipe, batch_size=4, img_size=SIZE, seed=2, workers=0,
                         backend=backend)
    empty = np.concatenate([(b["mask"].flatten(1).sum(1) == 0).numpy() for b in loader])
    planned = []
    for rows, windows in zip(loader.batches.rows, loader.batches.windows):
        for row, (y0, x0, y1, x1) in zip(rows, windows):
            by0, bx0, by1, bx1 = meta["bbox"][row]
            planned.append(y1 <= by0 or y0 >= by1 or x1 <= bx0 or x0 >= bx1)
    assert np.array_equal(empty, planned)
    assert 0 < np.mean(planned) <= recipe.view.negative_share + 0.2


def test_validation_and_explicit_rows_read_whole_images_once(demo_store):
    meta = layout.read_meta(layout.open_store(demo_store))
    val = make_loader(demo_store, "highres_no_ela", split="val", batch_size=4, img_size=16, workers=0)
    seen = np.concatenate([b["index"].numpy() for b in val])
    expected = np.flatnonzero((meta["split"] == 1) & (meta["label"] == 1))
    np.testing.assert_array_equal(np.sort(seen), expected)
    rows = np.array([5, 0, 3])
    got = np.concatenate([b["index"].numpy() for b in make_loader(
        demo_store, "highres_no_ela", rows=rows, batch_size=2, img_size=16, workers=0)])
    np.testing.assert_array_equal(got, rows)


def test_mined_members_refuse_a_store_without_mining(demo_store):
    with pytest.raises(layout.StoreError, match="mining"):
        make_loader(demo_store, "hard_negative", img_size=16, workers=0)


def test_errors_say_what_and_where(demo_store, tmp_path):
    with pytest.raises(ValueError, match="unknown member 'nope'"):
        make_loader(demo_store, "nope")
    with pytest.raises(ValueError, match="backend 'numpy'"):
        make_loader(demo_store, "highres_no_ela", backend="numpy")
    for size in (0, 8, 5000, 64.5):
        with pytest.raises(ValueError, match="img_size"):
            make_loader(demo_store, "highres_no_ela", img_size=size)
    with pytest.raises(layout.StoreError, match="no store here"):
        make_loader(tmp_path / "absent.zarr", "highres_no_ela")
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs.update({"format": "something-else", "version": 1})
    with pytest.raises(layout.StoreError, match="format is 'something-else'"):
        make_loader(other, "highres_no_ela")
    newer = tmp_path / "newer.zarr"
    shutil.copytree(demo_store, newer)
    group_json = newer / "zarr.json"
    meta = json.loads(group_json.read_text())
    meta["attributes"]["version"] = layout.VERSION + 1
    group_json.write_text(json.dumps(meta))
    with pytest.raises(layout.StoreError, match="store version"):
        make_loader(newer, "highres_no_ela")
    no_meta = tmp_path / "no_meta.zarr"
    shutil.copytree(demo_store, no_meta)
    shutil.rmtree(no_meta / "meta")
    with pytest.raises(layout.StoreError, match=r"no_meta.zarr/meta/\w+: array missing.*verify_store"):
        make_loader(no_meta, "highres_no_ela")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_shard_stops_the_epoch_with_its_name(demo_store, tmp_path, workers):
    """In this process or in a reader worker alike: a StoreDamaged naming the shard
    (DALI hands a worker's error back as a plain Exception; the loader turns it
    back into the same class, engine/reader.py's CARRIED_ERRORS)."""
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(demo_store, damaged)
    loader = make_loader(damaged, "highres_no_ela", batch_size=2, img_size=16, workers=workers,
                         augment=False)
    for shard in (damaged / "tiles" / "image").rglob("c.*"):   # every level of every block
        shard.write_bytes(b"garbage")
    with pytest.raises(layout.StoreDamaged,
                       match=r"tiles/image/\d+/c\.\d+\.0\.0\.0: corrupt shard index") as caught:
        next(iter(loader))
    assert caught.value.where.endswith(".0.0.0") and caught.value.problem.startswith("corrupt shard index")
    assert "Traceback" not in str(caught.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_hand_over_the_memory_format_asked_for(demo_store, backend):
    kwargs = dict(batch_size=2, img_size=SIZE, workers=0, backend=backend)
    default = next(iter(make_loader(demo_store, "comprehensive", **kwargs)))
    nhwc = next(iter(make_loader(demo_store, "comprehensive", memory_format="channels_last", **kwargs)))
    assert default["image"].is_contiguous() and default["mask"].is_contiguous()
    assert nhwc["image"].is_contiguous(memory_format=torch.channels_last)
    assert nhwc["mask"].is_contiguous(memory_format=torch.channels_last)
    assert not nhwc["image"].is_contiguous()
    assert torch.equal(default["image"], nhwc["image"]) and torch.equal(default["mask"], nhwc["mask"])
    with pytest.raises(ValueError, match="memory_format 'nhwc'"):
        make_loader(demo_store, "comprehensive", memory_format="nhwc", **kwargs)


def test_a_small_dev_shm_is_refused_before_workers_start(demo_store, monkeypatch):
    loader = make_loader(demo_store, "highres_no_ela", batch_size=4, img_size=512, workers=3,
                         backend="dali")
    need = loader.shared_memory_need()
    # (2 + 2 per worker) batches of 4 blocks of up to 1025 x 1025 x (RGB + mask)
    assert need == (2 + 2 * 3) * 4 * 1025 * 1025 * 4
    monkeypatch.setattr(engine_loader.shutil, "disk_usage", lambda folder: SimpleNamespace(free=need - 1))
    with pytest.raises(SharedMemoryError, match=r"--shm-size=8g.*fewer --workers"):
        next(iter(loader))
    monkeypatch.setattr(engine_loader.shutil, "disk_usage", lambda folder: SimpleNamespace(free=need))
    check_shared_memory(need)   # exactly enough passes


def test_workers_and_threads_are_this_ranks_share_of_the_cores(demo_store, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cores_per_process() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))   # more ranks than cores: one each
    assert cores_per_process() == 1
    loader = make_loader(demo_store, "highres_no_ela", img_size=SIZE)
    assert loader.settings.workers == 1 and loader.settings.threads == 1


def test_a_gpu_that_torch_cannot_use_is_an_error_not_a_cpu_run(monkeypatch, tmp_path):
    """nvidia-smi lists a GPU but torch has no CUDA (a driver too old for the wheels)."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpus_seen_by_driver.cache_clear()
    try:
        for asked in ("auto", "cuda"):
            with pytest.raises(ValueError, match=r"nvidia-smi sees 1 GPU.*H100.*driver.*--device cpu"):
                resolve_device(asked)
        assert resolve_device("cpu") == torch.device("cpu")   # asked for on purpose
    finally:
        gpus_seen_by_driver.cache_clear()
    with pytest.raises(ValueError, match="device 'gpu'"):
        resolve_device("gpu")


def test_dali_runs_on_the_current_cuda_device_for_a_bare_cuda(monkeypatch):
    # a torchrun rank sets its device and asks for "cuda": DALI must not land on GPU 0
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert engine_loader.dali_device_id(torch.device("cuda")) == 3
    assert engine_loader.dali_device_id(torch.device("cuda:1")) == 1
    assert engine_loader.dali_device_id(torch.device("cpu")) is None
