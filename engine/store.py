"""The forgery store: one Zarr v3 group, its layout and how to open it.

This module is the single place that names the store's arrays; the builder
(preprocess/build_zarr.py) writes through it and the engine reads through it.
It is the layout layer, on top of engine/storage.py's bytes: it opens a
store's bytes there (open_storage, storage_of) and never the other way
round; storage errors that users meet as store errors (StorageUnavailable)
become them here (StoreUnreachable). The read cache keeps a store's bytes
per build: build_id is the generation that open_storage's cache is given.

Layout (docs/store.md describes it for readers of the store; every image
keeps its original resolution):

    zarr.json                 attributes: format="forgery-store", version,
                              fingerprint, build_id (new at every build, kept
                              by an append), layout, levels, build settings
    meta/<name>               1-D (or N x k) arrays of META_SCHEMA below, a row
                              per image, with instance_start (N+1,) int64:
                              instances of row r are
                              instances/*[instance_start[r]:instance_start[r+1]],
                              tile_start (N, MAX_LEVELS): where its tiles are,
                              digest (N, 32): content_digest
                              (meta/ and instances/: one chunk per array,
                              zstd then CRC-32C, checked at every read)
    instances/<name>          INSTANCE_ARRAYS, one entry per forged region
    tiles/<kind>/<level>      every image's pixels as packed tiles
                              (engine/packing.py): kind image (RGB), ela and
                              mask (the union, 0/1) at each pyramid level,
                              instance (each layer, 0/1) at level 0; level l+1
                              of an image = mean of each 2x2 block of level l
                              (H_l+1 = H_l // 2: an odd last row or column is
                              dropped, so level l pixel (y, x) covers level 0
                              pixels [y 2^l, (y+1) 2^l) exactly), of a mask
                              level l[0::2, 0::2] (what a nearest-neighbour
                              resize would pick)
    mining/...                written by trainers/mining.py
    build_report.json         skipped files with reasons, timings

The engine names one image's arrays by path (image_path, mask_path,
ela_path, instances_mask_path): in a packed store views of its tiles
(packed_address), in version 4's per-image layout (PER_IMAGE_LAYOUT, which
only benchmarks synthesise now) arrays of their own. Tiles are written in a
PixelLayout (DEFAULT_LAYOUT, recorded in the root attribute `layout`):
square tiles, each compressed and followed by the CRC-32C of its frame, a
block's tiles of one array in one shard object with an index of their byte
ranges at its end (zarr's sharding_indexed codec), all-zero mask tiles left
out. A reader fetches a shard's index once and then only the tiles a window
touches. A shard a block should have and has not, an index or tile whose
checksum fails, is damage: engine/reader.py refuses it (naming the shard)
and `python preprocess/verify_store.py STORE` lists all of it, and the rows
whose arrays no longer match their digests. Version 5 (VERSION) brought the
packed tiles and the digests (4 checksums on meta/ and instances/ and the
build id, 3 the sharded layout): open_store refuses an older store with
the command that rebuilds it.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import google_crc32c
import numcodecs
import numpy as np
import zarr

from engine.recipes import SIZE_CLASS_EDGES
from engine import node_arrays, packing, storage as storages

FORMAT = "forgery-store"
# 5: packed tiles (engine/packing.py), content digests; 4: meta/ and
# instances/ checksummed, a build id; 3: sharded small chunks (PixelLayout);
# 2: crc32c checksums on pixel chunks; 1 had neither
VERSION = 5
DEFAULT_STORE = Path("data/store.zarr")

SPLITS = {"train": 0, "val": 1}   # meta/split values
VAL_FRACTION = 0.1                 # of the case ids split_of sends to val


def split_of(case_ids: np.ndarray, val_fraction: float = VAL_FRACTION) -> np.ndarray:
    """meta/split of each row (0 train, 1 val) from its case id alone: val
    when the first 8 bytes of sha256(case id), as a fraction of 2^64, are
    below `val_fraction`. Both images of a case id share it, and no row
    changes split when cases are added (an append), whatever the others."""
    limit = val_fraction * 2**64
    return np.array([int.from_bytes(hashlib.sha256(c.encode()).digest()[:8], "big") < limit
                     for c in case_ids.tolist()], np.uint8)

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
    # first tile of each pyramid level in tiles/<kind>/<level> (engine/packing.py), -1 absent
    "tile_start": (np.int64, (MAX_LEVELS,)),
    "digest": (np.uint8, (32,)),   # content_digest of every array of the row
}
# instances/<name>, one entry per forged region; tile_start: its layer's
# first tile in tiles/instance/0
INSTANCE_ARRAYS = ("image_row", "bbox", "area", "tile_start")


def size_class(area_ratio):
    """meta/size_class of forged area ratios (scalar or array): 1 tiny .. 5
    xlarge by recipes.SIZE_CLASS_EDGES, an edge belonging to the larger class.
    Authentic rows (area 0) get 0 from the caller, not from here."""
    return (1 + np.searchsorted(SIZE_CLASS_EDGES, area_ratio, side="right")).astype(np.int8)


class StoreError(RuntimeError):
    """A store that is missing, incomplete, of another format or version."""


class StoreUnreachable(StoreError, storages.StorageUnavailable):
    """A store URL that cannot be opened because its storage refuses the
    credentials or does not answer: a StoreError to the CLIs that open
    stores, and a StorageUnavailable to training, which keeps its steps and
    prints how to resume when it happens mid-run (a reader opens its store lazily)."""


def rebuild_command(store: str | os.PathLike) -> str:
    """The command that rebuilds `store` from the source folder its build
    settings (root attribute `build`) record; without --source the builder
    would write the demo over it, so an unknown source stays a placeholder."""
    try:
        root = storages.open_storage(store).read("zarr.json")
        source = json.loads(root)["attributes"]["build"]["source"]
    except Exception:   # for a message: whatever fails (no root, no storage) leaves the placeholder
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


REPORT = "build_report.json"   # skipped inputs and timings, beside the arrays
BUILD_LOCK = "build.lock"      # the lock object of a build to a URL (preprocess/build_zarr.py)
PIXEL_ARRAY_DEPTHS = {"images": 3, "masks": 3, "ela": 3, "instances_mask": 2}   # parts of a path


# an image's array (image_path and its siblings): the packed tiles' kind
PACKED_KINDS = {"images": "image", "masks": "mask", "ela": "ela", "instances_mask": "instance"}


def packed_address(path: str) -> tuple[str, int, int]:
    """(kind, row, level) of one image's array `path` (image_path, mask_path,
    ela_path, instances_mask_path), read out of tiles/<kind>/<level>."""
    parts = path.split("/")
    kind = PACKED_KINDS.get(parts[0])
    if kind is None or len(parts) != PIXEL_ARRAY_DEPTHS[parts[0]] or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"{path}: not an image's array (images/<row>/<level>, masks/..., ela/..., "
                         "instances_mask/<row>)")
    return kind, int(parts[1]), int(parts[2]) if len(parts) > 2 else 0


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


CODECS = ("zstd", "lz4", "lz4hc", "none")   # PixelLayout.codec: zstd, Blosc's LZ4 or LZ4HC, or raw
# Blosc's own threads would compete with the reader and build processes, one
# per core already, and measured up to 5x slower per chunk (docs/performance.md)
numcodecs.blosc.use_threads = False
INDEX_EMPTY = 2**64 - 1   # a shard index's offset and size of a chunk not stored
# of chunk (shard) keys: "." puts a shard's one object beside its array's
# zarr.json ("c.0.0.0"), sparing the three folders "/" would make per array,
# a measurable part of a build's time on a slow file system
# (docs/performance.md, "Store")
SEPARATOR = "."


@dataclass(frozen=True)
class PixelLayout:
    """How pixel arrays are chunked and encoded (docs/store.md, "Chunks").

    Square `chunk`-pixel chunks (all channels of a pixel in one chunk),
    compressed with `codec` at `level`, each followed by its CRC-32C, in
    shard objects: the chunks followed by an index of their offsets and
    sizes (zarr's sharding_indexed codec, the index with its own CRC-32C),
    so small chunks cost no more objects and a reader fetches exactly the
    chunks a window needs by byte range; chunks whose pixels are all 0 are
    not stored (the index says so). `sharded` is always True (recorded in
    the root attribute `layout`, docs/store.md): version 2's unsharded
    layout, a file per chunk, is neither written nor read any more."""

    chunk: int
    codec: str = "zstd"
    level: int = 1
    sharded: bool = True
    # version 5's layout: every image's chunks (tiles) packed into shared
    # shards of shard_tiles tiles (engine/packing.py); else an array per image
    packed: bool = True
    shard_tiles: int = 2048

    def __post_init__(self):
        if not self.sharded:
            raise ValueError("sharded False: version 2's unsharded layout, which this engine "
                             "neither writes nor reads")
        if self.shard_tiles < 1:
            raise ValueError(f"shard_tiles {self.shard_tiles}: at least 1")
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r}: one of {', '.join(CODECS)}")
        if self.chunk < 16:
            raise ValueError(f"chunk {self.chunk}: at least 16 pixels")
        levels = range(-7, 23) if self.codec == "zstd" else range(0, 10)
        if self.codec != "none" and self.level not in levels:
            raise ValueError(f"level {self.level}: {self.codec} takes {levels.start} to {levels.stop - 1}")

    def describe(self) -> str:
        codec = "raw" if self.codec == "none" else f"{self.codec} {self.level}"
        packing = f"packed, {self.shard_tiles} tiles a shard" if self.packed else "a shard per array"
        return f"{self.chunk} px chunks, {codec}, {packing}"

    def compressors(self) -> tuple:
        """zarr's bytes-to-bytes codecs of one chunk, in zarr.json's order."""
        if self.codec == "none":
            return (zarr.codecs.Crc32cCodec(),)
        codec = (zarr.codecs.ZstdCodec(level=self.level) if self.codec == "zstd" else
                 zarr.codecs.BloscCodec(cname=self.codec, clevel=self.level, shuffle="noshuffle",
                                        typesize=1))
        return codec, zarr.codecs.Crc32cCodec()

    @functools.cached_property
    def _compressor(self):
        if self.codec == "none":
            return None
        if self.codec == "zstd":
            return numcodecs.Zstd(level=self.level)
        return numcodecs.Blosc(cname=self.codec, clevel=self.level, shuffle=numcodecs.Blosc.NOSHUFFLE)

    def encode(self, piece: np.ndarray) -> bytes:
        """One chunk's stored bytes, as zarr writes them with compressors():
        the compressed frame, then its CRC-32C, 4 bytes little-endian."""
        raw = np.ascontiguousarray(piece)
        frame = raw.tobytes() if self._compressor is None else self._compressor.encode(raw)
        return frame + checksum_bytes(frame)

    def chunk_shape(self, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The chunk shape of pixel array `path` of this shape."""
        if path.startswith("instances_mask/"):
            return (1, self.chunk, self.chunk)
        return (self.chunk, self.chunk) + tuple(shape[2:])

    def key(self, path: str, index) -> str:
        """Key of shard `index` of pixel array `path` in this layout."""
        return chunk_key(path, index)

    def grid_shape(self, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a per-image array's objects (zarr's chunk grid): one
        shard covering the whole array in whole chunks."""
        chunks = self.chunk_shape(path, shape)
        return tuple(-(-s // c) * c for s, c in zip(shape, chunks))


def checksum_bytes(data: bytes) -> bytes:
    """CRC-32C of `data` as zarr's crc32c codec appends it."""
    return google_crc32c.value(data).to_bytes(4, "little")


# DEFAULT_LAYOUT by measurement (benchmarks/layout_sweep.py on the realistic
# store; docs/performance.md, "Store"): 256 px chunks decode a third fewer
# bytes per sample than 512 px ones, where 128 px ones pay more per chunk
# than they save; LZ4 decodes about twice as fast as zstd for 1.5x the
# bytes and writes as fast; LZ4HC and raw chunks read faster still but
# write 2.5x slower or take 3-5x the disk; sharding keeps small chunks from
# costing more objects.
DEFAULT_LAYOUT = PixelLayout(chunk=256, codec="lz4", level=9)
# Version 4's layout, an array (one shard object) per image and level: what
# benchmarks/scale.py measures the packed layout against
PER_IMAGE_LAYOUT = PixelLayout(chunk=256, codec="lz4", level=9, packed=False)


def chunk_key(path: str, index) -> str:
    """Key of shard `index` of pixel or tiles array `path`: zarr v3's
    default encoding with SEPARATOR."""
    return f"{path}/c{SEPARATOR}{SEPARATOR.join(map(str, index))}"


def create_pixels(group: zarr.Group, path: str, data: np.ndarray,
                  pixel_layout: PixelLayout = PER_IMAGE_LAYOUT) -> None:
    """Write one pixel array (image, mask or ELA level) in `pixel_layout`
    as version 4's per-image layout (PER_IMAGE_LAYOUT) has it, one shard
    object per array, replacing any array there.

    The array's zarr.json and its shard are encoded here and written
    through the group's storage (engine/storage.py): the metadata and the
    chunk bytes zarr-python writes for the same pixels, a shard's chunks in
    C order where zarr puts them in Morton order (tests/test_build_zarr.py);
    zarr-python's per-array and per-chunk asyncio overhead cost the builder
    more than compressing the pixels.
    """
    storage = storages.storage_of(group)
    prefix = f"{group.path}/{path}" if group.path else path
    chunks = pixel_layout.chunk_shape(path, data.shape)
    storage.remove(prefix)
    _write_group_parents(storage, prefix)
    storage.write(pixel_layout.key(prefix, (0,) * data.ndim), encode_shard(data, chunks, pixel_layout))
    doc = json.loads(_array_json(pixel_layout, data.dtype.name, data.ndim))
    doc["shape"] = list(data.shape)
    doc["chunk_grid"]["configuration"]["chunk_shape"] = list(pixel_layout.grid_shape(path, data.shape))
    doc["codecs"][0]["configuration"]["chunk_shape"] = list(chunks)
    doc["attributes"] = {}
    storage.write(f"{prefix}/zarr.json", json.dumps(doc).encode())


def encode_shard(data: np.ndarray, chunks: tuple[int, ...], pixel_layout: PixelLayout) -> bytes:
    """One shard holding all of `data`: its non-zero chunks encoded in C
    order (so a window's chunks along a row are one byte range), then the
    index of (offset, size) per chunk, INDEX_EMPTY for the ones left out,
    uint64 little-endian, then the index's CRC-32C (zarr's index_codecs
    bytes, crc32c; index_location end)."""
    grid = tuple(-(-s // c) for s, c in zip(data.shape, chunks))
    index = np.full(grid + (2,), INDEX_EMPTY, "<u8")
    parts, offset = [], 0
    for position in itertools.product(*map(range, grid)):
        piece = data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(position, chunks))]
        if not piece.any():
            continue
        encoded = pixel_layout.encode(_padded(piece, chunks))
        index[position] = offset, len(encoded)
        parts.append(encoded)
        offset += len(encoded)
    table = index.tobytes()
    return b"".join(parts + [table, checksum_bytes(table)])


def tiles_path(kind: str, level: int = 0) -> str:
    """The packed array of one kind's tiles at one pyramid level
    (engine/packing.py): kind image, ela or mask at every level, instance at 0."""
    if kind not in packing.KINDS or (kind == "instance" and level):
        raise ValueError(f"no tiles array of kind {kind!r} at level {level}")
    return f"tiles/{kind}/{level}"


def tiles_shard_tiles(kind: str, pixel_layout: PixelLayout) -> int:
    """Tiles per shard (one block's) of a kind's tiles arrays."""
    return (packing.instance_shard_tiles(pixel_layout.shard_tiles) if kind == "instance"
            else pixel_layout.shard_tiles)


def tiles_shard_key(kind: str, level: int, block: int) -> str:
    """The object of block `block`'s shard of tiles array (kind, level)."""
    return chunk_key(tiles_path(kind, level), (block, 0, 0) + (0,) * len(packing.KINDS[kind]))


def tiles_array_json(kind: str, pixel_layout: PixelLayout, n_blocks: int) -> bytes:
    """zarr.json of tiles array `kind` of a store of `n_blocks` blocks: what
    zarr-python writes for a uint8 array of (n_blocks x S, T, T[, 3]) in
    chunks of one tile and shards of S tiles, with the layout's codecs."""
    tile = (pixel_layout.chunk, pixel_layout.chunk) + packing.KINDS[kind]
    per_shard = tiles_shard_tiles(kind, pixel_layout)
    doc = json.loads(_array_json(pixel_layout, "uint8", 1 + len(tile)))
    doc["shape"] = [n_blocks * per_shard, *tile]
    doc["chunk_grid"]["configuration"]["chunk_shape"] = [per_shard, *tile]
    doc["codecs"][0]["configuration"]["chunk_shape"] = [1, *tile]
    return json.dumps(doc).encode()


def tiles_groups_json() -> dict[str, bytes]:
    """The zarr.json of each group above the tiles arrays (tiles/ and
    tiles/<kind>), by key: what makes them one zarr hierarchy."""
    return {"tiles/zarr.json": _GROUP_JSON} | {f"tiles/{kind}/zarr.json": _GROUP_JSON
                                               for kind in packing.KINDS}


def content_digest(levels, instances: np.ndarray | None) -> bytes:
    """meta/digest of a row: sha256 over every array the store holds of it
    (C order, each with its shape): each pyramid level's image, ELA and
    union mask (None for an authentic row), (image, ela, mask) per level
    in `levels`, then its instance layers. verify_store.py recomputes it
    from the tiles, so a shard of any array swapped for another valid one,
    or index entries swapped with their checksums, is caught."""
    digest = hashlib.sha256()
    for part in [array for level in levels for array in level] + [instances]:
        if part is not None:
            digest.update(repr(part.shape).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
    return digest.digest()


def _padded(piece: np.ndarray, chunks: tuple[int, ...]) -> np.ndarray:
    """Edge chunks are stored full size, padded with the fill value 0."""
    if piece.shape == chunks:
        return piece
    padded = np.zeros(chunks, piece.dtype)
    padded[tuple(slice(0, n) for n in piece.shape)] = piece
    return padded


@functools.cache
def _array_json(pixel_layout: PixelLayout, dtype: str, ndim: int) -> str:
    """zarr-python's metadata document for a pixel array of this layout,
    dtype and rank, as JSON; shapes are filled in per array."""
    ones = (1,) * ndim
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=ones, dtype=dtype, chunks=ones,
                            shards=ones, compressors=pixel_layout.compressors(), fill_value=0,
                            chunk_key_encoding={"name": "default", "separator": SEPARATOR})
    return json.dumps(arr.metadata.to_dict())


_GROUP_JSON = json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}).encode()


