"""Damaged stores are refused, never read as zeros or wrong pixels: a deleted,
bit-flipped or truncated chunk stops the loader's window reads, predict's and
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


def _first_written(store: Path, path: str) -> str:
    """Key of the first chunk a mask array wrote (deleting it is damage)."""
    attrs = json.loads((store / path / "zarr.json").read_text())["attributes"]
    return layout.chunk_key(path, attrs[layout.WRITTEN_CHUNKS][0])


def _flip(position: int):
    def damage(file: Path) -> None:
        data = bytearray(file.read_bytes())
        data[position] ^= 0x10
        file.write_bytes(bytes(data))
    return damage


def _truncate(keep: float):
    def damage(file: Path) -> None:
        data = file.read_bytes()
        file.write_bytes(data[:int(len(data) * keep)])
    return damage


DAMAGE = {  # name: (what to do to a chunk file, what the reader must say)
    "deleted": (Path.unlink, "chunk missing"),
    "flipped first byte": (_flip(0), "corrupt chunk (crc32c checksum mismatch"),
    "flipped middle byte": (lambda f: _flip(f.stat().st_size // 2)(f),
                            "corrupt chunk (crc32c checksum mismatch"),
    "flipped checksum's first byte": (_flip(-4), "corrupt chunk (crc32c checksum mismatch"),
    "flipped last byte": (_flip(-1), "corrupt chunk (crc32c checksum mismatch"),
    "truncated to half": (_truncate(0.5), "corrupt chunk (crc32c checksum mismatch"),
    "truncated to nothing": (_truncate(0), "corrupt chunk (0 bytes, shorter than its 4-byte checksum)"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_read_path_refuses_a_damaged_chunk(copy, meta, rows, kind):
    damage, says = DAMAGE[kind]
    authentic, forged = rows
    chunks = {  # one damaged chunk per kind of array, each read by some path
        "image": layout.chunk_key(layout.image_path(authentic), (0, 0, 0)),
        "mask": _first_written(copy, layout.mask_path(forged)),
        "instance": _first_written(copy, layout.instances_mask_path(forged)),
    }
    for key in chunks.values():
        damage(copy / key)

    def refused(key):
        return pytest.raises(layout.StoreDamaged, match=f"^{re.escape(f'{copy / key}: {says}')}")

    with refused(chunks["image"]):   # the loader's path
        WindowReader(copy).read(authentic, (0, 0, 8, 8), 8)
    mask_index = [int(i) for i in chunks["mask"].split("/")[-2:]]
    y, x = (i * layout.CHUNK for i in mask_index)
    with refused(chunks["mask"]):
        WindowReader(copy).read(forged, (y, x, y + 8, x + 8), 8)
    with refused(chunks["image"]):   # predict and evaluate
        next(store_cases(copy, np.array([authentic]), with_ela=False))
    with refused(chunks["instance"]):   # score --write-solution and evaluate
        true_instances(layout.open_store(copy), forged)
    problems = sorted(verify_store.verify(copy, progress=False))
    assert [p.split(": ", 1)[0] for p in problems] == sorted(str(copy / k) for k in chunks.values())
    assert all(p.split(": ", 1)[1].startswith(says) for p in problems), problems


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
    stray = copy / layout.image_path(forged) / "c" / "9" / "9" / "0"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left behind")                                           # not in the grid
    ela = copy / layout.ela_path(authentic) / "zarr.json"
    doc = json.loads(ela.read_text())
    doc["codecs"] = doc["codecs"][:2]                                           # checksum dropped
    ela.write_text(json.dumps(doc))
    image = copy / layout.image_path(authentic, 0) / "zarr.json"
    doc = json.loads(image.read_text())
    doc["shape"][0] += 1                                                        # wrong shape
    image.write_text(json.dumps(doc))
    instances = copy / layout.instances_mask_path(forged) / "zarr.json"
    doc = json.loads(instances.read_text())
    del doc["attributes"][layout.WRITTEN_CHUNKS]                                # no chunk list
    instances.write_text(json.dumps(doc))
    group = zarr.open_group(str(copy), mode="r+")
    group["meta/split"][0] = 1 - int(group["meta/split"][0])                    # meta/ edited
    assert sorted(verify_store.verify(copy, progress=False)) == sorted([
        f"{copy / layout.mask_path(forged, levels - 1)}: array missing (meta/ lists its row and level)",
        f"{copy / layout.instances_mask_path(authentic)}: unexpected array (meta/ has no such row "
        "or level, or the row is authentic)",
        f"{stray}: unexpected file: not a chunk of the array's grid",
        f"{ela}: codecs bytes, zstd, expected bytes, zstd, crc32c",
        f"{instances}: mask array without its written_chunks attribute",
        f"{image}: shape {(int(meta['height'][authentic]) + 1, int(meta['width'][authentic]), 3)}, "
        f"expected {(int(meta['height'][authentic]), int(meta['width'][authentic]), 3)} from meta/",
        f"{copy / 'meta'}: meta/ and instances/ no longer match the store's fingerprint "
        "(damaged or changed after the build)",
    ])


def test_a_mask_chunk_missing_from_its_written_list_is_reported(copy, rows):
    _, forged = rows
    path = layout.mask_path(forged)
    doc = json.loads((copy / path / "zarr.json").read_text())
    unlisted = doc["attributes"][layout.WRITTEN_CHUNKS].pop(0)
    (copy / path / "zarr.json").write_text(json.dumps(doc))
    assert verify_store.verify(copy, progress=False) == [
        f"{copy / layout.chunk_key(path, unlisted)}: chunk not listed in written_chunks"]


def test_instance_layers_must_match_meta(copy, meta, rows):
    _, forged = rows
    path = copy / layout.instances_mask_path(forged) / "zarr.json"
    doc = json.loads(path.read_text())
    doc["shape"][0] += 1
    path.write_text(json.dumps(doc))
    with pytest.raises(layout.StoreDamaged, match=f"{meta['n_instances'][forged] + 1} instance "
                       f"layers, meta/n_instances says {meta['n_instances'][forged]}"):
        true_instances(layout.open_store(copy), forged)


def test_verify_cli_exit_codes(copy, rows, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "preprocess/verify_store.py", *map(str, args)],
                              cwd=REPO, capture_output=True, text=True)
    nothing = run(tmp_path / "nowhere.zarr")
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: ") and "no store" in nothing.stderr
    chunk = copy / layout.chunk_key(layout.image_path(rows[0]), (0, 0, 0))
    chunk.unlink()
    damaged = run(copy)
    assert damaged.returncode == 1
    assert damaged.stdout.splitlines() == [f"{chunk}: chunk missing"]
    assert f"--out {copy} --overwrite" in damaged.stderr


def test_an_old_store_version_names_the_rebuild(copy, demo_source):
    root = copy / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["version"] = 1
    root.write_text(json.dumps(doc))
    expected = (f"{copy}: store version 1, this engine reads version {layout.VERSION} (chunk "
                f"checksums); rebuild it with `python preprocess/build_zarr.py --source "
                f"{demo_source.resolve()} --out {copy} --overwrite`")
    with pytest.raises(layout.StoreError) as refused:
        WindowReader(copy).read_array(layout.image_path(0))
    assert str(refused.value) == expected
    assert verify_store.main([str(copy)]) == 2
