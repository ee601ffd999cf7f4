"""build_zarr (store format 5): meta/ values, pixels read back from the
packed tiles, bad input, resume after a kill, 1 vs 2 workers, append, split
and content digests."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from engine import packing
from engine import store as layout
from engine.reader import WindowReader
from engine.recipes import SIZE_CLASS_EDGES
from preprocess import build_zarr
from preprocess.build_zarr import build_store, main
from preprocess.ela import compute_ela
from preprocess.source import load_image, load_masks, to_rgb8

REPO = Path(__file__).resolve().parents[1]
# several blocks from the demo source (its largest image, 700 px, has 36
# tiles of 128 px): what the resume, worker and append tests need
SMALL = layout.PixelLayout(chunk=128, codec="lz4", level=9, shard_tiles=40)
SMALL_ARGS = ["--chunk", "128", "--codec", "lz4", "--codec-level", "9", "--shard-tiles", "40"]


def _decode(path) -> np.ndarray:
    """Independent decode: OpenCV's 8-bit colour read (16-bit v -> v >> 8,
    which equals round(v / 257) for the demo's v = 257 k; alpha dropped,
    the demo's alpha being opaque)."""
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _mask_file(image: Path) -> Path:
    folder = "supplemental_masks" if image.parent.name == "supplemental_images" else "train_masks"
    return image.parents[2 if image.parent.parent.name == "train_images" else 1] / folder / f"{image.stem}.npy"


def _rows(store: Path) -> list[Path]:
    return [Path(p) for p in json.loads((store / "build_report.json").read_text())["rows"]]


# ---------------------------------------------------------------- tiles read back

class Tiles:
    """A store's pixels reassembled from its packed tiles with zarr-python
    and meta/tile_start alone (independent of engine/reader.py)."""

    def __init__(self, store: Path):
        self.store = Path(store)
        group = layout.open_store(store)
        self.meta = layout.read_meta(group)
        self.instance_tiles = group["instances/tile_start"][...]
        self.tile = group.attrs["layout"]["chunk"]
        self._arrays = {}

    def _array(self, kind: str, level: int) -> zarr.Array:
        path = layout.tiles_path(kind, level)
        if path not in self._arrays:
            self._arrays[path] = zarr.open_array(str(self.store / path), mode="r")
        return self._arrays[path]

    def _assembled(self, kind: str, level: int, start: int, height: int, width: int):
        rows, cols = packing.tile_grid(height, width, self.tile)
        found = self._array(kind, level)[start:start + rows * cols]
        found = found.reshape(rows, cols, self.tile, self.tile, *found.shape[3:]).swapaxes(1, 2)
        return found.reshape(rows * self.tile, cols * self.tile, *found.shape[4:])[:height, :width]

    def pixels(self, kind: str, row: int, level: int = 0) -> np.ndarray:
        """Kind image, ela or mask of `row` at `level`."""
        start = int(self.meta["tile_start"][row, level])
        assert start >= 0, f"row {row} has no level {level}"
        shape = packing.level_shape(int(self.meta["height"][row]), int(self.meta["width"][row]), level)
        return self._assembled(kind, level, start, *shape)

    def instances(self, row: int) -> np.ndarray:
        first, stop = self.meta["instance_start"][row:row + 2]
        shape = int(self.meta["height"][row]), int(self.meta["width"][row])
        return np.stack([self._assembled("instance", 0, int(s), *shape)
                         for s in self.instance_tiles[first:stop]])

    def levels(self, row: int) -> int:
        return int((self.meta["tile_start"][row] >= 0).sum())


# ---------------------------------------------------------------- the demo store

