"""The forgery store: one Zarr v3 group, its layout and how to open it.

This module is the single place that names the store's arrays; the builder
(preprocess/build_zarr.py) writes through it and the engine reads through it.

Layout (docs/store.md describes it for readers of the store; every image
keeps its original resolution; `<row>` is the image's row in `meta/`, written
as a decimal integer):

    zarr.json                 attributes: format="forgery-store", version,
                              fingerprint, chunk, levels, build settings
    meta/<name>               1-D (or N x k) arrays of META_SCHEMA below, with
                              instance_start (N+1,) int64: instances of row r
                              are instances/*[instance_start[r]:instance_start[r+1]]
    instances/image_row       int32 (M,)  row in meta/ of each forged region
    instances/bbox            int32 (M, 4) y0, x0, y1, x1, half-open
    instances/area            int64 (M,)  pixels of the region
    images/<row>/<level>      uint8 (H_l, W_l, 3)  RGB; level 0 = original,
                              level l+1 = mean of each 2x2 block of level l
                              (H_l+1 = H_l // 2: an odd last row or column is
                              dropped, so level l pixel (y, x) covers level 0
                              pixels [y 2^l, (y+1) 2^l) exactly)
    masks/<row>/<level>       uint8 (H_l, W_l)  union of the instances, 0/1;
                              level l+1 = level l[0:2*(H_l//2):2, 0:2*(W_l//2):2]
                              (what a nearest-neighbour resize would pick)
    instances_mask/<row>      uint8 (N_inst, H, W)  every instance, 0/1
    ela/<row>/<level>         uint8 (H_l, W_l)  ELA (preprocess/ela.py);
                              levels as images
    mining/...                written by trainers/mining.py
    build_report.json         skipped files with reasons, timings

Authentic images have no masks/ or instances_mask/ entry. Chunks are
CHUNK x CHUNK pixels (all channels together), unsharded, encoded with the
codecs `bytes, zstd, crc32c` (CODECS): each chunk file is the zstd frame
followed by the CRC-32C of that frame, 4 bytes little-endian, so a flipped
byte or a truncated file is caught when the chunk is read. All-zero mask
chunks are not written (zarr's write_empty_chunks=False), so a mask costs
almost nothing where there is no forgery; each mask array lists the chunks it
did write in its attribute `written_chunks` (WRITTEN_CHUNKS), so a missing
mask chunk is told apart from an all-zero one. Image and ELA arrays keep
every chunk. A chunk that an array should have and has not, or one whose
checksum or size is wrong, is damage: engine/reader.py refuses it (naming
the chunk file) and `python preprocess/verify_store.py STORE` lists all of it.
Version 2 (VERSION) brought the checksums and written_chunks: open_store
refuses an older store with the command that rebuilds it.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
from pathlib import Path

import cv2
import google_crc32c
import numcodecs
import numpy as np
import zarr

from engine.recipes import SIZE_CLASS_EDGES

FORMAT = "forgery-store"
VERSION = 2   # 2: crc32c chunk checksums and masks' written_chunks (1 had neither)
DEFAULT_STORE = Path("data/store.zarr")

SPLITS = {"train": 0, "val": 1}   # meta/split values

# CHUNK and ZSTD_LEVEL by measurement (benchmarks/build_throughput.py
# --layout-sweep; figures in docs/performance.md, "Store"): 512 px chunks read
# random windows about as fast as 256 px ones and are written faster (fewer
# chunks); zstd 1 against 3 is slightly larger, reads alike, writes faster.
CHUNK = 512
ZSTD_LEVEL = 1
MIN_LEVEL_SIDE = 64   # no pyramid level whose short side would be below this
MAX_LEVELS = 6

META_SCHEMA = {
    # name: (dtype, trailing shape)
    "case_id": (str, ()),
    "label": (np.uint8, ()),
    "height": (np.int32, ()),
    "width": (np.int32, ()),
    "n_instances": (np.int16, ()),
    "area_ratio": (np.float32, ()),
    "bbox": (np.int32, (4,)),
    "centroid": (np.float32, (2,)),
    "size_class": (np.int8, ()),
    "split": (np.uint8, ()),
    "instance_start": (np.int64, ()),
}
INSTANCE_ARRAYS = ("image_row", "bbox", "area")   # instances/<name>, one entry per forged region


def size_class(area_ratio):
    """meta/size_class of forged area ratios (scalar or array): 1 tiny .. 5
    xlarge by recipes.SIZE_CLASS_EDGES, an edge belonging to the larger class.
    Authentic rows (area 0) get 0 from the caller, not from here."""
    return (1 + np.searchsorted(SIZE_CLASS_EDGES, area_ratio, side="right")).astype(np.int8)


class StoreError(RuntimeError):
    """A store that is missing, incomplete, of another format or version."""


def rebuild_command(store: str | os.PathLike) -> str:
    """The command that rebuilds `store` from the source folder its build
    settings (root attribute `build`) record; without --source the builder
    would write the demo over it, so an unknown source stays a placeholder."""
    try:
        source = json.loads((Path(store) / "zarr.json").read_text())["attributes"]["build"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        source = "SOURCE_FOLDER"
    return f"python preprocess/build_zarr.py --source {source} --out {store} --overwrite"


class StoreDamaged(StoreError):
    """A complete store missing a piece it should have (an array, a chunk) or
    holding a corrupt one; `where` is that piece's path."""

    def __init__(self, store: str | os.PathLike, where: str | os.PathLike, problem: str):
        self.where, self.problem = str(where), problem
        super().__init__(f"{where}: {problem}; the store is damaged: "
                         f"`python preprocess/verify_store.py {store}` lists all of the damage, "
                         f"`{rebuild_command(store)}` rebuilds it")