def _write_group_parents(storage, prefix: str) -> None:
    """A group zarr.json in each parent of `prefix` that has none, up to
    the storage's root."""
    parts = prefix.split("/")[:-1]
    for depth in range(len(parts), 0, -1):
        key = "/".join(parts[:depth]) + "/zarr.json"
        if storage.exists(key):
            break
        storage.write(key, _GROUP_JSON)


# the root attribute naming one build of a store, new at every build: the
# generation the read cache keeps the store's bytes under (build_id)
BUILD_ID = "build_id"
# root attributes a finished build writes last
COMPLETION = ("format", "version", "fingerprint", BUILD_ID)


def build_id(storage) -> str:
    """The BUILD_ID attribute of the root zarr.json in `storage` ("" when
    there is none, or no readable root): the generation of a store's bytes
    that engine/storage.py's read cache keeps them under (open_storage's
    `generation`), so a store rebuilt at the same URL is never served the
    old build's bytes."""
    try:
        found = json.loads(storage.read("zarr.json") or b"{}").get("attributes", {}).get(BUILD_ID, "")
    except (ValueError, AttributeError):
        return ""
    return found if isinstance(found, str) else ""


def open_store(path: str | os.PathLike, mode: str = "r",
               storage: storages.StorageSettings | None = None) -> zarr.Group:
    """Open a complete forgery store, a local path or a URL reached with
    `storage`'s settings, or raise StoreError saying what is wrong. Its
    bytes come from engine/storage.py's open_storage, once; all the rest
    (is it there, finished, of this format and version) is the layout's."""
    try:
        # uncached: the root and meta/ are read once, and the root names the
        # build whose bytes the reader's cache keeps (build_id)
        place = storages.open_storage(path, read_only=mode == "r",
                                      storage=replace(storage or storages.NO_SETTINGS, cache=None))
    except Exception as exc:   # a URL whose file system cannot be made (its options, its protocol)
        raise _open_error(path, exc) from None
    if isinstance(place, storages.LocalStorage):
        group = _open_local(place.root, mode)
    else:
        group = _open_url(place, mode)
    attrs = group.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise StoreError(
            f"{path}: format is {attrs.get('format')!r}, expected {FORMAT!r}"
        )
    if attrs.get("version") != VERSION:
        raise StoreError(
            f"{path}: store version {attrs.get('version')!r}, this engine reads version "
            f"{VERSION} (every image's tiles packed in shared shards, content digests in "
            f"meta/); rebuild it with "
            f"`{rebuild_command(path)}`"
        )
    return group


