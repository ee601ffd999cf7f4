"""Window reads: fetch only the chunks of the store that a crop window touches.

For a window given in original-resolution pixels, the reader picks the
coarsest pyramid level that still has at least the output's resolution across
the window, reads the image (plus ELA when asked) and union-mask chunks that
the window touches at that level, and returns the covering pixel block with
the window's exact, fractional position inside it (DALI's resize takes a
fractional ROI, so no precision is lost to the level's integer grid).

Whole arrays are read the same way (read_array, read_instances): prediction,
scoring and evaluation read pixels through this reader too, so every read of
the store's pixels refuses damage alike.

Why a hand-written chunk path: zarr-python spends about 0.3 ms of Python and
asyncio per `__getitem__` before decoding (`benchmarks/build_throughput.py
--layout-sweep` times both paths; docs/performance.md, "Store"), several
times a sample's decode cost for small windows. Chunk files of the layout that
engine/store.py writes (regular chunks, default "/" key encoding, codecs
bytes, zstd, crc32c) are read and decoded directly: the CRC-32C of the zstd
frame is compared with the 4-byte trailer (google-crc32c, which zarr's own
crc32c codec uses), then numcodecs decompresses it; the pixels equal zarr's
(tests/test_reader.py). Checking the trailer costs about 3 % of a chunk's
zstd decode (docs/performance.md, "Store"). Zarr itself fills a missing chunk
with the fill value; this reader instead raises StoreDamaged naming the chunk
file for an image or ELA chunk, or a mask chunk its array lists as written
(engine.store.required_chunks), and for a chunk whose checksum or size is
wrong. An array with another layout is refused, not read some other way.
A store is a path on a local or shared file system, never a URL: open_store
and these chunk reads go to the file system (docs/store.md).
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import zarr

from engine import store as layout


@dataclass
class WindowBlock:
    """Pixels covering a window at one pyramid level."""

    image: np.ndarray        # uint8 (h, w, 3) RGB
    mask: np.ndarray         # uint8 (h, w, 1), 0/1 union mask
    ela: np.ndarray | None   # uint8 (h, w, 1) when asked for
    roi_start: np.ndarray    # float32 (2,): window's (y, x) start inside the block
    roi_end: np.ndarray      # float32 (2,): window's (y, x) end inside the block
    level: int
    scale: float             # block pixels per original pixel (1 at level 0)


class _ChunkFiles:
    """Direct reads of one local Zarr v3 array of bytes, zstd[, crc32c] codecs
    (benchmarks/build_throughput.py reads zstd-only arrays with it)."""

    _codec = numcodecs.Zstd()

    def __init__(self, root: Path, path: str, meta: dict):
        self.root, self.path = root, path
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = np.dtype(meta["data_type"])
        self.fill = meta.get("fill_value", 0)
        self.checksum = meta["codecs"][-1]["name"] == "crc32c"
        self.required = layout.required_chunks(path, meta.get("attributes", {}))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows y0:y1 and columns x0:x1, every trailing axis whole."""
        return self.read_box((y0, x0) + (0,) * (len(self.shape) - 2), (y1, x1) + self.shape[2:])

    def read_box(self, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """The pixels of [start, stop) along every axis."""
        out = np.empty(tuple(b - a for a, b in zip(start, stop)), self.dtype)
        for index in itertools.product(*(range(a // c, (b - 1) // c + 1)
                                         for a, b, c in zip(start, stop, self.chunks))):
            lo = [max(a, i * c) for a, i, c in zip(start, index, self.chunks)]
            hi = [min(b, (i + 1) * c) for b, i, c in zip(stop, index, self.chunks)]
            chunk = self._chunk(index)
            out[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, start))] = (
                self.fill if chunk is None else
                chunk[tuple(slice(l - i * c, h - i * c)
                            for l, h, i, c in zip(lo, hi, index, self.chunks))])
        return out

    def _chunk(self, index: tuple[int, ...]) -> np.ndarray | None:
        """Chunk `index` decoded, or None for a mask chunk left out as all-zero."""
        file = self.root / layout.chunk_key(self.path, index)
        try:
            raw = np.frombuffer(file.read_bytes(), np.uint8)
        except FileNotFoundError:
            if self.required is None or index in self.required:
                raise layout.StoreDamaged(self.root, file, "chunk missing") from None
            return None
        if self.checksum:
            if len(raw) < 4:
                raise layout.StoreDamaged(self.root, file, f"corrupt chunk ({len(raw)} bytes, "
                                          "shorter than its 4-byte checksum)")
            raw, stored = raw[:-4], int.from_bytes(raw[-4:].tobytes(), "little")
            if google_crc32c.value(raw) != stored:
                raise layout.StoreDamaged(self.root, file, "corrupt chunk (crc32c checksum "
                                          "mismatch: flipped bytes or a truncated file)")
        try:
            pixels = np.frombuffer(self._codec.decode(raw), self.dtype)
        except Exception as exc:  # numcodecs raises RuntimeError and others on a bad frame
            raise layout.StoreDamaged(self.root, file, f"corrupt chunk ({exc})") from None
        if pixels.size != math.prod(self.chunks):
            raise layout.StoreDamaged(self.root, file, f"corrupt chunk ({pixels.size} values, "
                                      f"expected {math.prod(self.chunks)})")
        return pixels.reshape(self.chunks)

    def problems(self) -> list[layout.StoreDamaged]:
        """Every damaged chunk: each one the array should have (missing, or
        failing its checksum or size), a file outside its chunk grid, and a
        mask chunk on disk that its written_chunks does not list."""
        folder = self.root / self.path / "c"
        on_disk = {f.relative_to(folder).parts for f in folder.rglob("*") if f.is_file()}
        found = []
        for index in itertools.product(*(range(-(-s // c)) for s, c in zip(self.shape, self.chunks))):
            present = tuple(map(str, index)) in on_disk
            on_disk.discard(tuple(map(str, index)))
            listed = self.required is None or index in self.required
            if present and not listed:
                found.append(layout.StoreDamaged(self.root, self.root / layout.chunk_key(self.path, index),
                                                 f"chunk not listed in {layout.WRITTEN_CHUNKS}"))
            if present or listed:
                try:
                    self._chunk(index)
                except layout.StoreDamaged as exc:
                    found.append(exc)
        found += [layout.StoreDamaged(self.root, folder.joinpath(*parts),
                                      "unexpected file: not a chunk of the array's grid")
                  for parts in sorted(on_disk)]
        return found


def _layout_problem(path: str, meta: dict) -> str | None:
    """Why array `path`'s zarr.json is not the store's pixel layout, or None."""
    codecs = tuple(c.get("name") for c in meta.get("codecs", []))
    if meta.get("node_type") != "array" or meta.get("data_type") != "uint8":
        return f"not a uint8 array (node_type {meta.get('node_type')!r}, " \
               f"data_type {meta.get('data_type')!r})"
    if codecs != layout.CODECS:
        return f"codecs {', '.join(codecs)}, expected {', '.join(layout.CODECS)}"
    if (meta.get("chunk_grid", {}).get("name") != "regular"
            or meta.get("chunk_key_encoding", {}).get("name") != "default"
            or meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/"):
        return "chunk grid or key encoding other than regular with '/' keys"
    if not layout.keeps_every_chunk(path) and layout.WRITTEN_CHUNKS not in meta.get("attributes", {}):
        return f"mask array without its {layout.WRITTEN_CHUNKS} attribute"
    return None


class WindowReader:
    """Reads crop windows of images, union masks and ELA from a forgery store.

    Cheap to construct and picklable (holds only the path): worker processes
    make their own and open arrays lazily, caching array metadata.
    """

    def __init__(self, store: str | os.PathLike | zarr.Group, *, with_ela: bool = False,
                 pyramid: bool = True):
        """`store`: its path, or the group engine.store.open_store returned."""
        self._group = store if isinstance(store, zarr.Group) else None
        self.store = str(store.store.root if self._group is not None else store)
        self.with_ela, self.pyramid = with_ela, pyramid
        self._arrays: dict[str, _ChunkFiles] = {}
        self._meta = None

    def __getstate__(self):
        return {"store": self.store, "with_ela": self.with_ela, "pyramid": self.pyramid}

    def __setstate__(self, state):
        self.__init__(**state)

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = layout.open_store(self.store)
        return self._group

    @property
    def meta(self) -> dict[str, np.ndarray]:
        if self._meta is None:
            self._meta = layout.read_meta(self.group)
        return self._meta

    def _array(self, path: str) -> _ChunkFiles:
        arr = self._arrays.get(path)
        if arr is None:
            self.group  # opening the store first refuses another format or version
            root = Path(self.store)
            try:
                meta = json.loads((root / path / "zarr.json").read_text())
            except FileNotFoundError:
                raise layout.StoreDamaged(root, root / path, "array missing") from None
            except (OSError, ValueError) as exc:
                raise layout.StoreDamaged(root, root / path / "zarr.json",
                                          f"unreadable array metadata ({exc})") from None
            problem = _layout_problem(path, meta)
            if problem:
                raise layout.StoreDamaged(root, root / path / "zarr.json", problem)
            try:
                arr = self._arrays[path] = _ChunkFiles(root, path, meta)
            except (KeyError, TypeError, ValueError) as exc:
                raise layout.StoreDamaged(root, root / path / "zarr.json",
                                          f"unreadable array metadata ({exc!r})") from None
        return arr

    def check_array(self, path: str, shape: tuple[int, ...] | None = None) -> list[layout.StoreDamaged]:
        """Every damaged piece of one pixel array (that should have `shape`,
        when given): its metadata, then each chunk (_ChunkFiles.problems)."""
        try:
            arr = self._array(path)
        except layout.StoreDamaged as exc:
            return [exc]
        if shape is not None and arr.shape != tuple(shape):
            return [layout.StoreDamaged(self.store, Path(self.store) / path / "zarr.json",
                                        f"shape {arr.shape}, expected {tuple(shape)} from meta/")]
        return arr.problems()

    def read_array(self, path: str) -> np.ndarray:
        """A whole pixel array of the store (e.g. engine.store.image_path(row))."""
        arr = self._array(path)
        return arr.read_box((0,) * len(arr.shape), arr.shape)

    def read_box(self, path: str, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """[start, stop) along every axis of pixel array `path`, its chunks verified."""
        return self._array(path).read_box(tuple(start), tuple(stop))

    def read_instances(self, row: int) -> list[np.ndarray]:
        """Row `row`'s instance masks, uint8 (H, W) each, [] for an authentic
        row; a forged row without them is a damaged store. Reads only its
        meta/n_instances value, not all of meta/: scorers make a reader per row."""
        count = int(self.group["meta/n_instances"][row])
        if not count:
            return []
        path = layout.instances_mask_path(row)
        layers = self.read_array(path)
        if len(layers) != count:
            raise layout.StoreDamaged(self.store, Path(self.store) / path,
                                      f"{len(layers)} instance layers, meta/n_instances says {count}")
        return list(layers)

    def choose_level(self, row: int, window_h: float, window_w: float, out_size: int) -> int:
        """Coarsest level whose pixels across the window are still >= out_size
        (always 0 without the pyramid)."""
        if not self.pyramid:
            return 0
        height, width = int(self.meta["height"][row]), int(self.meta["width"][row])
        levels = layout.level_count(height, width)
        shrink = min(window_h, window_w) / out_size
        return max(0, min(levels - 1, int(math.floor(math.log2(shrink))) if shrink >= 1 else 0))

    def read(self, row: int, window, out_size: int) -> WindowBlock:
        """The pixels covering window (y0, x0, y1, x1, level-0 pixels) of image `row`."""
        y0, x0, y1, x1 = (int(v) for v in window)
        level = self.choose_level(row, y1 - y0, x1 - x0, out_size)
        image = self._array(layout.image_path(row, level))
        full_h, full_w = int(self.meta["height"][row]), int(self.meta["width"][row])
        sy, sx = image.shape[0] / full_h, image.shape[1] / full_w
        fy0, fx0, fy1, fx1 = y0 * sy, x0 * sx, y1 * sy, x1 * sx
        by0, bx0 = int(math.floor(fy0)), int(math.floor(fx0))
        by1 = min(image.shape[0], max(by0 + 1, int(math.ceil(fy1))))
        bx1 = min(image.shape[1], max(bx0 + 1, int(math.ceil(fx1))))
        pixels = image.read(by0, by1, bx0, bx1)
        ela = None
        if self.with_ela:
            ela = self._array(layout.ela_path(row, level)).read(by0, by1, bx0, bx1)[..., None]
        if self.meta["label"][row]:
            mask = self._array(layout.mask_path(row, level)).read(by0, by1, bx0, bx1)
        else:
            mask = np.zeros((by1 - by0, bx1 - bx0), np.uint8)
        roi_start = np.array([fy0 - by0, fx0 - bx0], np.float32)
        roi_end = np.array([min(fy1, by1) - by0, min(fx1, bx1) - bx0], np.float32)
        return WindowBlock(pixels, mask[..., None], ela, roi_start, roi_end, level,
                           float(np.sqrt(sy * sx)))