def partial_path(store: Path) -> Path:
    """Where a store is built before it is renamed into place."""
    return store.with_name(store.name + ".partial")


def image_path(row: int, level: int = 0) -> str:
    return f"images/{row}/{level}"


def mask_path(row: int, level: int = 0) -> str:
    return f"masks/{row}/{level}"


def ela_path(row: int, level: int = 0) -> str:
    return f"ela/{row}/{level}"


def instances_mask_path(row: int) -> str:
    return f"instances_mask/{row}"


def row_nodes(row: int) -> tuple[str, ...]:
    """Every node holding one row's pixels (absent ones are simply missing:
    authentic rows have no masks or instances_mask)."""
    return f"images/{row}", f"masks/{row}", f"ela/{row}", instances_mask_path(row)


def downsample_pixels(level: np.ndarray) -> np.ndarray:
    """Next pyramid level of an image or ELA level: 2x2 block means."""
    h, w = level.shape[0] // 2, level.shape[1] // 2
    return cv2.resize(level[:2 * h, :2 * w], (w, h), interpolation=cv2.INTER_AREA)


def downsample_mask(level: np.ndarray) -> np.ndarray:
    """Next pyramid level of a mask: every second pixel (nearest neighbour)."""
    h, w = level.shape[0] // 2, level.shape[1] // 2
    return np.ascontiguousarray(level[0:2 * h:2, 0:2 * w:2])


def level_count(height: int, width: int) -> int:
    """Number of pyramid levels for an image of this size (level 0 included)."""
    n, short = 1, min(height, width)
    while n < MAX_LEVELS and short // 2 >= MIN_LEVEL_SIDE:
        short //= 2
        n += 1
    return n


CODECS = ("bytes", "zstd", "crc32c")   # every pixel array's codec chain, as named in zarr.json
WRITTEN_CHUNKS = "written_chunks"       # mask arrays' attribute: indices of the chunks written
_ZSTD = numcodecs.Zstd(level=ZSTD_LEVEL)


def compressors():
    """zarr's bytes-to-bytes codecs of a pixel array: CODECS after `bytes`."""
    return zarr.codecs.ZstdCodec(level=ZSTD_LEVEL), zarr.codecs.Crc32cCodec()


def encode_chunk(piece: np.ndarray) -> bytes:
    """A chunk file's bytes, as zarr writes them with compressors(): the zstd
    frame, then its CRC-32C as 4 bytes little-endian."""
    frame = _ZSTD.encode(np.ascontiguousarray(piece))
    return frame + google_crc32c.value(frame).to_bytes(4, "little")