def _open_local(path: Path, mode: str) -> zarr.Group:
    if not path.exists():
        if partial_path(path).exists():
            raise StoreError(f"{path}: its build did not finish ({partial_path(path)} "
                             "holds the work so far); rerun build_zarr to resume it")
        raise StoreError(
            f"{path}: no store here; build one with `python preprocess/build_zarr.py`"
        )
    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for "not a group"
        raise StoreError(f"{path}: not a Zarr v3 group ({exc})") from None


def _open_url(place: storages.ZarrStorage, mode: str) -> zarr.Group:
    """A store on object storage has no rename: its build uploads the root
    zarr.json with the COMPLETION attributes last (preprocess/build_zarr.py),
    so a root without them is a build still running or killed."""
    url = place.where()
    try:
        root = place.read("zarr.json")
        if root is None:
            raise StoreError(f"{url}: no store here; build one with "
                             f"`python preprocess/build_zarr.py --out {url}`")
        if unfinished(json.loads(root).get("attributes", {})):
            raise StoreError(f"{url}: its build did not finish (its root zarr.json has no "
                             "fingerprint yet); rerun build_zarr to resume it")
        return zarr.open_group(place.store, mode=mode)
    except StoreError:
        raise
    except Exception as exc:
        raise _open_error(url, exc) from None


