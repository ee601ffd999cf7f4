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
from engine import ops, photometric, worker_ops
from engine.augment import apply_geometry
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


def _geometry(*rows):
    """ops.draw_geometry's layout for (name, values) rows."""
    out = np.zeros((len(rows), ops.ROW_WIDTH), np.float32)
    for at, (name, values) in enumerate(rows):
        out[at, 0], out[at, 1:1 + len(values)] = ops.GEOMETRIC.index(name), values
    return out


def _affine(angle, scale, dx, dy, size=64):
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, scale)
    matrix[:, 2] += (dx, dy)
    return ("affine", matrix.reshape(-1))


GEOMETRY = [("hflip", ()), ("vflip", ()), ("rot90", (1,)), ("rot90", (2,)), ("rot90", (3,)),
            _affine(30.0, 1.2, 5.0, -7.0)]


@pytest.mark.parametrize("op", GEOMETRY, ids=lambda op: f"{op[0]}{list(op[1])[:1]}")
def test_geometry_moves_pixels_ela_and_mask_together_on_both_backends(op):
    image, mask, ela = _tracer()
    moved_image, moved_mask, moved_ela = worker_ops.apply_geometric(image, mask, ela, _geometry(op))
    np.testing.assert_array_equal(moved_ela, moved_image[..., 0])
    follows = moved_mask.astype(bool) == (moved_ela > 200)
    # the dali backend's batch step: the same row, with torch
    batch = torch.from_numpy(np.dstack([image, ela])).permute(2, 0, 1)[None].float()
    torch_image, torch_mask = apply_geometry(batch, torch.from_numpy(mask)[None, None].float(),
                                             torch.from_numpy(_geometry(op))[None])
    torch_image = torch_image[0].permute(1, 2, 0).numpy()
    if op[0] == "affine":   # nearest vs bilinear differ on edges only
        assert follows.mean() > 0.97
        assert not np.array_equal(moved_image, image)
        # kornia's warp_affine with cv2.warpAffine's matrix: the same warp
        assert np.abs(torch_image[..., :3] - moved_image).mean() < 1
        assert (torch_mask[0, 0].numpy() == moved_mask).mean() > 0.99
    else:
        assert follows.all()
        np.testing.assert_array_equal(torch_image[..., :3], moved_image)
        np.testing.assert_array_equal(torch_image[..., 3], moved_ela)
        np.testing.assert_array_equal(torch_mask[0, 0].numpy(), moved_mask)


def test_coarse_dropout_blanks_rgb_only():
    image, mask, ela = _tracer()
    holes = _geometry(("coarse_dropout", (2, 3, 10, 12)), ("coarse_dropout", (40, 30, 8, 8)))
    out_image, out_mask, out_ela = worker_ops.apply_geometric(image.copy(), mask, ela, holes)
    assert (out_image[2:12, 3:15] == 0).all() and (out_image[40:48, 30:38] == 0).all()
    assert (out_image == 0).all(axis=2).sum() == 10 * 12 + 8 * 8
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_array_equal(out_ela, ela)


def test_geometric_draws_follow_the_recipe_odds():
    entries = (("hflip", {"p": 0.5}), ("rot90", {"p": 1.0, "k": (1, 3)}),
               ("affine", {"p": 0.3, "shift": 0.1, "scale": 0.2, "rotate": 45}),
               ("one_of", {"p": 0.6, "ops": (("vflip", {}), ("coarse_dropout", {"holes": (1, 4), "size": (5, 9)}))}),
               )
    assert ops.row_count(entries) == 1 + 1 + 1 + 4
    counts, turns, centre = {}, [], np.array([31.5, 31.5, 1.0])
    for seed in range(3000):
        holes = []
        for op, row in ops.acting_rows(ops.draw_geometry(entries, np.random.default_rng(seed), 64)):
            counts[op.name] = counts.get(op.name, 0) + (op.name != "coarse_dropout" or not holes)
            if op.name == "rot90":
                turns.append(int(row[0]))
            if op.name == "affine":
                matrix = np.array(row[:6]).reshape(2, 3)
                scale, angle = np.hypot(*matrix[0, :2]), np.degrees(np.arctan2(matrix[0, 1], matrix[0, 0]))
                dx, dy = matrix @ centre - centre[:2]
                assert abs(angle) <= 45 and 0.8 <= scale <= 1.2 and abs(dx) <= 6.4 and abs(dy) <= 6.4
            if op.name == "coarse_dropout":
                holes.append(row[:4])
        if holes:
            holes = np.array(holes)
            assert 1 <= len(holes) <= 4 and ((holes[:, 2:] >= 5) & (holes[:, 2:] <= 9)).all()
            assert ((holes[:, :2] >= 0) & (holes[:, :2] + holes[:, 2:] <= 64)).all()
    assert abs(counts["hflip"] / 3000 - 0.5) < 0.04 and counts["rot90"] == 3000
    assert abs(counts["affine"] / 3000 - 0.3) < 0.04
    assert abs(counts["vflip"] / 3000 - 0.3) < 0.04 and abs(counts["coarse_dropout"] / 3000 - 0.3) < 0.04
    assert sorted(set(turns)) == [1, 2, 3] and max(np.bincount(turns)[1:]) / min(np.bincount(turns)[1:]) < 1.2


def test_auto_backend_is_opencv_on_the_cpu_and_dali_on_cuda():
    assert resolve_backend("auto", torch.device("cpu")) == "opencv"
    assert resolve_backend("auto", torch.device("cuda")) == "dali"
    assert resolve_backend("dali", torch.device("cpu")) == "dali"
    with pytest.raises(ValueError, match="backend 'gpu'"):
        resolve_backend("gpu", torch.device("cpu"))