def pixel_chunks(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if path.startswith("instances_mask/"):
        return (1, CHUNK, CHUNK)
    return (CHUNK, CHUNK) + tuple(shape[2:])


def keeps_every_chunk(path: str) -> bool:
    """Images and ELA store every chunk; masks leave all-zero chunks out
    (they read as 0) and list the ones written (required_chunks)."""
    return path.startswith(("images/", "ela/"))


def required_chunks(path: str, attributes: dict) -> set[tuple[int, ...]] | None:
    """The chunk indices array `path` must have on disk: None for every chunk
    of its grid (images and ELA), else those its zarr.json attributes list as
    WRITTEN_CHUNKS (none without the list: any chunk may then be absent, as
    zarr leaves out all-fill chunks by default)."""
    if keeps_every_chunk(path):
        return None
    return {tuple(index) for index in attributes.get(WRITTEN_CHUNKS, ())}


def chunk_key(path: str, index) -> str:
    """Key of chunk `index` of array `path`: zarr v3's default encoding."""
    return "/".join((path, "c", *map(str, index)))


def create_pixels(group: zarr.Group, path: str, data: np.ndarray) -> None:
    """Write one pixel array (image, mask or ELA level) with the store's chunking.

    Images and ELA keep every chunk, so a missing chunk file means a damaged
    store. Masks are written only over the chunks that meet their non-zero
    bounding box (per layer for instances_mask) and all-zero chunks are left
    out: they read as the fill value 0, so a mask costs almost nothing where
    there is no forgery. The chunks a mask did write are listed in its
    WRITTEN_CHUNKS attribute (required_chunks): recording them cost nothing,
    where writing the all-zero chunks too would have added 28 % more files
    to the demo store (docs/performance.md, "Store").

    On a local store the array's zarr.json and its chunk files are written
    directly, byte for byte what zarr-python writes (tests/test_build_zarr.py):
    its per-array and per-chunk asyncio overhead cost the builder more than
    compressing the pixels. Any other store goes through zarr.
    """
    chunks = pixel_chunks(path, data.shape)
    keep_empty = keeps_every_chunk(path)
    if keep_empty:
        regions = [(tuple(slice(0, n) for n in data.shape), data)]
    elif path.startswith("instances_mask/"):
        regions = [((slice(i, i + 1),) + r, layer[r][None])
                   for i, layer in enumerate(data) if (r := _nonzero_chunks(layer)) is not None]
    else:
        regions = [(r, data[r]) for r in [_nonzero_chunks(data)] if r is not None]
    pieces = [(index, piece) for region, block in regions
              for index, piece in _chunk_pieces(chunks, region, block)
              if keep_empty or piece.any()]
    attributes = {} if keep_empty else {WRITTEN_CHUNKS: [list(index) for index, _ in pieces]}
    if not isinstance(group.store, zarr.storage.LocalStore):
        arr = group.create_array(path, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                 compressors=compressors(), fill_value=0, overwrite=True,
                                 attributes=attributes, config={"write_empty_chunks": keep_empty})
        for region, block in regions:
            arr[region] = block
        return
    root = Path(group.store.root) / group.path
    _write_array_json(root / path, path, data.shape, data.dtype, chunks, attributes)
    _write_chunk_files(root, path, chunks, pieces)


@functools.cache
def _array_json(dtype: str, ndim: int) -> str:
    """zarr-python's metadata document for a pixel array of this dtype and
    rank, as JSON; shape and chunk shape are filled in per array."""
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=(1,) * ndim, dtype=dtype,
                            chunks=(1,) * ndim, compressors=compressors(), fill_value=0)
    return json.dumps(arr.metadata.to_dict())


_GROUP_JSON = {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def _write_array_json(node: Path, path: str, shape, dtype, chunks, attributes: dict) -> None:
    """The array's zarr.json (replacing any node there) and a group
    zarr.json in each missing parent folder up to the group holding it."""
    shutil.rmtree(node, ignore_errors=True)
    parent = node
    for _ in range(path.count("/")):
        parent = parent.parent
        if not (parent / "zarr.json").exists():
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "zarr.json").write_text(json.dumps(_GROUP_JSON, indent=2))
    doc = json.loads(_array_json(np.dtype(dtype).name, len(shape)))
    doc["shape"] = list(shape)
    doc["chunk_grid"]["configuration"]["chunk_shape"] = list(chunks)
    doc["attributes"] = attributes
    node.mkdir(parents=True)
    (node / "zarr.json").write_text(json.dumps(doc, indent=2))