def _open_error(url: str | os.PathLike, exc: Exception) -> StoreError:
    """`exc`, raised by the storage of store `url` while opening it, as the
    store error users see: StoreUnreachable when the storage refuses the
    credentials or cannot be reached (engine/storage.py explained), else
    not a Zarr v3 group."""
    problem = storages.explained(str(url), exc)
    if problem:
        return StoreUnreachable(str(problem))
    return StoreError(f"{url}: not a Zarr v3 group ({exc})")


def unfinished(attributes: dict) -> bool:
    """Whether a root's attributes are those of a build still uploading
    (without the COMPLETION attributes); a root of another version is not:
    open_store refuses it by its version."""
    return attributes.get("version", VERSION) == VERSION and \
        not all(k in attributes for k in COMPLETION)


def table_compressors() -> tuple:
    """zarr's bytes-to-bytes codecs of the meta/ and instances/ arrays:
    zstd, then the CRC-32C of the frame (what pixel chunks carry too)."""
    return zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()


def create_table(group: zarr.Group, path: str, data: np.ndarray) -> None:
    """Write one meta/ or instances/ array: one chunk, checksummed, written
    even when it is all fill (a chunk missing is then damage, not zeros)."""
    dtype = str if data.dtype.kind == "T" else data.dtype  # str: variable-length UTF-8
    arr = group.create_array(path, shape=data.shape, dtype=dtype,
                             chunks=tuple(max(1, s) for s in data.shape),
                             compressors=table_compressors(), overwrite=True,
                             config={"write_empty_chunks": True})
    arr[...] = data


