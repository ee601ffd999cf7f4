"""Window and whole-array reads: direct chunk reads equal zarr's, levels are
chosen and positioned right. A damaged store: tests/test_store_integrity.py."""
import math

import numpy as np
import pytest

from engine import store as layout
from engine.pipeline import PlannedBatches, WindowSource, build_pipeline
from engine.reader import WindowReader
from preprocess.verify_store import expected_arrays


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def meta(demo_store):
    return layout.read_meta(layout.open_store(demo_store))


def _random_windows(meta, rng, count):
    for _ in range(count):
        row = int(rng.integers(len(meta["label"])))
        h, w = int(meta["height"][row]), int(meta["width"][row])
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
        yield row, (y0, x0, y1, x1)


def test_whole_array_reads_equal_zarr_reads(demo_store, meta):
    """Every pixel array: edge chunks, 3-D instance masks, and all-zero
    chunks the shards leave out (they read as 0, as through zarr)."""
    group, reader = layout.open_store(demo_store), WindowReader(demo_store)
    for path in expected_arrays(meta):
        np.testing.assert_array_equal(reader.read_array(path), group[path][...], err_msg=path)


def test_instances_of_a_row(demo_store, meta):
    group = layout.open_store(demo_store)
    reader = WindowReader(group)
    forged, authentic = int(np.argmax(meta["label"])), int(np.argmin(meta["label"]))
    layers = reader.read_instances(forged)
    assert len(layers) == meta["n_instances"][forged] >= 1
    np.testing.assert_array_equal(np.stack(layers), group[layout.instances_mask_path(forged)][...])
    assert reader.read_instances(authentic) == []


def test_window_reads_equal_the_arrays_at_their_level(demo_store, meta):
    reader, arrays = WindowReader(demo_store, with_ela=True), WindowReader(demo_store)
    rng = np.random.default_rng(0)
    for row, (y0, x0, y1, x1) in _random_windows(meta, rng, 60):
        for out_size in (16, 64, 512):
            block = reader.read(row, (y0, x0, y1, x1), out_size)
            image = arrays.read_array(layout.image_path(row, block.level))
            by0 = math.floor(y0 * image.shape[0] / meta["height"][row])
            bx0 = math.floor(x0 * image.shape[1] / meta["width"][row])
            crop = (slice(by0, by0 + block.image.shape[0]), slice(bx0, bx0 + block.image.shape[1]))
            np.testing.assert_array_equal(block.image, image[crop])
            np.testing.assert_array_equal(
                block.ela[..., 0], arrays.read_array(layout.ela_path(row, block.level))[crop])
            if meta["label"][row]:
                np.testing.assert_array_equal(
                    block.mask[..., 0], arrays.read_array(layout.mask_path(row, block.level))[crop])


def test_level_zero_window_equals_the_stored_pixels(demo_store, meta):
    group = layout.open_store(demo_store)
    reader = WindowReader(demo_store)
    rng = np.random.default_rng(1)
    for row, (y0, x0, y1, x1) in _random_windows(meta, rng, 30):
        block = reader.read(row, (y0, x0, y1, x1), out_size=max(y1 - y0, x1 - x0))
        assert block.level == 0
        np.testing.assert_array_equal(block.image, group[layout.image_path(row)][y0:y1, x0:x1])
        np.testing.assert_allclose(block.roi_start, 0)
        np.testing.assert_allclose(block.roi_end, [y1 - y0, x1 - x0])
        if meta["label"][row]:
            union = np.asarray(group[layout.instances_mask_path(row)][:, y0:y1, x0:x1]).max(axis=0)
            np.testing.assert_array_equal(block.mask[..., 0], union)
        else:
            assert not block.mask.any()


def _crop_resize(reader, rows, windows, out_size):
    batches = PlannedBatches([np.asarray(rows)], [np.asarray(windows)], [np.arange(len(rows))])
    pipe = build_pipeline(WindowSource(reader, batches, out_size), batch_size=len(rows),
                          out_size=out_size, device="cpu", device_id=None, num_threads=1,
                          py_workers=0, seed=0)
    image = pipe.run()[0]
    return [np.asarray(image[i]) for i in range(len(rows))]