def _chunk_pieces(chunks: tuple[int, ...], region: tuple[slice, ...], block: np.ndarray):
    """(index, pixels) of each chunk of `region`, which starts on chunk
    boundaries and ends on them or at the array's edge (edge pieces are
    smaller than a chunk)."""
    for index in itertools.product(*(range(r.start // c, -(-r.stop // c))
                                     for r, c in zip(region, chunks))):
        yield index, block[tuple(slice(i * c - r.start, (i + 1) * c - r.start)
                                 for i, c, r in zip(index, chunks, region))]


def _write_chunk_files(root: Path, path: str, chunks: tuple[int, ...], pieces) -> None:
    """Encode (encode_chunk) and write chunk files of array `path` under
    `root` from its (index, pixels) pieces."""
    made = set()
    for index, piece in pieces:
        if piece.shape != chunks:  # edge chunks are stored full size, padded with the fill value
            padded = np.zeros(chunks, piece.dtype)
            padded[tuple(slice(0, n) for n in piece.shape)] = piece
            piece = padded
        file = root / chunk_key(path, index)
        if file.parent not in made:
            file.parent.mkdir(parents=True, exist_ok=True)
            made.add(file.parent)
        file.write_bytes(encode_chunk(piece))


def _nonzero_chunks(plane: np.ndarray) -> tuple[slice, slice] | None:
    """The smallest chunk-aligned window holding every non-zero pixel."""
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if len(rows) == 0:
        return None
    return tuple(slice(lo // CHUNK * CHUNK, min(n, -(-(hi + 1) // CHUNK) * CHUNK))
                 for lo, hi, n in ((rows[0], rows[-1], plane.shape[0]),
                                   (cols[0], cols[-1], plane.shape[1])))


def open_store(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    """Open a complete forgery store, or raise StoreError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            raise StoreError(f"{path}: its build did not finish ({partial_path(path)} "
                             "holds the work so far); rerun build_zarr to resume it")
        raise StoreError(
            f"{path}: no store here; build one with `python preprocess/build_zarr.py`"
        )
    try:
        group = zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for "not a group"
        raise StoreError(f"{path}: not a Zarr v3 group ({exc})") from None
    attrs = group.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise StoreError(
            f"{path}: format is {attrs.get('format')!r}, expected {FORMAT!r}"
        )
    if attrs.get("version") != VERSION:
        raise StoreError(
            f"{path}: store version {attrs.get('version')!r}, this engine reads version "
            f"{VERSION} (chunk checksums); rebuild it with "
            f"`{rebuild_command(path)}`"
        )
    return group


def read_meta(group: zarr.Group) -> dict[str, np.ndarray]:
    """All meta/ arrays as numpy arrays (small: a few bytes per image)."""
    missing = [name for name in META_SCHEMA if f"meta/{name}" not in group]
    if missing:
        root = getattr(group.store, "root", group.store)
        raise StoreDamaged(root, Path(str(root)) / "meta" / missing[0],
                           f"missing ({len(missing)} of meta/'s {len(META_SCHEMA)} arrays are)")
    return {name: np.asarray(group[f"meta/{name}"][...]) for name in META_SCHEMA}


MINING_KINDS = ("hard_negative", "hard_fn")


def mining_path(kind: str) -> str:
    """Group of one mining result: arrays `score` float32 (N,) and `flag`
    uint8 (N,) over all meta/ rows, attribute `checkpoint` (the sha256 of the
    checkpoint that produced them), written last so a result without it is
    incomplete and ignored."""
    if kind not in MINING_KINDS:
        raise ValueError(f"unknown mining kind {kind!r}; known: {MINING_KINDS}")
    return f"mining/{kind}"


def read_mining(group: zarr.Group, kind: str) -> dict | None:
    """A complete mining result {"score", "flag", "checkpoint"}, or None."""
    path = mining_path(kind)
    if path not in group:
        return None
    sub = group[path]
    checkpoint = sub.attrs.get("checkpoint")
    if not checkpoint:
        return None
    return {"score": np.asarray(sub["score"][...]), "flag": np.asarray(sub["flag"][...]).astype(bool),
            "checkpoint": checkpoint}