def read_table(group: zarr.Group, path: str, selection=Ellipsis) -> np.ndarray:
    """`selection` of a meta/ or instances/ array, its chunk's checksum
    verified (zarr's crc32c codec); StoreDamaged naming the array when it
    or its chunk is missing or fails its checksum."""
    storage = storages.storage_of(group)
    try:
        arr = group[path]
    except KeyError:
        raise StoreDamaged(storage.where(), storage.where(path), "array missing") from None
    chunk = f"{path}/{arr.metadata.encode_chunk_key((0,) * arr.ndim)}"
    if arr.size and not storage.exists(chunk):
        raise StoreDamaged(storage.where(), storage.where(chunk), "chunk missing")
    try:
        return np.asarray(arr[selection])
    except (ValueError, RuntimeError, TypeError) as exc:   # zarr's crc32c: ValueError; codecs: others
        raise StoreDamaged(storage.where(), storage.where(chunk),
                           f"corrupt chunk ({str(exc).split('.')[0]})") from None


def read_meta(group: zarr.Group) -> dict[str, np.ndarray]:
    """All meta/ arrays as numpy arrays (small: a few bytes per image), each
    checked (read_table)."""
    return {name: read_table(group, f"meta/{name}") for name in META_SCHEMA}


# the meta/ columns a node shares (shared_meta): every one but the case
# names and digests, which no loader or reader worker reads
SHARED_META = tuple(name for name, (dtype, _) in META_SCHEMA.items()
                    if dtype is not str and name != "digest")


