"""Check a whole forgery store: every tile of every packed tiles array, and meta/.

    python preprocess/verify_store.py STORE

Every meta/ and instances/ array is read with its checksum checked and
must still match the store's fingerprint. Then the packed tiles
(engine/packing.py): every shard object meta/ says the store has (one per
block of each tiles array the block's rows have tiles in) is read, its
index checked against its CRC-32C, then every tile it stores compared with
its CRC-32C and decoded, as the engine's reader does (engine/reader.py);
a shard missing, and an image or ELA tile meta/ places in it that it does
not store, are damage. With the tiles intact, each row's arrays (every
level's image, ELA and mask, and its instance layers) are read as meta/
and instances/ place them and
compared with the row's content digest (meta/digest), which catches a
shard swapped for another valid one and index entries swapped with their
checksum recomputed. Each tiles array's zarr.json must be the layout's
(what zarr-python reads the tiles by). Any other file (one that is no part
of the layout engine/store.py describes, a shard of a block past the
store's) is reported as unknown.

Each problem is printed on its own line, starting with the path of the
shard, array or meta/ at fault. Exit status: 0 clean, 1 damaged (then rebuild the
store, as the last line says), 2 when STORE is not a store this engine reads
(nothing there, an unfinished build, another format or version).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine import storage as storages
from engine import packing, store as layout
from engine.reader import WindowReader
from preprocess.build_zarr import fingerprint


def unknown_files(keys: list[str], expected: set[str]) -> list[str]:
    """The `keys` that are no file of the store's layout: neither one of
    engine.store.LAYOUT_KEYS nor an `expected` shard object (a shard
    object of a block past the store's is unknown too)."""
    return sorted(key for key in keys if key not in expected and
                  not (layout.LAYOUT_KEYS.fullmatch(key) and not layout.TILES_SHARD_KEY.fullmatch(key)))


def check_meta(group: zarr.Group, root: str) -> tuple[dict | None, list[str]]:
    """meta/ (None when unusable) and what is wrong with it and instances/."""
    try:
        meta = layout.read_meta(group)
        instances = layout.read_instance_tables(group)
    except layout.StoreDamaged as exc:
        return None, [f"{exc.where}: {exc.problem}"]
    except Exception as exc:  # zarr raises several types for undecodable metadata
        return None, [f"{root}/meta: unreadable ({type(exc).__name__}: {exc})"]
    rows = len(meta["label"])
    lengths = {name: len(arr) for name, arr in meta.items()}
    wrong = {name: n for name, n in lengths.items()
             if n != (rows + 1 if name == "instance_start" else rows)}
    if wrong:
        return None, [f"{root}/meta: array lengths disagree ({wrong}; meta/label has {rows})"]
    problems = []
    if fingerprint(meta, instances) != group.attrs.get("fingerprint"):
        problems.append(f"{root}/meta: meta/ and instances/ no longer match the store's "
                        "fingerprint (damaged or changed after the build)")
    return meta, problems


def check_tiles_metadata(storage, pixel_layout: layout.PixelLayout, meta: dict,
                         blocks: int) -> list[str]:
    """Each tiles array's zarr.json against the layout's
    (engine.store.tiles_array_json): the engine reads tiles by the root's
    layout alone, zarr-python by these. One for image, ELA and mask at
    every pyramid level a row has and one for instance layers, each shaped
    for at least the `blocks` blocks meta/ places tiles in."""
    levels = int((meta["tile_start"] >= 0).sum(axis=1).max(initial=0))
    problems = []
    for kind, level in [(kind, level) for kind in packing.LEVELED_KINDS for level in range(levels)] + \
            [("instance", 0)]:
        key = f"{layout.tiles_path(kind, level)}/zarr.json"
        where = storage.where(key)
        raw = storage.read(key)
        if raw is None:
            problems.append(f"{where}: array metadata missing")
            continue
        try:
            found = json.loads(raw)
            shape = found["shape"]
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"{where}: unreadable array metadata ({exc!r})")
            continue
        per_shard = layout.tiles_shard_tiles(kind, pixel_layout)
        if not (shape and isinstance(shape[0], int) and shape[0] % per_shard == 0
                and shape[0] >= blocks * per_shard):
            problems.append(f"{where}: shape {shape}, expected blocks of {per_shard} tiles, "
                            f"at least {blocks} of them (meta/'s)")
            continue
        expected = json.loads(layout.tiles_array_json(kind, pixel_layout, shape[0] // per_shard))
        differ = sorted(name for name in expected.keys() | found.keys()
                        if expected.get(name) != found.get(name))
        if differ:
            problems.append(f"{where}: {', '.join(differ)} other than the store's layout's "
                            f"({pixel_layout.describe()}): zarr-python would not read the tiles "
                            "as stored")
    return problems


def check_pixels(reader: WindowReader, meta: dict, progress: bool) -> tuple[set[str], list[str]]:
    """The shard objects the store should have (packing.shard_blocks), and
    every problem of its pixels: each shard's index and every tile it
    stores, read back; image and ELA tiles that are not stored; then each
    row's arrays (every level's image, ELA and mask, its instance layers)
    against its meta/digest; and
    the tiles arrays' metadata (check_tiles_metadata)."""
    pixel_layout = reader.pixel_layout
    shards = packing.shard_blocks(meta["tile_start"], meta["label"], meta["n_instances"],
                                  pixel_layout.shard_tiles)
    expected = {layout.tiles_shard_key(kind, level, int(block))
                for (kind, level), blocks in shards.items() for block in blocks}
    blocks = 1 + max((int(b.max()) for b in shards.values()), default=-1)
    metadata = check_tiles_metadata(reader.storage, pixel_layout, meta, blocks)
    problems = []
    for (kind, level), blocks in tqdm(sorted(shards.items()), desc="verify tiles", unit="array",
                                      disable=None if progress else True):   # None: only on a terminal
        required = (packing.stored_tiles(meta["tile_start"], meta["height"], meta["width"],
                                         pixel_layout.chunk, level)
                    if kind in ("image", "ela") else np.zeros(0, np.int64))
        problems += [f"{exc.where}: {exc.problem}"
                     for exc in reader.check_tiles(kind, level, blocks, required)]
    if problems:   # the digests would only repeat what is damaged
        return expected, problems + metadata
    for row in tqdm(range(len(meta["label"])), desc="verify digests", unit="img",
                    disable=None if progress else True):
        forged = bool(meta["label"][row])
        try:
            levels = [(reader.read_array(layout.image_path(row, level)),
                       reader.read_array(layout.ela_path(row, level)),
                       reader.read_array(layout.mask_path(row, level)) if forged else None)
                      for level in range(layout.level_count(int(meta["height"][row]),
                                                            int(meta["width"][row])))]
            layers = reader.read_instances(row)
        except layout.StoreDamaged as exc:   # tiles meta/ or instances/ places outside the shards checked
            problems.append(f"{exc.where}: {exc.problem} (row {row}'s tiles, where meta/ and "
                            "instances/ place them)")
            continue
        digest = layout.content_digest(levels, np.stack(layers) if layers else None)
        if digest != meta["digest"][row].tobytes():
            problems.append(f"{reader.storage.where(layout.image_path(row))}: row {row}'s pixels "
                            "do not match its meta/digest (tiles or shards swapped or replaced)")
    return expected, problems + metadata


def verify(store: Path | str, progress: bool = True,
           storage: storages.StorageSettings | None = None) -> list[str]:
    """Every problem of a complete store (a URL reached with `storage`), one
    line each, path first (empty when clean); StoreError when it is not a
    store this engine reads."""
    group = layout.open_store(store, storage=storage)
    meta, problems = check_meta(group, str(store))
    opened = storages.open_storage(store, storage=storage, generation=layout.build_id)
    expected = set()
    if meta is not None:
        reader = WindowReader(group, storage=storage)
        expected, found = check_pixels(reader, meta, progress)
        problems += found
    problems += [f"{opened.where(key)}: unknown file (no part of the store's layout)"
                 for key in unknown_files(opened.keys(""), expected)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("store", type=storages.location, help="the store to check (a path or a URL)")
    storages.add_arguments(parser, cache=False)
    args = parser.parse_args(argv)
    try:
        problems = verify(args.store, storage=storages.StorageSettings.from_args(args))
    except (layout.StoreError, storages.StorageUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(f"{args.store}: damaged ({len(problems)} problems); rebuild it with "
              f"`{layout.rebuild_command(args.store)}`", file=sys.stderr)
        return 1
    print(f"{args.store}: clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