def test_pyramid_read_matches_a_resize_from_full_resolution(demo_store, meta):
    """The coarsest level with >= the output's resolution loses little (PSNR),
    and reads fewer bytes than level 0."""
    rows = [int(r) for r in np.argsort(-meta["height"].astype(int) * meta["width"])
            if layout.level_count(int(meta["height"][r]), int(meta["width"][r])) >= 3][:4]
    assert rows, "the demo store should hold images large enough for 3 levels"
    windows = []
    for row in rows:
        h, w = int(meta["height"][row]), int(meta["width"][row])
        windows.append((h // 10, w // 11, h - h // 7, w - w // 9))
    out = 64
    pyramid, full = WindowReader(demo_store), WindowReader(demo_store, pyramid=False)
    assert all(pyramid.read(r, w, out).level >= 1 for r, w in zip(rows, windows))
    assert sum(pyramid.read(r, w, out).image.nbytes for r, w in zip(rows, windows)) * 4 <= \
        sum(full.read(r, w, out).image.nbytes for r, w in zip(rows, windows))
    psnr = [_psnr(a, b) for a, b in   # the pipeline hands over uint8
            zip(_crop_resize(pyramid, rows, windows, out), _crop_resize(full, rows, windows, out))]
    # area-mean levels then DALI's antialiased resize vs DALI's alone from level 0:
    # different filters, so not identical, but close (measured 29-40 dB here)
    assert min(psnr) > 27 and np.mean(psnr) > 30, psnr


def test_reader_survives_pickling_for_worker_processes(demo_store, meta):
    import pickle

    reader = WindowReader(demo_store, with_ela=True)
    reader.read(0, (0, 0, 4, 4), 4)
    clone = pickle.loads(pickle.dumps(reader))
    window = (0, 0, int(meta["height"][0]), int(meta["width"][0]))
    np.testing.assert_array_equal(clone.read(0, window, 32).image, reader.read(0, window, 32).image)
    assert clone.read(0, window, 32).ela.shape[2] == 1


def test_worker_processes_get_the_storage_settings_with_their_reader(demo_store, tmp_path):
    """No environment variable carries the storage settings: a reader
    unpickled in a worker holds the same StorageSettings, and a URL is
    opened with its options."""
    import pickle

    from engine import storage

    settings = storage.StorageSettings(options={"anon": True, "endpoint_url": "http://here:9"},
                                       cache=tmp_path / "cache")
    clone = pickle.loads(pickle.dumps(WindowReader(demo_store, storage=settings)))
    assert clone.settings == settings
    options = storage.storage_options("s3://bucket/store.zarr", settings)
    assert options["endpoint_url"] == "http://here:9" and options["anon"] is True
    assert options["config_kwargs"] == storage.S3_DEFAULTS["config_kwargs"]
    assert "endpoint_url" not in storage.storage_options("s3://bucket/store.zarr")


def test_a_window_fetches_only_the_chunks_it_touches_by_byte_range(demo_store, meta):
    """A level-0 window across four chunks decodes those four chunks and no
    more, fetched as one byte range per row of adjacent chunks after one
    read of the shard's index, which later reads reuse."""
    side = layout.DEFAULT_LAYOUT.chunk
    row = next(int(r) for r in np.flatnonzero(meta["label"] == 0)
               if min(meta["height"][r], meta["width"][r]) >= 2 * side)
    path = layout.image_path(row)
    grid = [-(-int(meta[axis][row]) // side) for axis in ("height", "width")]
    shard = (demo_store / layout.DEFAULT_LAYOUT.key(path, (0, 0, 0))).read_bytes()
    index_bytes = 16 * grid[0] * grid[1] + 4   # zarr's sharding spec: (offset, size) per chunk + CRC
    sizes = np.frombuffer(shard[-index_bytes:-4], "<u8").reshape(grid[0], grid[1], 2)[..., 1]
    reader = WindowReader(demo_store)
    window = (side - 4, side - 4, side + 4, side + 4)
    reader.read(row, window, out_size=8)
    assert reader.stats == {"requests": 1 + 2, "bytes_decoded": 4 * side * side * 3,
                            "bytes_read": index_bytes + int(sizes[:2, :2].sum())}
    reader.read(row, window, out_size=8)
    assert reader.stats["requests"] == 3 + 2, "the shard index is read once"
    image = layout.open_store(demo_store)[path]
    np.testing.assert_array_equal(reader.read(row, window, 8).image,
                                  image[side - 4:side + 4, side - 4:side + 4])


def test_carried_errors_keep_their_class_and_message():
    """What DALI hands back for a worker's error (its traceback as text) becomes
    the same class with the same message; any other error is left alone."""
    from engine.reader import carried_error
    from engine.storage import StorageUnavailable
    damaged = layout.StoreDamaged("s3://b/s.zarr", "s3://b/s.zarr/images/3/0/c.0.0.0", "chunk missing")
    for error in (damaged, StorageUnavailable("s3://b/s.zarr: access denied"),
                  layout.StoreError("s.zarr: no store here")):
        text = ("\n\nException traceback received from worker thread:\n\nTraceback (most recent call last):\n"
                f'  File "engine/reader.py", line 1, in read\n{type(error).__module__}.'
                f"{type(error).__qualname__}: {error}\n")
        carried = carried_error(text)
        assert type(carried) is type(error) and str(carried) == str(error)
    carried = carried_error(f"engine.store.StoreDamaged: {damaged}")
    assert (carried.where, carried.problem) == (damaged.where, damaged.problem)
    assert carried_error("Traceback ...\nValueError: engine.store.StoreDamaged: no") is None
