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
import zarr
from tqdm import tqdm

from engine import storage as storages
from engine import store as layout
from engine.reader import WindowReader
from preprocess.build_zarr import fingerprint


def expected_arrays(meta: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Path and shape of every pixel array meta/ says the store holds."""
    shapes = {}
    for row, (label, height, width, layers) in enumerate(zip(
            meta["label"], meta["height"].tolist(), meta["width"].tolist(),
            meta["n_instances"].tolist())):
        for level in range(layout.level_count(height, width)):
            side = (height >> level, width >> level)   # each level halves, rounding down
            shapes[layout.image_path(row, level)] = side + (3,)
            shapes[layout.ela_path(row, level)] = side
            if label:
                shapes[layout.mask_path(row, level)] = side
        if label:
            shapes[layout.instances_mask_path(row)] = (layers, height, width)
    return shapes


def stored_arrays(keys: list[str]) -> set[str]:
    """Paths of the pixel arrays among a store's `keys` (those with a zarr.json)."""
    return {array for key in keys
            if (array := layout.pixel_array_of(key)) and key == f"{array}/zarr.json"}


def unknown_files(keys: list[str], arrays: set[str]) -> list[str]:
    """The `keys` that are no file of the store's layout: neither one of
    engine.store.LAYOUT_KEYS nor inside one of the pixel `arrays` (whose
    own files the array checks look at)."""
    return sorted(key for key in keys if not layout.LAYOUT_KEYS.fullmatch(key)
                  and layout.pixel_array_of(key) not in arrays)


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


def verify(store: Path | str, progress: bool = True,
           storage: storages.StorageSettings | None = None) -> list[str]:
    """Every problem of a complete store (a URL reached with `storage`), one
    line each, path first (empty when clean); StoreError when it is not a
    store this engine reads."""
    group = layout.open_store(store, storage=storage)
    meta, problems = check_meta(group, str(store))
    opened = storages.open_storage(store, storage=storage, generation=layout.build_id)
    keys = opened.keys("")
    stored = stored_arrays(keys)
    if meta is None:   # without meta/, check the chunks of what is there
        expected = {path: None for path in stored}
    else:
        expected = expected_arrays(meta)
        problems += [f"{store}/{path}: array missing (meta/ lists its row and level)"
                     for path in sorted(expected.keys() - stored)]
        problems += [f"{store}/{path}: unexpected array (meta/ has no such row or level, "
                     "or the row is authentic)" for path in sorted(stored - expected.keys())]
    problems += [f"{opened.where(key)}: unknown file (no part of the store's layout)"
                 for key in unknown_files(keys, stored | expected.keys())]
    reader = WindowReader(store, storage=storage)
    for path in tqdm(sorted(stored & expected.keys()), desc="verify", unit="array",
                     disable=None if progress else True):   # None: only on a terminal
        problems += [f"{exc.where}: {exc.problem}"
                     for exc in reader.check_array(path, expected[path])]
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
