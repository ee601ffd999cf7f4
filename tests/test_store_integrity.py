"""Damaged stores are refused, never read as zeros or wrong pixels: a deleted,
bit-flipped or truncated shard (its chunks or its index), or chunk file of
the unsharded layout, stops the loader's window reads, predict's and
score's whole-array reads, and verify_store lists it; a clean store verifies
clean and an old store version names the rebuild command."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine import store as layout
from engine.reader import WindowReader
from preprocess import verify_store
from preprocess.build_zarr import build_store
from trainers.predict import store_cases
from trainers.score import true_instances

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def meta(demo_store):
    return layout.read_meta(layout.open_store(demo_store))


@pytest.fixture(scope="module")
def rows(meta):
    """(an authentic row, a forged row) of the demo store."""
    return int(np.argmin(meta["label"])), int(np.argmax(meta["label"]))


@pytest.fixture
def copy(demo_store, tmp_path):
    """A private copy of the demo store, to damage."""
    out = tmp_path / "store.zarr"
    shutil.copytree(demo_store, out)
    return out


@pytest.fixture(scope="module")
def legacy_store(demo_source, tmp_path_factory):
    """The demo built in version 2's layout (unsharded chunk files), which
    the reader still reads (benchmarks compare against it)."""
    out = tmp_path_factory.mktemp("legacy") / "store.zarr"
    build_store(demo_source, out, workers=2, progress=False, figure=False,
                pixel_layout=layout.LEGACY_LAYOUT)
    return out


def _shard_index(store: Path, path: str) -> tuple[Path, np.ndarray, int]:
    """Array `path`'s shard file, its index as (offset, size) rows in C
    order of the chunks, and the index's length in bytes, parsed here from
    zarr's sharding spec rather than through the reader."""
    doc = json.loads((store / path / "zarr.json").read_text())
    shard = doc["chunk_grid"]["configuration"]["chunk_shape"]
    inner = doc["codecs"][0]["configuration"]["chunk_shape"]
    count = int(np.prod([s // c for s, c in zip(shard, inner)]))
    file = store / layout.DEFAULT_LAYOUT.key(path, (0,) * len(shard))
    data = file.read_bytes()
    return file, np.frombuffer(data[-(16 * count + 4):-4], "<u8").reshape(-1, 2), 16 * count + 4


def _first_chunk(store: Path, path: str) -> tuple[Path, int, int, tuple[int, ...]]:
    """The shard file, offset and size of the first chunk array `path`
    stores, and the pixel position of that chunk."""
    file, table, _ = _shard_index(store, path)
    k = int(np.flatnonzero(table[:, 0] != layout.INDEX_EMPTY)[0])
    doc = json.loads((store / path / "zarr.json").read_text())
    shard = doc["chunk_grid"]["configuration"]["chunk_shape"]
    inner = doc["codecs"][0]["configuration"]["chunk_shape"]
    index = np.unravel_index(k, [s // c for s, c in zip(shard, inner)])
    return file, int(table[k, 0]), int(table[k, 1]), tuple(int(i * c) for i, c in zip(index, inner))


def _flip_at(file: Path, position: int) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= 0x10
    file.write_bytes(bytes(data))


def _truncate(file: Path, keep: float) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


INDEX = "corrupt shard index (crc32c checksum mismatch or a truncated file)"
CHUNK = "corrupt chunk (crc32c checksum mismatch"
DAMAGE = {  # name: (what to do to a shard, given its first chunk's offset and size; what the reader says)
    "deleted": (lambda f, o, n, i: f.unlink(), "shard missing"),
    "a chunk's first byte flipped": (lambda f, o, n, i: _flip_at(f, o), CHUNK),
    "a chunk's middle byte flipped": (lambda f, o, n, i: _flip_at(f, o + n // 2), CHUNK),
    "a chunk's checksum flipped": (lambda f, o, n, i: _flip_at(f, o + n - 4), CHUNK),
    "the index flipped": (lambda f, o, n, i: _flip_at(f, -i), INDEX),
    "the index's checksum flipped": (lambda f, o, n, i: _flip_at(f, -1), INDEX),
    "truncated to half": (lambda f, o, n, i: _truncate(f, 0.5), INDEX),
    "truncated to nothing": (lambda f, o, n, i: _truncate(f, 0), INDEX),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_read_path_refuses_a_damaged_shard(copy, meta, rows, kind):
    damage, says = DAMAGE[kind]
    authentic, forged = rows
    paths = {"image": layout.image_path(authentic), "mask": layout.mask_path(forged),
             "instance": layout.instances_mask_path(forged)}
    firsts = {name: _first_chunk(copy, path) for name, path in paths.items()}
    for name, (file, offset, size, _) in firsts.items():
        damage(file, offset, size, _shard_index(copy, paths[name])[2])

    def refused(name):
        where = f"{firsts[name][0]}: {says}"
        return pytest.raises(layout.StoreDamaged, match=f"^{re.escape(where)}")

    with refused("image"):   # the loader's path
        y, x = firsts["image"][3][:2]
        WindowReader(copy).read(authentic, (y, x, y + 8, x + 8), 8)
    with refused("mask"):
        y, x = firsts["mask"][3][:2]
        WindowReader(copy).read(forged, (y, x, y + 8, x + 8), 8)
    with refused("image"):   # predict and evaluate
        next(store_cases(copy, np.array([authentic]), with_ela=False))
    with refused("instance"):   # score --write-solution and evaluate
        true_instances(layout.open_store(copy), forged)
    problems = sorted(verify_store.verify(copy, progress=False))
    assert [p.split(": ", 1)[0] for p in problems] == sorted(str(f) for f, *_ in firsts.values())
    assert all(p.split(": ", 1)[1].startswith(says) for p in problems), problems


def test_the_shard_index_skips_all_zero_chunks_and_zarr_reads_them_as_zero(demo_store, meta):
    """Masks (and any all-zero image chunk) store only their non-zero
    chunks; the index marks the others empty and zarr-python reads them as
    0 like the reader does."""
    group, reader = layout.open_store(demo_store), WindowReader(demo_store)
    left_out = 0
    for row in np.flatnonzero(meta["label"]):
        path = layout.mask_path(int(row))
        _, table, _ = _shard_index(demo_store, path)
        left_out += int((table[:, 0] == layout.INDEX_EMPTY).sum())
        np.testing.assert_array_equal(reader.read_array(path), group[path][...])
    assert left_out > 0, "the demo's masks should have all-zero chunks left out"


def _first_written(store: Path, path: str) -> str:
    """Key of the first chunk an unsharded mask array wrote."""
    attrs = json.loads((store / path / "zarr.json").read_text())["attributes"]
    return layout.chunk_key(path, attrs[layout.WRITTEN_CHUNKS][0])


def _flip(position: int):
    return lambda file: _flip_at(file, position)


LEGACY_DAMAGE = {  # name: (what to do to an unsharded chunk file, what the reader must say)
    "deleted": (Path.unlink, "chunk missing"),
    "flipped first byte": (_flip(0), CHUNK),
    "flipped middle byte": (lambda f: _flip_at(f, f.stat().st_size // 2), CHUNK),
    "flipped checksum's first byte": (_flip(-4), CHUNK),
    "truncated to half": (lambda f: _truncate(f, 0.5), CHUNK),
    "truncated to nothing": (lambda f: _truncate(f, 0), "corrupt chunk (0 bytes, shorter than its 4-byte checksum)"),
}


@pytest.mark.parametrize("kind", LEGACY_DAMAGE)
def test_a_damaged_chunk_file_of_the_unsharded_layout_is_refused(legacy_store, tmp_path, rows, kind):
    copy = tmp_path / "legacy.zarr"
    shutil.copytree(legacy_store, copy)
    damage, says = LEGACY_DAMAGE[kind]
    authentic, forged = rows
    chunks = {"image": layout.chunk_key(layout.image_path(authentic), (0, 0, 0)),
              "mask": _first_written(copy, layout.mask_path(forged))}
    for key in chunks.values():
        damage(copy / key)

    def refused(name):
        return pytest.raises(layout.StoreDamaged, match=f"^{re.escape(f'{copy / chunks[name]}: {says}')}")

    with refused("image"):
        WindowReader(copy).read(authentic, (0, 0, 8, 8), 8)
    y, x = (i * layout.LEGACY_LAYOUT.chunk for i in map(int, chunks["mask"].split("/")[-2:]))
    with refused("mask"):
        WindowReader(copy).read(forged, (y, x, y + 8, x + 8), 8)
    problems = sorted(verify_store.verify(copy, progress=False))
    assert [p.split(": ", 1)[0] for p in problems] == sorted(str(copy / k) for k in chunks.values())


def test_a_legacy_layout_store_reads_as_zarr_does_and_verifies_clean(legacy_store, meta):
    group, reader = layout.open_store(legacy_store), WindowReader(legacy_store)
    for path in list(verify_store.expected_arrays(meta))[:40]:
        np.testing.assert_array_equal(reader.read_array(path), group[path][...], err_msg=path)
    assert verify_store.verify(legacy_store, progress=False) == []


def test_an_unsharded_mask_chunk_missing_from_its_written_list_is_reported(legacy_store, tmp_path, rows):
    copy = tmp_path / "legacy.zarr"
    shutil.copytree(legacy_store, copy)
    _, forged = rows
    path = layout.mask_path(forged)
    doc = json.loads((copy / path / "zarr.json").read_text())
    unlisted = doc["attributes"][layout.WRITTEN_CHUNKS].pop(0)
    (copy / path / "zarr.json").write_text(json.dumps(doc))
    assert verify_store.verify(copy, progress=False) == [
        f"{copy / layout.chunk_key(path, unlisted)}: chunk not listed in written_chunks"]


def test_a_clean_store_verifies_clean(demo_store, capsys):
    assert verify_store.main([str(demo_store)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{demo_store}: clean" and not err


def test_verify_lists_every_inconsistency_with_meta(copy, meta, rows):
    authentic, forged = rows
    levels = layout.level_count(int(meta["height"][forged]), int(meta["width"][forged]))
    shutil.rmtree(copy / layout.mask_path(forged, levels - 1))                  # a level lost
    shutil.copytree(copy / layout.instances_mask_path(forged),                  # masks of an
                    copy / layout.instances_mask_path(authentic))               # authentic row
    stray = copy / layout.image_path(forged) / "c.9.9.0"
    stray.write_bytes(b"left behind")                                           # not in the grid
    ela = copy / layout.ela_path(authentic) / "zarr.json"
    doc = json.loads(ela.read_text())
    inner = doc["codecs"][0]["configuration"]
    inner["codecs"] = inner["codecs"][:2]                                       # checksum dropped
    ela.write_text(json.dumps(doc))
    image = copy / layout.image_path(authentic, 0) / "zarr.json"
    doc = json.loads(image.read_text())
    doc["shape"][0] += 1                                                        # wrong shape
    image.write_text(json.dumps(doc))
    instances = copy / layout.instances_mask_path(forged) / "zarr.json"
    doc = json.loads(instances.read_text())
    doc["codecs"][0]["configuration"]["index_location"] = "start"               # index elsewhere
    instances.write_text(json.dumps(doc))
    group = zarr.open_group(str(copy), mode="r+")
    group["meta/split"][0] = 1 - int(group["meta/split"][0])                    # meta/ edited
    assert sorted(verify_store.verify(copy, progress=False)) == sorted([
        f"{copy / layout.mask_path(forged, levels - 1)}: array missing (meta/ lists its row and level)",
        f"{copy / layout.instances_mask_path(authentic)}: unexpected array (meta/ has no such row "
        "or level, or the row is authentic)",
        f"{stray}: unexpected file: not a chunk of the array's grid",
        f"{ela}: codecs bytes, blosc, expected bytes, then zstd, blosc or nothing, then crc32c",
        f"{instances}: shards other than sharding_indexed with the index (bytes, crc32c) at the end",
        f"{image}: shape {(int(meta['height'][authentic]) + 1, int(meta['width'][authentic]), 3)}, "
        f"expected {(int(meta['height'][authentic]), int(meta['width'][authentic]), 3)} from meta/",
        f"{copy / 'meta'}: meta/ and instances/ no longer match the store's fingerprint "
        "(damaged or changed after the build)",
    ])


def test_instance_layers_must_match_meta(copy, meta, rows):
    _, forged = rows
    count = int(meta["n_instances"][forged])
    zarr.open_group(str(copy), mode="r+")["meta/n_instances"][forged] = count + 1
    with pytest.raises(layout.StoreDamaged, match=f"{count} instance layers, meta/n_instances "
                       f"says {count + 1}"):
        true_instances(layout.open_store(copy), forged)


TABLE_DAMAGE = {   # name: (what to do to a meta/ or instances/ chunk file, what the message says)
    "a byte flipped": (lambda f: _flip_at(f, len(f.read_bytes()) // 2), "corrupt chunk"),
    "its checksum flipped": (_flip(-1), "corrupt chunk"),
    "truncated to half": (lambda f: _truncate(f, 0.5), "corrupt chunk"),
    "deleted": (Path.unlink, "chunk missing"),
}


@pytest.mark.parametrize("kind", TABLE_DAMAGE)
def test_a_damaged_meta_array_is_refused_naming_it(copy, rows, kind):
    """meta/label as training, score --write-solution and prediction read it
    (read_meta), meta/n_instances as a scorer reads one row of it, and
    instances/ as the patch bank and verify read them: each refused with
    StoreDamaged naming the chunk, never read as other values."""
    damage, says = TABLE_DAMAGE[kind]
    chunks = {name: copy / name / "c" / "0" for name in ("meta/label", "meta/n_instances")}
    chunks["instances/bbox"] = copy / "instances/bbox/c/0/0"
    for file in chunks.values():
        damage(file)

    def refused(name):
        return pytest.raises(layout.StoreDamaged, match=f"^{re.escape(f'{chunks[name]}: {says}')}")

    with refused("meta/label"):
        layout.read_meta(layout.open_store(copy))
    with refused("meta/label"):
        WindowReader(copy).read(rows[1], (0, 0, 8, 8), 8)
    with refused("meta/n_instances"):
        true_instances(layout.open_store(copy), rows[1])
    with refused("instances/bbox"):
        layout.read_instance_tables(layout.open_store(copy))
    problems = verify_store.verify(copy, progress=False)
    assert problems[0].startswith(f"{chunks['meta/label']}: {says}"), problems


def test_verify_reports_unknown_files(copy, rows):
    """Files that are no part of the layout, wherever they are; files inside
    a pixel array are the array check's (test_verify_lists_every_inconsistency_with_meta)."""
    authentic, _ = rows
    strays = [copy / "notes.txt", copy / "meta" / "label" / "extra", copy / "meta" / "old" / "zarr.json",
              copy / layout.image_path(authentic).rsplit("/", 1)[0] / "thumbnail.png",
              copy / "images" / "99999" / "0" / "c.0.0.0", copy / "scratch" / "a" / "b"]
    for stray in strays:
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(b"left behind")
    assert sorted(verify_store.verify(copy, progress=False)) == sorted(
        f"{stray}: unknown file (no part of the store's layout)" for stray in strays)


def test_verify_cli_exit_codes(copy, rows, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "preprocess/verify_store.py", *map(str, args)],
                              cwd=REPO, capture_output=True, text=True)
    nothing = run(tmp_path / "nowhere.zarr")
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: ") and "no store" in nothing.stderr
    shard = copy / layout.DEFAULT_LAYOUT.key(layout.image_path(rows[0]), (0, 0, 0))
    shard.unlink()
    damaged = run(copy)
    assert damaged.returncode == 1
    assert damaged.stdout.splitlines() == [f"{shard}: shard missing"]
    assert f"--out {copy} --overwrite" in damaged.stderr


def test_an_old_store_version_names_the_rebuild(copy, demo_source):
    """Version 3, before meta/ had checksums, is refused like any older one."""
    root = copy / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["version"] = 3
    root.write_text(json.dumps(doc))
    expected = (f"{copy}: store version 3, this engine reads version {layout.VERSION} (checksums "
                f"on every chunk, meta/ included); rebuild it with `python "
                f"preprocess/build_zarr.py --source {demo_source.resolve()} --out {copy} --overwrite`")
    with pytest.raises(layout.StoreError) as refused:
        WindowReader(copy).read_array(layout.image_path(0))
    assert str(refused.value) == expected
    assert verify_store.main([str(copy)]) == 2