def shared_meta(group: zarr.Group, storage: storages.StorageSettings | None = None,
                verify: bool = True) -> node_arrays.NodeArrays:
    """The SHARED_META columns of store `group`, with instances/tile_start
    as `instance_tile_start` (where the reader finds instance layers), read
    from the store once per node (read_table: every column checked) into the
    settings' node-local directory and memory-mapped
    (engine/node_arrays.py), in a folder named by the store's place, build
    id and fingerprint: a rebuilt store, a copy, or a store after an append
    (the same build id, more rows) gets its own columns."""
    root = (storage or storages.NO_SETTINGS).node_dir or node_arrays.default_dir()
    build = (group.attrs.get(BUILD_ID), group.attrs.get("fingerprint"),
             str(storages.storage_of(group).where()))
    folder = root / f"meta-{node_arrays.digest(*build)}"

    def columns():   # not read_meta: the case names and digests are most of meta/'s bytes
        return {**{name: read_table(group, f"meta/{name}") for name in SHARED_META},
                "instance_tile_start": read_table(group, "instances/tile_start")}

    return node_arrays.node_arrays(folder, columns, verify)


def read_instance_tables(group: zarr.Group) -> dict[str, np.ndarray]:
    """All instances/ arrays (INSTANCE_ARRAYS), each checked (read_table)."""
    return {name: read_table(group, f"instances/{name}") for name in INSTANCE_ARRAYS}


