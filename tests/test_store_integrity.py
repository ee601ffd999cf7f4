"""Damaged stores are refused, never read as zeros or wrong pixels: a deleted,
bit-flipped or truncated shard of packed tiles (its tiles or its index)
stops the loader's window reads, predict's and score's whole-array reads
and the patch bank, and verify_store lists it; shards or tiles swapped for
other valid ones, which no read can tell, verify finds by the rows' content
digests; a clean store verifies clean, meta/ out of step with the tiles is
reported, and an old store version names the rebuild command."""
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
from engine.patch_bank import PatchBank
from engine.reader import WindowReader
from preprocess import verify_store
from trainers.predict import store_cases
from trainers.score import true_instances

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def copy(demo_store, tmp_path):
    """A private copy of the demo store (one block), to damage."""
    out = tmp_path / "store.zarr"
    shutil.copytree(demo_store, out)
    return out


@pytest.fixture
def blocks_copy(blocks_store, tmp_path):
    """A private copy of blocks_store (several blocks), to damage."""
    out = tmp_path / "blocks.zarr"
    shutil.copytree(blocks_store, out)
    return out


@pytest.fixture(scope="module")
def meta(demo_store):
    return layout.read_meta(layout.open_store(demo_store))


@pytest.fixture(scope="module")
def blocks_meta(blocks_store):
    return layout.read_meta(layout.open_store(blocks_store))


@pytest.fixture(scope="module")
def rows(meta):
    """(an authentic row, a forged row) of the demo store."""
    return int(np.argmin(meta["label"])), int(np.argmax(meta["label"]))


def _tiles_per_shard(store: Path, kind: str, level: int) -> int:
    doc = json.loads((store / f"tiles/{kind}/{level}/zarr.json").read_text())
    return doc["chunk_grid"]["configuration"]["chunk_shape"][0]


def _shard(store: Path, kind: str, level: int, tile: int) -> tuple[Path, int, int]:
    """(shard file, its tiles, position in it) of tile `tile` of tiles
    array (kind, level): zarr's default chunk keys with '.', a shard per
    block of tiles."""
    per_shard = _tiles_per_shard(store, kind, level)
    block, position = divmod(tile, per_shard)
    key = ".".join(["c", str(block)] + ["0"] * (3 if kind == "image" else 2))
    return store / f"tiles/{kind}/{level}" / key, per_shard, position


def _index(file: Path, per_shard: int) -> np.ndarray:
    """A shard's index, (offset, size) per tile, parsed here from zarr's
    sharding spec (uint64 pairs, then their CRC-32C, at the end)."""
    return np.frombuffer(file.read_bytes()[-(16 * per_shard + 4):-4], "<u8").reshape(per_shard, 2)


def _write_index(file: Path, table: np.ndarray) -> None:
    """Replace a shard's index by `table`, with its CRC-32C recomputed."""
    data = file.read_bytes()
    raw = np.ascontiguousarray(table, "<u8").tobytes()
    file.write_bytes(data[:-(len(raw) + 4)] + raw + layout.checksum_bytes(raw))


def _flip_at(file: Path, position: int) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= 0x10
    file.write_bytes(bytes(data))


def _truncate(file: Path, keep: float) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


def _flip(position: int):
    return lambda file: _flip_at(file, position)


