"""The opencv backend's per-sample operations: the same results as the DALI
operators they stand in for, geometry that moves pixels, ELA and mask
together, dropout on RGB only, and parameter draws with the recipe's odds."""
import cv2
import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from skimage import data

from benchmarks.golden import dali_photometric
from engine import photometric, worker_ops
from engine import store as layout
from engine.loader import resolve_backend
from engine.reader import WindowReader
from tests.test_photometric import OPS
from tests.test_reader import _psnr

SIZE = 96


@pytest.fixture(scope="module")
def pictures():
    """Three natural RGB pictures that ship with scikit-image, SIZE x SIZE."""
    return [np.ascontiguousarray(cv2.resize(load(), (SIZE, SIZE), interpolation=cv2.INTER_AREA))
            for load in (data.astronaut, data.chelsea, data.coffee)]


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_photometric_operation_equals_the_dali_operator(pictures, name):
    """Same drawn values in, the same pixels out, up to uint8 rounding
    (measured: identical, or off by 1 on under 0.2 % of the levels)."""
    plan = photometric.slots(((name, {**OPS[name], "p": 1.0}),))
    values = [photometric.draw(plan, np.random.default_rng(seed), SIZE) for seed in range(len(pictures))]
    expected = dali_photometric(pictures, plan, values)
    for picture, drawn, want in zip(pictures, values, expected):
        got = worker_ops.apply_photometric(picture, plan, drawn)
        assert got.dtype == np.uint8 and got.shape == picture.shape
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.25, (name, diff.max(), diff.mean())
        assert np.abs(got.astype(int) - picture).mean() > 1, f"{name} did not act"


def test_idle_operations_leave_the_pixels_alone(pictures):
    plan = photometric.slots(tuple((name, {**params, "p": 0.0}) for name, params in OPS.items()))
    values = photometric.draw(plan, np.random.default_rng(0), SIZE)
    np.testing.assert_array_equal(worker_ops.apply_photometric(pictures[0], plan, values), pictures[0])


def _dali_resize(blocks, size, **kwargs):
    @pipeline_def(batch_size=len(blocks), num_threads=1, device_id=None)
    def pipe():
        image, start, end = fn.external_source(
            source=lambda: ([b.image for b in blocks], [b.roi_start for b in blocks],
                            [b.roi_end for b in blocks]), num_outputs=3, batch=True, layout=["HWC", "", ""])
        return fn.resize(image, size=[size, size], roi_start=start, roi_end=end, **kwargs)

    built = pipe()
    built.build()
    out = built.run()[0]
    return [np.asarray(out[i]) for i in range(len(blocks))]


