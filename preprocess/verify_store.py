"""Check a whole forgery store: every chunk of every pixel array, and meta/.

    python preprocess/verify_store.py STORE

Every shard of every image, ELA and mask array is read: its index checked
against its CRC-32C, then every chunk it stores compared with its CRC-32C
and decoded, as the engine's reader does (engine/reader.py); a shard an
array should have and has not is missing, and so is, in version 2's
unsharded layout, a chunk file an array should have (see engine/store.py).
Every meta/ and instances/ array is read with its checksum checked, then
meta/ is checked against the arrays present: every row has its image and
ELA levels of the right shapes, forged rows have their masks and instance
masks, authentic rows none, and nothing else is there; meta/ and
instances/ must still match the store's fingerprint. Any other file (one
that is no part of the layout engine/store.py describes) is reported as
unknown.

Each problem is printed on its own line, starting with the path of the chunk,
array or meta/ at fault. Exit status: 0 clean, 1 damaged (then rebuild the
store, as the last line says), 2 when STORE is not a store this engine reads
(nothing there, an unfinished build, another format or version).
"""
from __future__ import annotations

import argparse
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


def check_pixels(reader: WindowReader, meta: dict, progress: bool) -> tuple[set[str], list[str]]:
    """The shard objects the store should have (packing.shard_blocks), and
    every problem of its pixels: each shard's index and every tile it
    stores, read back; image and ELA tiles that are not stored; then each
    row's level-0 pixels and instance layers against its meta/digest."""
    pixel_layout = reader.pixel_layout
    shards = packing.shard_blocks(meta["tile_start"], meta["label"], meta["n_instances"],
                                  pixel_layout.shard_tiles)
    expected = {layout.tiles_shard_key(kind, level, int(block), pixel_layout)
                for (kind, level), blocks in shards.items() for block in blocks}
    problems = []
    for (kind, level), blocks in tqdm(sorted(shards.items()), desc="verify tiles", unit="array",
                                      disable=None if progress else True):   # None: only on a terminal
        required = (packing.stored_tiles(meta["tile_start"], meta["height"], meta["width"],
                                         pixel_layout.chunk, level)
                    if kind in ("image", "ela") else np.zeros(0, np.int64))
        problems += [f"{exc.where}: {exc.problem}"
                     for exc in reader.check_tiles(kind, level, blocks, required)]
    if problems:   # the digests would only repeat what is damaged
        return expected, problems
    for row in tqdm(range(len(meta["label"])), desc="verify digests", unit="img",
                    disable=None if progress else True):
        image = reader.read_array(layout.image_path(row))
        layers = reader.read_instances(row)
        digest = layout.content_digest(image, np.stack(layers) if layers else None)
        if digest != meta["digest"][row].tobytes():
            problems.append(f"{reader.storage.where(layout.image_path(row))}: row {row}'s pixels "
                            "do not match its meta/digest (tiles or shards swapped or replaced)")
    return expected, problems


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