MINING_KINDS = ("hard_negative", "hard_fn")


def mining_path(kind: str) -> str:
    """Group of one mining result: arrays `score` float32 (N,) and `flag`
    uint8 (N,) over all meta/ rows, attribute `checkpoint` (the sha256 of the
    checkpoint that produced them), written last so a result without it is
    incomplete and ignored."""
    if kind not in MINING_KINDS:
        raise ValueError(f"unknown mining kind {kind!r}; known: {MINING_KINDS}")
    return f"mining/{kind}"


def mining_group(group: zarr.Group, mode: str = "r",
                 storage: storages.StorageSettings | None = None) -> zarr.Group | None:
    """The group holding store `group`'s mining results: the store itself,
    or with the settings' mining_dir (for a store that cannot be written: a
    read-only mount, a bucket without write permission), that local
    folder's group for the store's fingerprint (created for mode "w"; None
    for "r" when there is none yet)."""
    folder = (storage or storages.NO_SETTINGS).mining_dir
    if folder is None:
        return group
    path = Path(folder) / group.attrs["fingerprint"]
    if mode == "r" and not (path / "zarr.json").exists():
        return None
    return zarr.open_group(str(path), mode="r" if mode == "r" else "a")


def read_mining(group: zarr.Group, kind: str,
                storage: storages.StorageSettings | None = None) -> dict | None:
    """A complete mining result {"score", "flag", "checkpoint"} of store
    `group` (from mining_group), or None."""
    path = mining_path(kind)
    group = mining_group(group, storage=storage)
    if group is None:
        return None
    if path not in group:
        return None
    sub = group[path]
    checkpoint = sub.attrs.get("checkpoint")
    if not checkpoint:
        return None
    return {"score": np.asarray(sub["score"][...]), "flag": np.asarray(sub["flag"][...]).astype(bool),
            "checkpoint": checkpoint}


