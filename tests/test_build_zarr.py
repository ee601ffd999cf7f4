"""build_zarr: meta/ values, window reads, bad input, resume after kill -9."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from engine import storage as storages
from engine import store as layout
from engine.reader import WindowReader
from engine.recipes import SIZE_CLASS_EDGES
from preprocess import build_zarr
from preprocess.build_zarr import build_store, main
from preprocess.ela import compute_ela
from preprocess.source import load_image, to_rgb8

REPO = Path(__file__).resolve().parents[1]


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


def test_split_is_grouped_by_case_and_about_ten_percent(demo_store):
    meta = layout.read_meta(layout.open_store(demo_store))
    by_case: dict[str, set[int]] = {}
    for case, split in zip(meta["case_id"].tolist(), meta["split"].tolist()):
        by_case.setdefault(case, set()).add(split)
    assert all(len(s) == 1 for s in by_case.values()), "a case never straddles the split"
    val_cases = sum(s == {1} for s in by_case.values())
    assert 1 <= val_cases <= max(2, round(0.15 * len(by_case)))
    assert (meta["split"][meta["label"] == 1] == 1).any(), "val holds forged images"


def test_root_attributes_and_fingerprint(demo_store):
    group = layout.open_store(demo_store)
    attrs = group.attrs.asdict()
    assert attrs["layout"] == dataclasses.asdict(layout.DEFAULT_LAYOUT)
    assert attrs["version"] == layout.VERSION
    meta = layout.read_meta(group)
    instances = {k: group[f"instances/{k}"][...] for k in ("image_row", "bbox", "area")}
    assert attrs["fingerprint"] == build_zarr.fingerprint(meta, instances)
    meta["split"] = 1 - meta["split"]
    assert attrs["fingerprint"] != build_zarr.fingerprint(meta, instances)
    assert not layout.partial_path(demo_store).exists()
    assert not (demo_store / build_zarr.STAGING).exists()
    assert not (demo_store / build_zarr.RECORDS).exists()


def test_window_reads_equal_the_decoded_png(demo_store):
    group = layout.open_store(demo_store)
    meta = layout.read_meta(group)
    rng = np.random.default_rng(0)
    for row, image in enumerate(_rows(demo_store)):
        full = _decode(image)
        h, w = full.shape[:2]
        side_y, side_x = (int(min(s, rng.integers(200, 801))) for s in (h, w))
        y, x = int(rng.integers(0, h - side_y + 1)), int(rng.integers(0, w - side_x + 1))
        window = group[layout.image_path(row, 0)][y:y + side_y, x:x + side_x]
        np.testing.assert_array_equal(window, full[y:y + side_y, x:x + side_x])
        if row % 6 == 0:  # the slower full-image checks on a sample of rows
            np.testing.assert_array_equal(group[layout.ela_path(row, 0)][...], compute_ela(full))
            if meta["label"][row]:
                masks = np.load(_mask_file(image))
                np.testing.assert_array_equal(group[layout.instances_mask_path(row)][...], masks)
                np.testing.assert_array_equal(group[layout.mask_path(row, 0)][...],
                                              masks.max(axis=0))


def test_pyramid_levels_are_2x2_means(demo_store):
    group = layout.open_store(demo_store)
    meta = layout.read_meta(group)
    row = int(np.argmax(meta["height"].astype(int) * meta["width"] * meta["label"]))
    levels = layout.level_count(int(meta["height"][row]), int(meta["width"][row]))
    assert levels >= 2
    for level in range(1, levels):
        prev = group[layout.image_path(row, level - 1)][...].astype(np.float64)
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        expected = prev[:2 * h, :2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
        got = group[layout.image_path(row, level)][...]
        assert got.shape == (h, w, 3)
        assert np.abs(got - expected).max() <= 0.5 + 1e-9
        prev_mask = group[layout.mask_path(row, level - 1)][...]
        np.testing.assert_array_equal(group[layout.mask_path(row, level)][...],
                                      prev_mask[:2 * h:2, :2 * w:2])
    assert layout.image_path(row, levels) not in group


def test_conversion_of_16_bit_grey_and_alpha():
    grey16 = np.array([[0, 128, 129, 257 * 7, 65535]], np.uint16)
    np.testing.assert_array_equal(to_rgb8(grey16)[0, :, 0], [0, 0, 1, 7, 255])
    bgra = np.zeros((1, 2, 4), np.uint8)
    bgra[0, 0] = (10, 20, 30, 255)   # opaque: unchanged, BGR -> RGB
    bgra[0, 1] = (10, 20, 30, 0)     # transparent: white
    np.testing.assert_array_equal(to_rgb8(bgra)[0], [[30, 20, 10], [255, 255, 255]])


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


@pytest.mark.parametrize("pixel_layout", [layout.DEFAULT_LAYOUT, layout.LEGACY_LAYOUT],
                         ids=["default", "legacy"])
def test_direct_writes_equal_what_zarr_writes(tmp_path, pixel_layout):
    """create_pixels encodes arrays itself; zarr-python, writing the same
    pixels with the same codecs, must give the same metadata and the same
    chunk bytes (a shard's chunks may lie in another order: zarr's is
    Morton order, ours C order), and read ours back equal, locally and
    through a memory store."""
    local = zarr.open_group(str(tmp_path / "local.zarr"), mode="w")
    memory = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    reference = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    for path, data in _pixels_to_write():
        for group in (local, memory):
            layout.create_pixels(group, path, data, pixel_layout)
            np.testing.assert_array_equal(group[path][...], data)
            np.testing.assert_array_equal(WindowReader(group).read_array(path), data)
        chunks = pixel_layout.chunk_shape(path, data.shape)
        grid = pixel_layout.grid_shape(path, data.shape)
        written = reference.create_array(path, shape=data.shape, dtype=np.uint8, chunks=chunks,
                                         shards=grid if pixel_layout.sharded else None,
                                         compressors=pixel_layout.compressors(), fill_value=0,
                                         chunk_key_encoding={"name": "default",
                                                             "separator": pixel_layout.separator},
                                         config={"write_empty_chunks": False})
        written[...] = data
        ours = {k: v.to_bytes() for k, v in memory.store._store_dict.items() if k.startswith(f"{path}/")}
        theirs = {k: v.to_bytes() for k, v in reference.store._store_dict.items()
                  if k.startswith(f"{path}/")}
        doc = json.loads(ours.pop(f"{path}/zarr.json"))
        assert doc.pop("attributes") == ({} if pixel_layout.sharded or layout.keeps_every_chunk(path)
                                         else doc_written_chunks(ours, path))
        reference_doc = json.loads(theirs.pop(f"{path}/zarr.json"))
        reference_doc.pop("attributes")
        assert doc == reference_doc, path
        if pixel_layout.sharded:
            count = int(np.prod([g // c for g, c in zip(grid, chunks)]))
            assert ours.keys() == theirs.keys() == {pixel_layout.key(path, (0,) * data.ndim)}
            key = next(iter(ours))
            assert _shard_chunks(ours[key], count) == _shard_chunks(theirs[key], count), path
            assert None in _shard_chunks(ours[key], count), "all-zero chunks are left out"
        else:
            if layout.keeps_every_chunk(path):
                assert ours == theirs, path
            else:   # zarr writes every non-zero chunk; ours too, over the mask's bounding box
                assert ours == {k: v for k, v in theirs.items() if k in ours} and \
                    ours.keys() == theirs.keys(), path
        local_files = {k.relative_to(tmp_path / "local.zarr").as_posix(): k.read_bytes()
                       for k in (tmp_path / "local.zarr" / path).rglob("*") if k.is_file()}
        assert local_files == {k: v.to_bytes() for k, v in memory.store._store_dict.items()
                               if k.startswith(f"{path}/")}, "local and memory writes alike"
    for parent in ("images", "images/0", "masks", "masks/0", "instances_mask"):
        assert json.loads((tmp_path / "local.zarr" / parent / "zarr.json").read_text()) == \
            json.loads(reference.store._store_dict[f"{parent}/zarr.json"].to_bytes())


def doc_written_chunks(chunk_files: dict, path: str) -> dict:
    """The written_chunks attribute an unsharded mask must carry: every chunk file written."""
    return {layout.WRITTEN_CHUNKS: sorted([int(i) for i in k[len(path) + 3:].split(layout.LEGACY_LAYOUT.separator)]
                                          for k in chunk_files)}


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


# ---------------------------------------------------------------- resume

def _walk(group):
    yield from group.arrays()
    for name, sub in group.groups():
        for path, arr in _walk(sub):
            yield f"{name}/{path}", arr


def _assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    attrs_a, attrs_b = ga.attrs.asdict(), gb.attrs.asdict()
    # every build has its own id (the read cache's key), whatever it holds
    assert attrs_a.pop(layout.BUILD_ID) != attrs_b.pop(layout.BUILD_ID)
    assert attrs_a == attrs_b
    arrays_a = {path: arr[...] for path, arr in _walk(ga)}
    arrays_b = {path: arr[...] for path, arr in _walk(gb)}
    assert sorted(arrays_a) == sorted(arrays_b)
    for path in arrays_a:
        np.testing.assert_array_equal(arrays_a[path], arrays_b[path], err_msg=path)
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b


def test_kill_9_then_rerun_gives_the_uninterrupted_store(demo_source, demo_store, tmp_path):
    out = tmp_path / "store.zarr"
    records = layout.partial_path(out) / build_zarr.RECORDS
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "preprocess/build_zarr.py"), "--source", str(demo_source),
         "--out", str(out), "--workers", "2", "--no-figure"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: the kill takes the workers too
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_dir() and len(list(records.glob("*.json"))) >= 12:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and layout.partial_path(out).exists()
    with pytest.raises(layout.StoreError, match="did not finish"):
        layout.open_store(out)
    done_before = len(list(records.glob("*.json")))
    report = build_store(demo_source, out, workers=2, progress=False, figure=False)
    assert report is not None and done_before >= 12
    _assert_same_store(out, demo_store)


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
                 "zstd", "--codec-level", "3", "--workers", "1", "--no-figure"]) == 0
    group = layout.open_store(out)
    assert group.attrs["layout"] == {"chunk": 128, "codec": "zstd", "level": 3, "sharded": True}
    doc = json.loads((out / layout.image_path(0) / "zarr.json").read_text())
    assert doc["codecs"][0]["configuration"]["chunk_shape"] == [128, 128, 3]
    assert [c["name"] for c in doc["codecs"][0]["configuration"]["codecs"]] == ["bytes", "zstd", "crc32c"]
    default = layout.open_store(demo_store)
    meta = layout.read_meta(group)
    assert group.attrs["fingerprint"] == default.attrs["fingerprint"]
    for row in range(len(meta["label"])):   # same pixels, another layout
        np.testing.assert_array_equal(WindowReader(out).read_array(layout.image_path(row)),
                                      WindowReader(demo_store).read_array(layout.image_path(row)))
    with pytest.raises(SystemExit):
        main(["--source", str(demo_source), "--out", str(tmp_path / "bad.zarr"), "--codec", "lz4",
              "--codec-level", "12"])
    assert "level 12: lz4 takes 0 to 9" in capsys.readouterr().err