def test_meta_matches_an_independent_computation(demo_store):
    group = layout.open_store(demo_store)
    meta = layout.read_meta(group)
    rows = _rows(demo_store)
    n = len(rows)
    assert n == 36 and len(meta["label"]) == n
    for name, (dtype, trailing) in layout.META_SCHEMA.items():
        length = n + 1 if name == "instance_start" else n
        assert meta[name].shape == (length,) + trailing, name
        if dtype is not str:
            assert meta[name].dtype == dtype, name
    keys = [(p.parent.relative_to(p.parents[2] if p.parent.parent.name == "train_images"
                                  else p.parent.parent).as_posix(), p.stem) for p in rows]
    assert keys == sorted(keys), "rows sorted by folder, then case id"
    starts = meta["instance_start"]
    assert starts[0] == 0
    inst_bbox = group["instances/bbox"][...]
    inst_area = group["instances/area"][...]
    inst_row = group["instances/image_row"][...]
    for row, image in enumerate(rows):
        assert meta["case_id"][row] == image.stem
        forged = image.parent.name != "authentic"
        assert meta["label"][row] == forged
        h, w = cv2.imread(str(image), cv2.IMREAD_UNCHANGED).shape[:2]
        assert (meta["height"][row], meta["width"][row]) == (h, w)
        levels = layout.level_count(h, w)
        assert (meta["tile_start"][row, :levels] >= 0).all()
        assert (meta["tile_start"][row, levels:] == -1).all()
        if not forged:
            assert meta["n_instances"][row] == 0 and meta["area_ratio"][row] == 0
            assert (meta["bbox"][row] == -1).all() and (meta["centroid"][row] == -1).all()
            assert meta["size_class"][row] == 0 and starts[row + 1] == starts[row]
            continue
        masks = np.load(_mask_file(image))
        union = masks.max(axis=0)
        ys, xs = np.nonzero(union)
        assert meta["n_instances"][row] == len(masks) == starts[row + 1] - starts[row]
        assert meta["area_ratio"][row] == np.float32(len(ys) / (h * w))
        assert list(meta["bbox"][row]) == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
        np.testing.assert_allclose(meta["centroid"][row], [ys.mean(), xs.mean()], rtol=1e-6)
        expected_class = 1 + sum(len(ys) / (h * w) >= e for e in SIZE_CLASS_EDGES)
        assert meta["size_class"][row] == expected_class
        for i, layer in enumerate(masks, start=starts[row]):
            ly, lx = np.nonzero(layer)
            assert inst_row[i] == row
            assert list(inst_bbox[i]) == [ly.min(), lx.min(), ly.max() + 1, lx.max() + 1]
            assert inst_area[i] == len(ly)