INDEX = "corrupt shard index (crc32c checksum mismatch or a truncated file)"
CHUNK = "corrupt chunk (crc32c checksum mismatch"
# name: (what to do to a shard, given a tile's offset and size and the
# index's length in bytes; what the reader says)
DAMAGE = {
    "deleted": (lambda f, o, n, i: f.unlink(), "shard missing"),
    "a tile's first byte flipped": (lambda f, o, n, i: _flip_at(f, o), CHUNK),
    "a tile's middle byte flipped": (lambda f, o, n, i: _flip_at(f, o + n // 2), CHUNK),
    "a tile's checksum flipped": (lambda f, o, n, i: _flip_at(f, o + n - 4), CHUNK),
    "the index flipped": (lambda f, o, n, i: _flip_at(f, -i), INDEX),
    "the index's checksum flipped": (lambda f, o, n, i: _flip_at(f, -1), INDEX),
    "truncated to half": (lambda f, o, n, i: _truncate(f, 0.5), INDEX),
    "truncated to nothing": (lambda f, o, n, i: _truncate(f, 0), INDEX),
}


def _first_stored(store: Path, kind: str, level: int, start: int, height: int, width: int):
    """The first stored tile of the image array whose tiles begin at tile
    `start`: (shard file, its offset and size, the index's length in bytes,
    the tile's pixel position (y, x) in the array)."""
    file, per_shard, position = _shard(store, kind, level, start)
    table = _index(file, per_shard)
    side = json.loads((store / f"tiles/{kind}/{level}/zarr.json").read_text())["shape"][1]
    across = -(-width // side)
    count = across * -(-height // side)
    k = int(np.flatnonzero(table[position:position + count, 0] != layout.INDEX_EMPTY)[0])
    offset, size = (int(v) for v in table[position + k])
    return file, offset, size, 16 * per_shard + 4, (k // across * side, k % across * side)


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_read_path_refuses_a_damaged_shard(blocks_copy, blocks_meta, kind):
    """An authentic row's image shard and a forged row's mask and instance
    shards (another block's) damaged: each read path names the shard it met."""
    damage, says = DAMAGE[kind]
    meta, copy = blocks_meta, blocks_copy
    per_shard = _tiles_per_shard(copy, "image", 0)
    block = meta["tile_start"][:, 0] // per_shard
    authentic = int(np.flatnonzero(meta["label"] == 0)[0])
    forged = int(next(r for r in np.flatnonzero(meta["label"]) if block[r] != block[authentic]))
    size = {row: (int(meta["height"][row]), int(meta["width"][row])) for row in (authentic, forged)}
    instance_start = int(layout.read_table(layout.open_store(copy), "instances/tile_start")[
        meta["instance_start"][forged]])
    firsts = {"image": _first_stored(copy, "image", 0, int(meta["tile_start"][authentic, 0]),
                                     *size[authentic]),
              "mask": _first_stored(copy, "mask", 0, int(meta["tile_start"][forged, 0]), *size[forged]),
              "instance": _first_stored(copy, "instance", 0, instance_start, *size[forged])}
    assert len({file for file, *_ in firsts.values()}) == 3
    for file, offset, length, index_bytes, _ in firsts.values():
        damage(file, offset, length, index_bytes)

    def refused(name):
        where = f"{firsts[name][0]}: {says}"
        return pytest.raises(layout.StoreDamaged, match=f"^{re.escape(where)}")

    with refused("image"):   # the loader's path
        y, x = firsts["image"][4]
        WindowReader(copy).read(authentic, (y, x, y + 8, x + 8), 8)
    with refused("mask"):
        y, x = firsts["mask"][4]
        WindowReader(copy).read(forged, (y, x, y + 8, x + 8), 8)
    with refused("image"):   # predict and evaluate
        next(store_cases(copy, np.array([authentic]), with_ela=False))
    with refused("instance"):   # score --write-solution and evaluate
        true_instances(WindowReader(copy), forged)
    with refused("instance"):   # the copy-paste patch bank: each instance's bbox, every layer
        PatchBank.from_store(layout.open_store(copy), meta, [forged], min_side=1,
                             max_patches=100, padding=0, seed=0)
    problems = sorted(verify_store.verify(copy, progress=False))
    assert [p.split(": ", 1)[0] for p in problems] == sorted(str(f) for f, *_ in firsts.values())
    assert all(p.split(": ", 1)[1].startswith(says) for p in problems), problems


def _digest_problems(problems: list[str]) -> set[int]:
    """The rows verify says no longer match their meta/digest."""
    found = {int(m.group(1)) for p in problems
             if (m := re.search(r": row (\d+)'s pixels do not match its meta/digest", p))}
    assert len(found) == len(problems), problems
    return found


def _swap_same_tiles_shards(store: Path, meta: dict, kind: str) -> tuple[int, int]:
    """Exchange the level-0 shards of kind image or ELA of two blocks that
    store the same tiles (as many, from each shard's first on: every one
    of their rows'); returns the blocks."""
    side = layout.open_store(store).attrs["layout"]["chunk"]
    per_shard = _tiles_per_shard(store, kind, 0)
    tiles = (-(-meta["height"] // side)) * (-(-meta["width"] // side))
    used = np.bincount(meta["tile_start"][:, 0] // per_shard, weights=tiles).astype(int)
    pairs = [(a, b) for a in range(len(used)) for b in range(a + 1, len(used)) if used[a] == used[b]]
    assert pairs, f"blocks_store should have two blocks of the same tiles ({used.tolist()})"
    _swap(*(_shard(store, kind, 0, block * per_shard)[0] for block in pairs[0]))
    return pairs[0]


def _swap(one: Path, other: Path) -> None:
    data = one.read_bytes()
    one.write_bytes(other.read_bytes())
    other.write_bytes(data)


def test_two_valid_shards_swapped_are_found_by_the_digests(blocks_copy, blocks_store, blocks_meta):
    """Two blocks' level-0 image shards of the same tiles exchanged: every
    tile passes its checksum and each index its own, so the reader reads
    other pixels without a word; verify names every row of both blocks."""
    meta = blocks_meta
    block = meta["tile_start"][:, 0] // _tiles_per_shard(blocks_copy, "image", 0)
    a, b = _swap_same_tiles_shards(blocks_copy, meta, "image")
    swapped = np.flatnonzero((block == a) | (block == b)).tolist()
    reader, clean = WindowReader(blocks_copy), WindowReader(blocks_store)
    for row in swapped:   # the reader alone cannot tell
        assert not np.array_equal(reader.read_array(layout.image_path(row)),
                                  clean.read_array(layout.image_path(row)))
    assert _digest_problems(verify_store.verify(blocks_copy, progress=False)) == set(swapped)


def test_index_entries_swapped_with_the_checksum_recomputed_are_found_by_the_digests(
        blocks_copy, blocks_store, blocks_meta):
    """Two rows' image tiles exchanged inside one shard, its index's CRC-32C
    recomputed: a valid shard, read without a word; verify names both rows."""
    meta = blocks_meta
    per_shard = _tiles_per_shard(blocks_copy, "image", 0)
    block = meta["tile_start"][:, 0] // per_shard
    first = int(next(r for r in range(len(block) - 1) if block[r] == block[r + 1]))
    file, _, one = _shard(blocks_copy, "image", 0, int(meta["tile_start"][first, 0]))
    other = int(meta["tile_start"][first + 1, 0]) % per_shard
    table = _index(file, per_shard).copy()
    table[[one, other]] = table[[other, one]]
    _write_index(file, table)
    reader, clean = WindowReader(blocks_copy), WindowReader(blocks_store)
    for row in (first, first + 1):
        assert not np.array_equal(reader.read_array(layout.image_path(row)),
                                  clean.read_array(layout.image_path(row)))
    assert _digest_problems(verify_store.verify(blocks_copy, progress=False)) == {first, first + 1}


@pytest.mark.parametrize("kind", ["ela", "mask"])
def test_swapped_ela_or_mask_shards_are_found(blocks_copy, blocks_meta, kind):
    meta = blocks_meta
    if kind == "ela":
        _swap_same_tiles_shards(blocks_copy, meta, "ela")
    else:   # mask shards store only tiles not all 0: nothing says which must be there
        per_shard = _tiles_per_shard(blocks_copy, "mask", 0)
        a, b = np.unique(meta["tile_start"][meta["label"] > 0, 0] // per_shard)[:2].tolist()
        _swap(*(_shard(blocks_copy, "mask", 0, block * per_shard)[0] for block in (a, b)))
    assert verify_store.verify(blocks_copy, progress=False)


def test_verify_reads_a_shards_tiles_by_the_run_not_by_the_tile(blocks_store, blocks_meta):
    """Each shard checked costs its index and one request per run of up
    to CHECK_TILES stored tiles (adjacent in the shard), each tile decoded
    once: on object storage a request per tile would be the cost of verify."""
    from engine.reader import CHECK_TILES
    per_shard = _tiles_per_shard(blocks_store, "image", 0)
    assert per_shard <= CHECK_TILES
    blocks = np.unique(blocks_meta["tile_start"][:, 0] // per_shard)
    reader = WindowReader(blocks_store)
    assert reader.check_tiles("image", 0, blocks, np.zeros(0, np.int64)) == []
    stored = sum(int((_index(_shard(blocks_store, "image", 0, b * per_shard)[0], per_shard)[:, 0]
                      != layout.INDEX_EMPTY).sum()) for b in blocks.tolist())
    side = layout.open_store(blocks_store).attrs["layout"]["chunk"]
    assert reader.stats["requests"] == 2 * len(blocks)
    assert reader.stats["bytes_decoded"] == stored * side * side * 3


def test_verify_lists_every_damaged_tile_of_a_shard(blocks_copy):
    file, per_shard, _ = _shard(blocks_copy, "image", 0, 0)
    table = _index(file, per_shard)
    stored = np.flatnonzero(table[:, 0] != layout.INDEX_EMPTY)
    for k in (stored[0], stored[-1]):
        _flip_at(file, int(table[k, 0]) + int(table[k, 1]) // 2)
    problems = verify_store.verify(blocks_copy, progress=False)
    assert len(problems) == 2 and all(p.startswith(f"{file}: {CHUNK}") for p in problems), problems


def test_a_clean_store_verifies_clean(demo_store, blocks_store, capsys):
    assert verify_store.main([str(demo_store)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{demo_store}: clean" and not err
    assert verify_store.verify(blocks_store, progress=False) == []


def test_verify_reports_meta_out_of_step_with_the_tiles(blocks_copy, blocks_meta):
    """meta/tile_start rewritten (checksummed, so only the fingerprint and
    the tiles can tell) to send a row's level-0 tiles past the tiles its
    block holds: the fingerprint no longer matches, and the image and ELA
    tiles meta/ says are there are missing."""
    meta = blocks_meta
    side = layout.open_store(blocks_copy).attrs["layout"]["chunk"]
    per_shard = _tiles_per_shard(blocks_copy, "image", 0)
    block = meta["tile_start"][:, 0] // per_shard
    tiles = (-(-meta["height"] // side)) * (-(-meta["width"] // side))
    used = np.bincount(block, weights=tiles).astype(int)
    row = int(next(r for r in range(len(block)) if used[block[r]] + tiles[r] <= per_shard))
    moved = int(block[row]) * per_shard + int(used[block[row]])
    tile_start = meta["tile_start"].copy()
    tile_start[row, 0] = moved
    layout.create_table(zarr.open_group(str(blocks_copy), mode="r+"), "meta/tile_start", tile_start)
    assert sorted(verify_store.verify(blocks_copy, progress=False)) == sorted([
        f"{blocks_copy / 'meta'}: meta/ and instances/ no longer match the store's fingerprint "
        "(damaged or changed after the build)",
        *(f"{_shard(blocks_copy, kind, 0, moved)[0]}: {tiles[row]} tiles missing (tile {moved} first)"
          for kind in ("image", "ela")),
    ])


def test_verify_lists_instance_layers_placed_past_the_store(blocks_copy, blocks_meta):
    """instances/tile_start rewritten to place a layer in a block the store
    has not: listed with the row it belongs to, verify goes on."""
    group = zarr.open_group(str(blocks_copy), mode="r+")
    tile_start = layout.read_table(group, "instances/tile_start").copy()
    per_shard = _tiles_per_shard(blocks_copy, "instance", 0)
    tile_start[0] = (int(tile_start.max()) // per_shard + 1) * per_shard
    layout.create_table(group, "instances/tile_start", tile_start)
    row = int(layout.read_table(group, "instances/image_row")[0])
    assert sorted(verify_store.verify(blocks_copy, progress=False)) == sorted([
        f"{blocks_copy / 'meta'}: meta/ and instances/ no longer match the store's fingerprint "
        "(damaged or changed after the build)",
        f"{_shard(blocks_copy, 'instance', 0, int(tile_start[0]))[0]}: shard missing (row {row}'s "
        "tiles, where meta/ and instances/ place them)",
    ])


def test_verify_lists_tiles_metadata_other_than_the_layout(blocks_copy, blocks_meta):
    """zarr-python reads the tiles by each tiles array's zarr.json (the
    engine by the root's layout): one missing, without the tiles'
    checksum, with the index elsewhere, or too short for meta/'s blocks."""
    def edit(kind, level, change):
        file = blocks_copy / f"tiles/{kind}/{level}/zarr.json"
        doc = json.loads(file.read_text())
        change(doc)
        file.write_text(json.dumps(doc))
        return file

    def drop_checksum(doc):
        inner = doc["codecs"][0]["configuration"]
        inner["codecs"] = inner["codecs"][:-1]

    per_shard = _tiles_per_shard(blocks_copy, "image", 0)
    ela = edit("ela", 0, drop_checksum)
    instance = edit("instance", 0,
                    lambda doc: doc["codecs"][0]["configuration"].update(index_location="start"))
    image = edit("image", 0, lambda doc: doc["shape"].__setitem__(0, doc["shape"][0] - per_shard))
    shape = json.loads(image.read_text())["shape"]
    mask = blocks_copy / "tiles/mask/1/zarr.json"
    mask.unlink()
    blocks = int(blocks_meta["tile_start"][:, 0].max()) // per_shard + 1
    describe = layout.PixelLayout(**layout.open_store(blocks_copy).attrs["layout"]).describe()
    assert sorted(verify_store.verify(blocks_copy, progress=False)) == sorted([
        *(f"{file}: codecs other than the store's layout's ({describe}): zarr-python would not "
          "read the tiles as stored" for file in (ela, instance)),
        f"{image}: shape {shape}, expected blocks of {per_shard} tiles, at least {blocks} of them "
        "(meta/'s)",
        f"{mask}: array metadata missing",
    ])


def test_instance_layers_must_match_meta(copy, meta, rows):
    _, forged = rows
    count = int(meta["n_instances"][forged])
    zarr.open_group(str(copy), mode="r+")["meta/n_instances"][forged] = count + 1
    with pytest.raises(layout.StoreDamaged, match=f"{count} instance layers, meta/n_instances "
                       f"says {count + 1}"):
        true_instances(WindowReader(copy), forged)


TABLE_DAMAGE = {   # name: (what to do to a meta/ or instances/ chunk file, what the message says)
    "a byte flipped": (lambda f: _flip_at(f, len(f.read_bytes()) // 2), "corrupt chunk"),
    "its checksum flipped": (_flip(-1), "corrupt chunk"),
    "truncated to half": (lambda f: _truncate(f, 0.5), "corrupt chunk"),
    "deleted": (Path.unlink, "chunk missing"),
}


@pytest.mark.parametrize("kind", TABLE_DAMAGE)
def test_a_damaged_meta_array_is_refused_naming_it(copy, rows, kind):
    """meta/n_instances as a scorer's reader reads it (with all of meta/,
    once per node), instances/ as the patch bank and verify read them, then
    meta/label as training, score --write-solution and prediction read it
    (read_meta): each refused with StoreDamaged naming the chunk, never
    read as other values."""
    damage, says = TABLE_DAMAGE[kind]
    chunks = {name: copy / name / "c" / "0" for name in ("meta/label", "meta/n_instances")}
    chunks["instances/bbox"] = copy / "instances/bbox/c/0/0"

    def refused(name):
        return pytest.raises(layout.StoreDamaged, match=f"^{re.escape(f'{chunks[name]}: {says}')}")

    damage(chunks["meta/n_instances"])
    damage(chunks["instances/bbox"])
    with refused("meta/n_instances"):
        true_instances(WindowReader(copy), rows[1])
    with refused("instances/bbox"):
        layout.read_instance_tables(layout.open_store(copy))
    damage(chunks["meta/label"])
    with refused("meta/label"):
        layout.read_meta(layout.open_store(copy))
    with refused("meta/label"):
        WindowReader(copy).read(rows[1], (0, 0, 8, 8), 8)
    problems = verify_store.verify(copy, progress=False)
    assert problems[0].startswith(f"{chunks['meta/label']}: {says}"), problems


def test_verify_reports_unknown_files(blocks_copy, blocks_meta):
    """Files that are no part of the layout, wherever they are: beside the
    tables, under tiles/, a shard object of a block past the store's, and
    version 4's per-image arrays."""
    copy = blocks_copy
    blocks = int(blocks_meta["tile_start"][:, 0].max()) // _tiles_per_shard(copy, "image", 0) + 1
    strays = [copy / "notes.txt", copy / "meta" / "label" / "extra", copy / "meta" / "old" / "zarr.json",
              copy / "tiles" / "notes", copy / "tiles" / "image" / "0" / "thumbnail.png",
              copy / "tiles" / "depth" / "0" / "zarr.json",
              _shard(copy, "image", 0, blocks * _tiles_per_shard(copy, "image", 0))[0],
              copy / "images" / "0" / "0" / "c.0.0.0", copy / "scratch" / "a" / "b"]
    for stray in strays:
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(b"left behind")
    assert sorted(verify_store.verify(copy, progress=False)) == sorted(
        f"{stray}: unknown file (no part of the store's layout)" for stray in strays)


def test_verify_cli_exit_codes(copy, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "preprocess/verify_store.py", *map(str, args)],
                              cwd=REPO, capture_output=True, text=True)
    nothing = run(tmp_path / "nowhere.zarr")
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: ") and "no store" in nothing.stderr
    shard = _shard(copy, "image", 0, 0)[0]
    shard.unlink()
    damaged = run(copy)
    assert damaged.returncode == 1
    assert damaged.stdout.splitlines() == [f"{shard}: shard missing"]
    assert f"--out {copy} --overwrite" in damaged.stderr


def test_an_old_store_version_names_the_rebuild(copy, demo_source):
    """Version 4, a shard per image and array, is refused like any older one."""
    root = copy / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["version"] = 4
    root.write_text(json.dumps(doc))
    with pytest.raises(layout.StoreError) as refused:
        WindowReader(copy).read_array(layout.image_path(0))
    assert str(refused.value) == (
        f"{copy}: store version 4, this engine reads version {layout.VERSION} (every image's "
        f"tiles packed in shared shards, content digests in meta/); rebuild it with `python "
        f"preprocess/build_zarr.py --source {demo_source.resolve()} --out {copy} --overwrite`")
    assert verify_store.main([str(copy)]) == 2