# a packed tiles array's shard object (tiles_shard_key)
TILES_SHARD_KEY = re.compile(r"tiles/(image/\d+/c\.\d+\.0\.0\.0|(ela|mask)/\d+/c\.\d+\.0\.0"
                             r"|instance/0/c\.\d+\.0\.0)")


def _layout_keys() -> re.Pattern:
    """Every key of the layout: the root's files, the groups' zarr.json, the
    tables' and mining results' metadata and chunks, the tiles arrays'
    zarr.json and shard objects (TILES_SHARD_KEY)."""
    def either(names):
        return "|".join(map(re.escape, names))
    table = r"(zarr\.json|c(/\d+)+)"
    tops = [*PIXEL_ARRAY_DEPTHS, "meta", "instances", "mining", "tiles"]
    return re.compile("|".join(f"({pattern})" for pattern in (
        rf"tiles/({either(packing.KINDS)})/zarr\.json",
        rf"tiles/({either(packing.KINDS)})/\d+/zarr\.json",
        TILES_SHARD_KEY.pattern,
        either(("zarr.json", REPORT, BUILD_LOCK)),
        rf"({either(tops)})/zarr\.json",
        rf"({either(p for p, d in PIXEL_ARRAY_DEPTHS.items() if d == 3)})/\d+/zarr\.json",
        rf"meta/({either(META_SCHEMA)})/{table}",
        rf"instances/({either(INSTANCE_ARRAYS)})/{table}",
        rf"mining/({either(MINING_KINDS)})/zarr\.json",
        rf"mining/({either(MINING_KINDS)})/(score|flag)/{table}",
    )))


LAYOUT_KEYS = _layout_keys()