def test_tiles_never_overlap_and_stay_in_their_block(demo_store):
    """Every (kind, level) tile id belongs to one row, and a row's tiles lie
    in one block of each array (the plan; written by one task)."""
    tiles = Tiles(demo_store)
    meta = tiles.meta
    pixel_layout = layout.PixelLayout(**layout.open_store(demo_store).attrs["layout"])
    for level in range(layout.MAX_LEVELS):
        taken: set[int] = set()
        for row in np.flatnonzero(meta["tile_start"][:, level] >= 0):
            count = packing.tile_counts(int(meta["height"][row]), int(meta["width"][row]),
                                        level + 1, pixel_layout.chunk)[level]
            ids = set(range(int(meta["tile_start"][row, level]),
                            int(meta["tile_start"][row, level]) + count))
            assert not ids & taken
            assert len({i // pixel_layout.shard_tiles for i in ids}) == 1
            taken |= ids
    per_shard = layout.tiles_shard_tiles("instance", pixel_layout)
    for row in np.flatnonzero(meta["n_instances"]):
        first, stop = meta["instance_start"][row:row + 2]
        blocks = {int(s) // per_shard for s in tiles.instance_tiles[first:stop]}
        assert len(blocks) == 1


def test_split_is_a_hash_of_the_case_id_alone(demo_store):
    meta = layout.read_meta(layout.open_store(demo_store))
    by_case: dict[str, set[int]] = {}
    for case, split in zip(meta["case_id"].tolist(), meta["split"].tolist()):
        by_case.setdefault(case, set()).add(split)
    assert all(len(s) == 1 for s in by_case.values()), "a case never straddles the split"
    ids = np.array(sorted(by_case), dtype=np.dtypes.StringDType())
    alone = [int(layout.split_of(ids[i:i + 1])[0]) for i in range(len(ids))]
    assert alone == layout.split_of(ids).tolist() == [by_case[c].pop() for c in ids.tolist()]
    many = np.array([f"case-{i}" for i in range(20_000)], dtype=np.dtypes.StringDType())
    split = layout.split_of(many)
    assert abs(split.mean() - layout.VAL_FRACTION) < 0.01
    np.testing.assert_array_equal(layout.split_of(many[::-1]), split[::-1])
    np.testing.assert_array_equal(layout.split_of(many, 0.0), 0)


def test_root_attributes_and_fingerprint(demo_store):
    group = layout.open_store(demo_store)
    attrs = group.attrs.asdict()
    assert attrs["layout"] == dataclasses.asdict(layout.DEFAULT_LAYOUT)
    assert attrs["version"] == layout.VERSION
    meta = layout.read_meta(group)
    instances = {k: group[f"instances/{k}"][...] for k in layout.INSTANCE_ARRAYS}
    assert attrs["fingerprint"] == build_zarr.fingerprint(meta, instances)
    meta["split"] = 1 - meta["split"]
    assert attrs["fingerprint"] != build_zarr.fingerprint(meta, instances)
    assert not layout.partial_path(demo_store).exists()
    assert not (demo_store / build_zarr.BUILD_PREFIX).exists(), "the build records are gone"
    assert not any(demo_store.glob("images")), "no per-image arrays"


def test_the_tiles_arrays_are_zarr_arrays_of_whole_blocks(demo_store):
    n_blocks = 1 + max(int(s) for s in layout.read_meta(layout.open_store(demo_store))
                       ["tile_start"][:, 0]) // layout.DEFAULT_LAYOUT.shard_tiles
    for kind, trailing in packing.KINDS.items():
        arr = zarr.open_array(str(demo_store / layout.tiles_path(kind, 0)), mode="r")
        per_shard = layout.tiles_shard_tiles(kind, layout.DEFAULT_LAYOUT)
        assert arr.shape == (n_blocks * per_shard, 256, 256) + trailing
        assert arr.shards == (per_shard, 256, 256) + trailing
    shards = sorted(p.name for p in (demo_store / "tiles/image/0").iterdir() if p.name != "zarr.json")
    assert shards == [f"c.{b}.0.0.0" for b in range(n_blocks)], "one shard object per block"


def test_pixels_equal_the_decoded_png(demo_store):
    tiles = Tiles(demo_store)
    meta = tiles.meta
    for row, image in enumerate(_rows(demo_store)):
        full = _decode(image)
        np.testing.assert_array_equal(tiles.pixels("image", row), full)
        if row % 6 == 0:  # the slower full-image checks on a sample of rows
            np.testing.assert_array_equal(tiles.pixels("ela", row), compute_ela(full))
        if meta["label"][row]:
            masks = np.load(_mask_file(image))
            np.testing.assert_array_equal(tiles.instances(row), masks)
            np.testing.assert_array_equal(tiles.pixels("mask", row), masks.max(axis=0))
        else:
            assert not tiles.pixels("mask", row).any()


def test_every_digest_is_the_content_digest_of_the_decoded_source(demo_store):
    meta = layout.read_meta(layout.open_store(demo_store))
    for row, image in enumerate(_rows(demo_store)):
        rgb = load_image(image)
        masks = load_masks(_mask_file(image), *rgb.shape[:2]) if meta["label"][row] else None
        levels = list(build_zarr.pyramid(rgb, masks))
        assert bytes(meta["digest"][row]) == layout.content_digest(levels, masks), row
    assert len({bytes(d) for d in meta["digest"]}) == len(meta["digest"])


def test_pyramid_levels_are_2x2_means(demo_store):
    tiles = Tiles(demo_store)
    meta = tiles.meta
    row = int(np.argmax(meta["height"].astype(int) * meta["width"] * meta["label"]))
    levels = layout.level_count(int(meta["height"][row]), int(meta["width"][row]))
    assert levels >= 2 and tiles.levels(row) == levels
    for level in range(1, levels):
        prev = tiles.pixels("image", row, level - 1).astype(np.float64)
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        expected = prev[:2 * h, :2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
        got = tiles.pixels("image", row, level)
        assert got.shape == (h, w, 3)
        assert np.abs(got - expected).max() <= 0.5 + 1e-9
        prev_mask = tiles.pixels("mask", row, level - 1)
        np.testing.assert_array_equal(tiles.pixels("mask", row, level), prev_mask[:2 * h:2, :2 * w:2])


def test_conversion_of_16_bit_grey_and_alpha():
    grey16 = np.array([[0, 128, 129, 257 * 7, 65535]], np.uint16)
    np.testing.assert_array_equal(to_rgb8(grey16)[0, :, 0], [0, 0, 1, 7, 255])
    bgra = np.zeros((1, 2, 4), np.uint8)
    bgra[0, 0] = (10, 20, 30, 255)   # opaque: unchanged, BGR -> RGB
    bgra[0, 1] = (10, 20, 30, 0)     # transparent: white
    np.testing.assert_array_equal(to_rgb8(bgra)[0], [[30, 20, 10], [255, 255, 255]])


def test_a_per_image_layout_is_refused(demo_source, tmp_path):
    with pytest.raises(build_zarr.BuildError, match="packed layout .* only"):
        build_store(demo_source, tmp_path / "store.zarr", workers=1, progress=False,
                    figure=False, pixel_layout=layout.PER_IMAGE_LAYOUT)
    assert not (tmp_path / "store.zarr").exists()


# ---------------------------------------------------------------- per-image arrays (benchmarks)

def _pixels_to_write():
    """An image, a sparse union mask and instance masks that span edge
    chunks of both layouts, with all-zero chunks."""
    rng = np.random.default_rng(1)
    h, w = 512 + 37, 2 * 512 + 5
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[:256, :256] = 0                    # an all-zero image chunk
    union = np.zeros((h, w), np.uint8)
    union[h - 20:h - 3, 10:40] = 1           # only bottom-left chunks are non-zero
    instances = np.stack([union, np.zeros_like(union)])
    instances[1, 5:9, w - 4:w] = 1
    return ((layout.image_path(0), image), (layout.mask_path(0), union),
            (layout.instances_mask_path(0), instances))


def _shard_chunks(data: bytes, count: int) -> list[bytes | None]:
    """Each chunk's bytes of a shard (None where the index says empty), by
    zarr's sharding spec: an index of (offset, size) uint64 pairs and its
    4-byte CRC-32C at the end."""
    table = np.frombuffer(data[-(16 * count + 4):-4], "<u8").reshape(-1, 2)
    return [None if o == layout.INDEX_EMPTY else data[o:o + n] for o, n in table.tolist()]


def test_direct_writes_equal_what_zarr_writes(tmp_path):
    """create_pixels (version 4's per-image layout, which benchmarks/scale.py
    synthesises) encodes arrays itself; zarr-python, writing the same pixels
    with the same codecs, must give the same metadata and the same chunk
    bytes (a shard's chunks may lie in another order: zarr's is Morton
    order, ours C order), and read ours back equal, locally and through a
    memory store."""
    pixel_layout = layout.PER_IMAGE_LAYOUT
    local = zarr.open_group(str(tmp_path / "local.zarr"), mode="w")
    memory = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    reference = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    for path, data in _pixels_to_write():
        for group in (local, memory):
            layout.create_pixels(group, path, data, pixel_layout)
            np.testing.assert_array_equal(group[path][...], data)
        chunks = pixel_layout.chunk_shape(path, data.shape)
        grid = pixel_layout.grid_shape(path, data.shape)
        written = reference.create_array(path, shape=data.shape, dtype=np.uint8, chunks=chunks,
                                         shards=grid, compressors=pixel_layout.compressors(),
                                         fill_value=0, chunk_key_encoding={
                                             "name": "default", "separator": layout.SEPARATOR},
                                         config={"write_empty_chunks": False})
        written[...] = data
        ours = {k: v.to_bytes() for k, v in memory.store._store_dict.items() if k.startswith(f"{path}/")}
        theirs = {k: v.to_bytes() for k, v in reference.store._store_dict.items()
                  if k.startswith(f"{path}/")}
        doc = json.loads(ours.pop(f"{path}/zarr.json"))
        assert doc.pop("attributes") == {}
        reference_doc = json.loads(theirs.pop(f"{path}/zarr.json"))
        reference_doc.pop("attributes")
        assert doc == reference_doc, path
        count = int(np.prod([g // c for g, c in zip(grid, chunks)]))
        assert ours.keys() == theirs.keys() == {pixel_layout.key(path, (0,) * data.ndim)}
        key = next(iter(ours))
        assert _shard_chunks(ours[key], count) == _shard_chunks(theirs[key], count), path
        assert None in _shard_chunks(ours[key], count), "all-zero chunks are left out"
        local_files = {k.relative_to(tmp_path / "local.zarr").as_posix(): k.read_bytes()
                       for k in (tmp_path / "local.zarr" / path).rglob("*") if k.is_file()}
        assert local_files == {k: v.to_bytes() for k, v in memory.store._store_dict.items()
                               if k.startswith(f"{path}/")}, "local and memory writes alike"
    for parent in ("images", "images/0", "masks", "masks/0", "instances_mask"):
        assert json.loads((tmp_path / "local.zarr" / parent / "zarr.json").read_text()) == \
            json.loads(reference.store._store_dict[f"{parent}/zarr.json"].to_bytes())


# ---------------------------------------------------------------- bad input

def _png(path: Path, h: int, w: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), pixels)
    return pixels


def _mask(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array, allow_pickle=True)


def _square(h: int, w: int, n: int = 1) -> np.ndarray:
    m = np.zeros((n, h, w), np.uint8)
    m[:, 10:20, 10:20] = 1
    return m


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory):
    """Two good cases and one file per kind of bad input, with the words
    its reason must contain."""
    root = tmp_path_factory.mktemp("bad")
    auth, forged, masks = root / "train_images/authentic", root / "train_images/forged", root / "train_masks"
    _png(auth / "good.png", 70, 80)
    _png(forged / "good.png", 70, 80)
    _mask(masks / "good.npy", _square(70, 80, 2))
    expected = {}
    good = (auth / "good.png").read_bytes()
    (auth / "truncated.png").write_bytes(good[: len(good) // 2])
    expected[auth / "truncated.png"] = "truncated"
    (auth / "zero.png").write_bytes(b"")
    expected[auth / "zero.png"] = "zero-byte"
    (auth / "readme.txt").write_text("not an image")
    expected[auth / "readme.txt"] = "not a .png file"
    ok, jpeg = cv2.imencode(".jpg", np.zeros((70, 80, 3), np.uint8))
    (auth / "jpeg.png").write_bytes(jpeg.tobytes())
    expected[auth / "jpeg.png"] = "not a PNG file"
    _png(auth / "huge.png", 130, 130)
    expected[auth / "huge.png"] = "exceeds the limit of 10000"
    _png(auth / "dup.png", 70, 80)
    _png(auth / "dup.PNG", 70, 80)
    expected[auth / "dup.png"] = expected[auth / "dup.PNG"] = "duplicate case id 'dup'"
    cases = {
        "shape": (_square(60, 80), "is 60 x 80 (H x W) but its image is 70 x 80"),
        "ndim": (_square(70, 80)[None], "4 dimensions"),
        "values": (_square(70, 80) * 2, "found 0, 2"),
        "float": (_square(70, 80).astype(np.float32), "float mask (float32)"),
        "nan": (np.full((1, 70, 80), np.nan, np.float64), "containing NaN"),
        "pickled": (np.array([{"a": 1}], dtype=object), "pickled"),
        "empty": (np.zeros((1, 70, 80), np.uint8), "empty mask"),
    }
    for name, (array, words) in cases.items():
        _png(forged / f"{name}.png", 70, 80)
        _mask(masks / f"{name}.npy", array)
        expected[masks / f"{name}.npy"] = words
    _png(forged / "nomask.png", 70, 80)
    expected[forged / "nomask.png"] = "forged image without a mask"
    _mask(masks / "orphan.npy", _square(70, 80))
    expected[masks / "orphan.npy"] = "mask without a forged image"
    return root, expected


def test_every_bad_input_is_skipped_with_its_reason(bad_source, tmp_path, capsys):
    root, expected = bad_source
    out = tmp_path / "store.zarr"
    report = build_store(root, out, workers=1, max_pixels=10_000, progress=False, figure=False)
    reasons = {item["file"]: item["problem"] for item in report["skipped"]}
    for path, words in expected.items():
        assert str(path) in reasons, f"{path.name} not reported"
        assert words in reasons[str(path)], (path.name, reasons[str(path)])
    assert len(reasons) == len(expected)
    meta = layout.read_meta(layout.open_store(out))
    assert meta["case_id"].tolist() == ["good", "good"] and meta["label"].tolist() == [0, 1]
    assert meta["n_instances"].tolist() == [0, 2]
    on_disk = json.loads((out / "build_report.json").read_text())
    assert {i["file"] for i in on_disk["skipped"]} == {str(p) for p in expected}
    printed = capsys.readouterr().out
    assert f"skipped {len(expected)} files" in printed and "zero.png: zero-byte file" in printed


def test_an_image_with_more_tiles_than_a_shard_is_skipped_with_its_reason(tmp_path):
    root = tmp_path / "source"
    _png(root / "train_images/authentic/small.png", 200, 300)
    _png(root / "train_images/authentic/large.png", 900, 700)   # 8 x 6 tiles of 128 px
    report = build_store(root, tmp_path / "store.zarr", workers=1, progress=False, figure=False,
                         pixel_layout=SMALL)
    assert report["skipped"] == [{"file": str(root / "train_images/authentic/large.png"),
                                  "problem": "48 tiles of 128 px, more than a shard's 40 "
                                             "(--shard-tiles, --chunk)"}]
    assert Tiles(tmp_path / "store.zarr").meta["case_id"].tolist() == ["small"]


def test_strict_stops_at_the_first_bad_input(bad_source, tmp_path, capsys):
    root, _ = bad_source
    out = tmp_path / "store.zarr"
    code = main(["--source", str(root), "--out", str(out), "--strict", "--workers", "1",
                 "--no-figure"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(root) in err
    assert not out.exists()


def test_pixel_limit_reports_size(tmp_path):
    path = tmp_path / "big.png"
    _png(path, 120, 90)
    with pytest.raises(ValueError, match=r"big.png: 90 x 120 = 10800 pixels exceeds"):
        load_image(path, max_pixels=10_000)


def test_existing_store_is_kept_unless_overwrite(demo_store, capsys):
    before = (demo_store / "zarr.json").stat().st_mtime_ns
    assert main(["--source", "unused", "--out", str(demo_store)]) == 0
    assert "complete store exists" in capsys.readouterr().out
    assert (demo_store / "zarr.json").stat().st_mtime_ns == before


# ---------------------------------------------------------------- equal stores

TIMINGS = ("seconds", "bytes_store", "workers")


def _files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def _assert_same_store(a: Path, b: Path) -> None:
    """Same objects with the same bytes, but for the root's build id (every
    build has its own: the read cache's key) and the report's timings."""
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b)
    root_a, root_b = (json.loads(f.pop("zarr.json"))["attributes"] for f in (files_a, files_b))
    assert root_a.pop(layout.BUILD_ID) != root_b.pop(layout.BUILD_ID)
    assert root_a == root_b
    report_a, report_b = (json.loads(f.pop(build_zarr.REPORT)) for f in (files_a, files_b))
    assert {k: v for k, v in report_a.items() if k not in TIMINGS} == \
        {k: v for k, v in report_b.items() if k not in TIMINGS}
    for name in files_a:
        assert files_a[name] == files_b[name], name


@pytest.fixture(scope="module")
def small_store(demo_source, tmp_path_factory):
    """The demo source in SMALL's blocks, built by one worker in this process."""
    out = tmp_path_factory.mktemp("small") / "store.zarr"
    build_store(demo_source, out, workers=1, progress=False, figure=False, pixel_layout=SMALL)
    return out


def test_the_small_layout_makes_several_blocks_that_read_back_equal(small_store, demo_store):
    shards = list((small_store / "tiles/image/0").glob("c.*"))
    assert len(shards) >= 6
    small, default = Tiles(small_store), Tiles(demo_store)
    assert {k: v for k, v in small.meta.items() if k != "tile_start"}.keys() == \
        {k: v for k, v in default.meta.items() if k != "tile_start"}.keys()
    for name in small.meta:
        if name != "tile_start":
            np.testing.assert_array_equal(small.meta[name], default.meta[name], err_msg=name)
    for row in range(len(small.meta["label"])):
        for level in range(small.levels(row)):
            np.testing.assert_array_equal(small.pixels("image", row, level),
                                          default.pixels("image", row, level))
        if small.meta["label"][row]:
            np.testing.assert_array_equal(small.instances(row), default.instances(row))


def test_two_workers_build_what_one_builds(demo_source, small_store, tmp_path):
    out = tmp_path / "store.zarr"
    report = build_store(demo_source, out, workers=2, progress=False, figure=False,
                         pixel_layout=SMALL)
    assert report["workers"] == 2
    _assert_same_store(out, small_store)


def test_a_running_cluster_builds_what_one_worker_builds(demo_source, small_store, tmp_path,
                                                         capsys):
    from distributed import LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      scheduler_port=0, dashboard_address=None) as cluster:
        out = tmp_path / "store.zarr"
        assert main(["--source", str(demo_source), "--out", str(out), "--cluster",
                     cluster.scheduler_address, "--no-figure", *SMALL_ARGS]) == 0
    assert f"on the cluster at {cluster.scheduler_address}" in capsys.readouterr().out
    _assert_same_store(out, small_store)


class _Killed(Exception):
    """Stands in for a kill: raised by a block task after some have finished."""


def _dying_after(monkeypatch, blocks: int) -> list[int]:
    """Make the build's tasks raise _Killed once `blocks` blocks are written."""
    done = []
    real = build_zarr.build_block

    def build_block(task):
        if len(done) == blocks:
            raise _Killed
        done.append(task.block)
        return real(task)

    monkeypatch.setattr(build_zarr, "build_block", build_block)
    return done


def test_a_build_killed_after_some_blocks_resumes_to_the_same_store(demo_source, small_store,
                                                                      tmp_path, monkeypatch, capsys):
    out = tmp_path / "store.zarr"
    written = _dying_after(monkeypatch, 3)
    with pytest.raises(_Killed):
        build_store(demo_source, out, workers=1, progress=False, figure=False, pixel_layout=SMALL)
    monkeypatch.undo()
    records = layout.partial_path(out) / build_zarr.BLOCK_RECORDS
    assert sorted(int(p.stem) for p in records.glob("*.json")) == written == [0, 1, 2]
    assert not out.exists()
    with pytest.raises(layout.StoreError, match="did not finish"):
        layout.open_store(out)
    partial = layout.partial_path(out)
    kept = {p.relative_to(partial): p.stat().st_mtime_ns for p in partial.glob("tiles/*/*/c.*")}
    assert len([p for p in kept if p.parts[1] == "image" and p.parts[2] == "0"]) == 3
    build_store(demo_source, out, workers=1, progress=False, figure=False, pixel_layout=SMALL)
    assert "resuming: 3 of" in capsys.readouterr().out
    _assert_same_store(out, small_store)
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept, "done blocks are not redone"


def test_kill_9_of_a_two_worker_build_then_rerun_gives_the_uninterrupted_store(
        demo_source, small_store, tmp_path):
    out = tmp_path / "store.zarr"
    records = layout.partial_path(out) / build_zarr.BLOCK_RECORDS
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "preprocess/build_zarr.py"), "--source", str(demo_source),
         "--out", str(out), "--workers", "2", "--no-figure", *SMALL_ARGS],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        start_new_session=True)  # its own process group: the kill takes the workers too
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_dir() and len(list(records.glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and layout.partial_path(out).exists()
    done_before = len(list(records.glob("*.json")))
    report = build_store(demo_source, out, workers=2, progress=False, figure=False,
                         pixel_layout=SMALL)
    assert report is not None and done_before >= 3
    _assert_same_store(out, small_store)


def _killed(partial, out):
    """Stands in for build_zarr.finish: the build dies just before the rename."""
    raise KeyboardInterrupt


def test_kill_between_finalize_and_rename_resumes(bad_source, tmp_path, monkeypatch):
    root, _ = bad_source
    build = dict(workers=1, max_pixels=10_000, progress=False, figure=False)
    build_store(root, tmp_path / "uninterrupted.zarr", **build)
    out = tmp_path / "store.zarr"
    monkeypatch.setattr(build_zarr, "finish", _killed)
    with pytest.raises(KeyboardInterrupt):
        build_store(root, out, **build)
    monkeypatch.undo()
    assert not out.exists()
    build_store(root, out, **build)
    _assert_same_store(out, tmp_path / "uninterrupted.zarr")


def test_partial_of_other_settings_is_started_over(bad_source, tmp_path, monkeypatch, capsys):
    root, _ = bad_source
    out = tmp_path / "store.zarr"
    monkeypatch.setattr(build_zarr, "finish", _killed)
    with pytest.raises(KeyboardInterrupt):
        build_store(root, out, workers=1, max_pixels=10_000, progress=False, figure=False)
    monkeypatch.undo()
    report = build_store(root, out, workers=1, max_pixels=20_000, progress=False, figure=False)
    assert "starting over" in capsys.readouterr().out
    assert "huge" in layout.read_meta(layout.open_store(out))["case_id"].tolist()
    assert not any("huge" in item["file"] for item in report["skipped"])


def test_overwrite_rebuilds_an_existing_store(bad_source, tmp_path):
    root, _ = bad_source
    out = tmp_path / "store.zarr"
    build_store(root, out, workers=1, max_pixels=10_000, progress=False, figure=False)
    assert main(["--source", str(root), "--out", str(out), "--overwrite", "--workers", "1",
                 "--max-pixels", "20000", "--no-figure"]) == 0
    assert "huge" in layout.read_meta(layout.open_store(out))["case_id"].tolist()


def test_the_cli_builds_the_layout_asked_for_and_refuses_a_bad_one(demo_source, demo_store, tmp_path, capsys):
    out = tmp_path / "zstd128.zarr"
    assert main(["--source", str(demo_source), "--out", str(out), "--chunk", "128", "--codec",
                 "zstd", "--codec-level", "3", "--shard-tiles", "64", "--workers", "1",
                 "--no-figure"]) == 0
    group = layout.open_store(out)
    assert group.attrs["layout"] == dataclasses.asdict(
        layout.PixelLayout(chunk=128, codec="zstd", level=3, shard_tiles=64))
    doc = json.loads((out / layout.tiles_path("image", 0) / "zarr.json").read_text())
    assert doc["codecs"][0]["configuration"]["chunk_shape"] == [1, 128, 128, 3]
    assert doc["chunk_grid"]["configuration"]["chunk_shape"] == [64, 128, 128, 3]
    assert [c["name"] for c in doc["codecs"][0]["configuration"]["codecs"]] == ["bytes", "zstd", "crc32c"]
    ours, default = Tiles(out), Tiles(demo_store)
    np.testing.assert_array_equal(ours.meta["digest"], default.meta["digest"])
    for row in range(len(ours.meta["label"])):   # same pixels, another layout
        np.testing.assert_array_equal(ours.pixels("image", row), default.pixels("image", row))
    with pytest.raises(SystemExit):
        main(["--source", str(demo_source), "--out", str(tmp_path / "bad.zarr"), "--codec", "lz4",
              "--codec-level", "12"])
    assert "level 12: lz4 takes 0 to 9" in capsys.readouterr().err


# ---------------------------------------------------------------- append

def _partial_source(demo_source: Path, folder: Path, keep) -> Path:
    """A copy of the demo source with only the cases `keep(case id)` selects."""
    for image in demo_source.rglob("*.png"):
        if keep(image.stem):
            relative = image.relative_to(demo_source)
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, folder / relative)
            mask = _mask_file(image)
            if image.parent.name != "authentic" and mask.exists():
                (folder / mask.relative_to(demo_source)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(mask, folder / mask.relative_to(demo_source))
    return folder


def _by_case(store: Path) -> dict[str, tuple]:
    """Every row's meta/ values (but its tile positions), instances and
    pixels, by (image folder, case id)."""
    tiles = Tiles(store)
    cases = json.loads((store / build_zarr.REPORT).read_text())["row_cases"]
    found = {}
    for row, case in enumerate(cases):
        meta = tuple(np.asarray(tiles.meta[name][row]).tolist() for name in layout.META_SCHEMA
                     if name not in ("tile_start", "instance_start"))
        pixels = [tiles.pixels(kind, row, level).tobytes() for kind in ("image", "ela", "mask")
                  for level in range(tiles.levels(row))]
        if tiles.meta["label"][row]:
            pixels.append(tiles.instances(row).tobytes())
        found[case] = meta, pixels
    return found


@pytest.fixture(scope="module")
def first_half(demo_source, tmp_path_factory):
    """The demo source's cases whose id sorts before '5' (ids are numbers)."""
    return _partial_source(demo_source, tmp_path_factory.mktemp("half") / "source",
                           lambda case: case < "5")


def test_append_in_two_steps_equals_one_build_case_for_case(demo_source, first_half, small_store,
                                                            tmp_path, capsys):
    out = tmp_path / "store.zarr"
    build_store(first_half, out, workers=1, progress=False, figure=False, pixel_layout=SMALL)
    before = Tiles(out)
    old_rows = len(before.meta["label"])
    assert 0 < old_rows < 36
    old_root = json.loads((out / "zarr.json").read_text())["attributes"]
    shards = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "tiles").rglob("c.*")}
    blocks = len(list((out / "tiles/image/0").glob("c.*")))
    assert main(["--source", str(demo_source), "--out", str(out), "--append", "--workers", "2",
                 "--no-figure"]) == 0
    after = Tiles(out)
    assert len(after.meta["label"]) == 36
    for name, data in before.meta.items():   # existing rows: unchanged, splits included
        stop = old_rows + 1 if name == "instance_start" else old_rows
        np.testing.assert_array_equal(after.meta[name][:stop], data, err_msg=name)
    assert (after.meta["tile_start"][old_rows:, 0] >= blocks * SMALL.shard_tiles).all(), \
        "new rows in new blocks"
    for path, (mtime, data) in shards.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    root = json.loads((out / "zarr.json").read_text())["attributes"]
    assert root[layout.BUILD_ID] == old_root[layout.BUILD_ID], "the read cache stays valid"
    assert root["fingerprint"] != old_root["fingerprint"]
    assert not (out / build_zarr.BUILD_PREFIX).exists()
    assert _by_case(out) == _by_case(small_store)
    capsys.readouterr()
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert build_store(demo_source, out, workers=1, append=True, progress=False,
                       figure=False) is None
    assert "nothing new to append" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


def test_a_killed_append_resumes_to_the_uninterrupted_append(demo_source, first_half, tmp_path,
                                                             monkeypatch, capsys):
    stores = {}
    for name in ("uninterrupted", "killed"):
        out = tmp_path / f"{name}.zarr"
        build_store(first_half, out, workers=1, progress=False, figure=False, pixel_layout=SMALL)
        stores[name] = out
    build_store(demo_source, stores["uninterrupted"], workers=1, append=True, progress=False,
                figure=False)
    out = stores["killed"]
    _dying_after(monkeypatch, 2)
    with pytest.raises(_Killed):
        build_store(demo_source, out, workers=1, append=True, progress=False, figure=False)
    monkeypatch.undo()
    assert len(layout.read_meta(layout.open_store(out))["label"]) < 36, \
        "the store stays readable, as it was, until the append finalizes"
    build_store(demo_source, out, workers=1, append=True, progress=False, figure=False)
    assert "resuming the interrupted append" in capsys.readouterr().out
    _assert_same_store_but_build_id(out, stores["uninterrupted"])


def test_an_append_killed_while_finalizing_resumes(demo_source, first_half, tmp_path, monkeypatch):
    stores = {}
    for name in ("uninterrupted", "killed"):
        out = tmp_path / f"{name}.zarr"
        build_store(first_half, out, workers=1, progress=False, figure=False, pixel_layout=SMALL)
        stores[name] = out
    build_store(demo_source, stores["uninterrupted"], workers=1, append=True, progress=False,
                figure=False)
    out = stores["killed"]
    create = layout.create_table
    calls = []

    def dies_half_way(group, path, data):
        calls.append(path)
        if len(calls) == 5:   # killed while writing it: an array of another shape left there
            create(group, path, data[:1])
            raise KeyboardInterrupt
        create(group, path, data)

    monkeypatch.setattr(layout, "create_table", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        build_store(demo_source, out, workers=1, append=True, progress=False, figure=False)
    monkeypatch.undo()
    with pytest.raises(layout.StoreError):
        layout.open_store(out)   # meta/ half rewritten: refused, not misread
    # a build without --append would start it over: refused, the store kept
    with pytest.raises(build_zarr.BuildError, match="an append to this store did not finish"):
        build_store(demo_source, out, workers=1, progress=False, figure=False)
    build_store(demo_source, out, workers=1, append=True, progress=False, figure=False)
    _assert_same_store_but_build_id(out, stores["uninterrupted"])


def _assert_same_store_but_build_id(a: Path, b: Path) -> None:
    """_assert_same_store for two appends to two builds (each its own build id)."""
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b)
    root_a, root_b = (json.loads(f.pop("zarr.json"))["attributes"] for f in (files_a, files_b))
    for root in (root_a, root_b):   # an append keeps its store's build id, and records it
        assert root.pop(layout.BUILD_ID) == root["build"]["base"].pop("build_id")
    assert root_a == root_b
    report_a, report_b = (json.loads(f.pop(build_zarr.REPORT)) for f in (files_a, files_b))
    assert {k: v for k, v in report_a.items() if k not in TIMINGS} == \
        {k: v for k, v in report_b.items() if k not in TIMINGS}
    for name in files_a:
        assert files_a[name] == files_b[name], name


def test_the_split_of_a_case_does_not_depend_on_the_other_cases(first_half, small_store,
                                                                tmp_path):
    out = tmp_path / "half.zarr"
    build_store(first_half, out, workers=1, progress=False, figure=False, pixel_layout=SMALL)
    half = layout.read_meta(layout.open_store(out))
    full = layout.read_meta(layout.open_store(small_store))
    split = dict(zip(full["case_id"].tolist(), full["split"].tolist()))
    assert all(split[c] == s for c, s in zip(half["case_id"].tolist(), half["split"].tolist()))