def test_resize_from_the_pyramid_stays_close_to_dali_antialiased_from_full_resolution(demo_store):
    """The opencv resize snaps the window outward to the pyramid level's
    pixel grid (under one output pixel), then pre-filters and resizes
    bilinearly. Against DALI's antialiased resize of that same region from
    level 0 it loses little, and masks stay 0/1 (where they land against
    DALI's: test_loader.py's test of both backends)."""
    meta = layout.read_meta(layout.open_store(demo_store))
    rows = [int(r) for r in np.argsort(-meta["height"].astype(int) * meta["width"])[:6]]
    out = 64
    pyramid, full = WindowReader(demo_store, with_ela=True), WindowReader(demo_store, pyramid=False)
    blocks, snapped = [], []
    for r in rows:
        h, w = int(meta["height"][r]), int(meta["width"][r])
        block = pyramid.read(r, (h // 10, w // 11, h - h // 7, w - w // 9), out)
        # the snap: less than one level pixel on each side, a level pixel
        # being at most one output pixel
        bh, bw = block.image.shape[:2]
        assert (0 <= block.roi_start).all() and (block.roi_start < 1).all()
        assert bh - block.roi_end[0] < 1 and bw - block.roi_end[1] < 1
        assert min(bh, bw) >= out
        y0, x0 = (h // 10 - block.roi_start[0] / block.scale, w // 11 - block.roi_start[1] / block.scale)
        snapped.append((round(y0), round(x0), round(y0 + bh / block.scale), round(x0 + bw / block.scale)))
        blocks.append(block)
    assert any(b.level >= 1 for b in blocks)
    level0 = [full.read(r, window, out) for r, window in zip(rows, snapped)]
    reference = _dali_resize(level0, out, antialias=True)
    psnr = []
    for block, want in zip(blocks, reference):
        image, mask, ela = worker_ops.resize_block(block, out)
        assert image.shape == (out, out, 3) and mask.shape == ela.shape == (out, out)
        assert set(np.unique(mask)) <= {0, 1}
        psnr.append(_psnr(image, want))
    # the DALI backend's own pyramid read scores 29-40 dB in test_reader.py's twin
    assert min(psnr) > 27 and np.mean(psnr) > 30, psnr


def _tracer(size=64, seed=0):
    """RGB whose red channel is also the ELA and decides the mask: any
    misalignment between the three shows as a mismatch."""
    rng = np.random.default_rng(seed)
    red = cv2.GaussianBlur(rng.integers(0, 256, (size, size)).astype(np.uint8), (5, 5), 0)
    red[size // 4:size // 2, size // 8:size // 3] = 255   # an asymmetric block
    image = np.dstack([red, rng.integers(0, 256, (size, size), np.uint8), np.full((size, size), 90, np.uint8)])
    return image, (red > 200).astype(np.uint8), red.copy()


@pytest.mark.parametrize("op", [("hflip", ()), ("vflip", ()), ("rot90", (1,)), ("rot90", (2,)),
                                ("rot90", (3,)), ("affine", (30.0, 1.2, 5.0, -7.0))])
def test_geometry_moves_pixels_ela_and_mask_together(op):
    image, mask, ela = _tracer()
    moved_image, moved_mask, moved_ela = worker_ops.apply_geometric(image, mask, ela, [op])
    np.testing.assert_array_equal(moved_ela, moved_image[..., 0])
    follows = moved_mask.astype(bool) == (moved_ela > 200)
    if op[0] == "affine":   # nearest vs bilinear differ on edges only
        assert follows.mean() > 0.97
        assert not np.array_equal(moved_image, image)
    else:
        assert follows.all()
        # the same permutation torch applies in the dali backend's Kornia step
        want = {"hflip": lambda t: t.flip(-1), "vflip": lambda t: t.flip(-2),
                "rot90": lambda t: torch.rot90(t, op[1][0] if op[1] else 0, dims=(-2, -1))}[op[0]]
        np.testing.assert_array_equal(moved_image, want(torch.from_numpy(image).permute(2, 0, 1))
                                      .permute(1, 2, 0).numpy())


def test_coarse_dropout_blanks_rgb_only():
    image, mask, ela = _tracer()
    holes = np.array([[2, 3, 10, 12], [40, 30, 8, 8]])
    out_image, out_mask, out_ela = worker_ops.apply_geometric(image.copy(), mask, ela, [("coarse_dropout", (holes,))])
    assert (out_image[2:12, 3:15] == 0).all() and (out_image[40:48, 30:38] == 0).all()
    assert (out_image == 0).all(axis=2).sum() == 10 * 12 + 8 * 8
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_array_equal(out_ela, ela)


def test_geometric_draws_follow_the_recipe_odds():
    entries = (("hflip", {"p": 0.5}), ("rot90", {"p": 1.0, "k": (1, 3)}),
               ("affine", {"p": 0.3, "shift": 0.1, "scale": 0.2, "rotate": 45}),
               ("one_of", {"p": 0.6, "ops": (("vflip", {}), ("coarse_dropout", {"holes": (1, 4), "size": (5, 9)}))}),
               )
    counts, turns = {}, []
    for seed in range(3000):
        for name, drawn in worker_ops.draw_geometric(entries, np.random.default_rng(seed), 64):
            counts[name] = counts.get(name, 0) + 1
            if name == "rot90":
                turns.append(drawn[0])
            if name == "affine":
                angle, scale, dx, dy = drawn
                assert -45 <= angle <= 45 and 0.8 <= scale <= 1.2 and abs(dx) <= 6.4 and abs(dy) <= 6.4
            if name == "coarse_dropout":
                holes = drawn[0]
                assert 1 <= len(holes) <= 4 and ((holes[:, 2:] >= 5) & (holes[:, 2:] <= 9)).all()
                assert ((holes[:, :2] >= 0) & (holes[:, :2] + holes[:, 2:] <= 64)).all()
    assert abs(counts["hflip"] / 3000 - 0.5) < 0.04 and counts["rot90"] == 3000
    assert abs(counts["affine"] / 3000 - 0.3) < 0.04
    assert abs(counts["vflip"] / 3000 - 0.3) < 0.04 and abs(counts["coarse_dropout"] / 3000 - 0.3) < 0.04
    assert sorted(set(turns)) == [1, 2, 3] and max(np.bincount(turns)[1:]) / min(np.bincount(turns)[1:]) < 1.2
    with pytest.raises(ValueError, match="unknown batch augmentation 'twirl'"):
        worker_ops.draw_geometric((("twirl", {}),), np.random.default_rng(0), 64)


def test_auto_backend_is_opencv_on_the_cpu_and_dali_on_cuda():
    assert resolve_backend("auto", torch.device("cpu")) == "opencv"
    assert resolve_backend("auto", torch.device("cuda")) == "dali"
    assert resolve_backend("dali", torch.device("cpu")) == "dali"
    with pytest.raises(ValueError, match="backend 'gpu'"):
        resolve_backend("gpu", torch.device("cpu"))
