"""Window reads: fetch only the chunks of the store that a crop window touches.

For a window given in original-resolution pixels, the reader picks the
coarsest pyramid level that still has at least the output's resolution across
the window, reads the image (plus ELA when asked) and union-mask chunks that
the window touches at that level, and returns the covering pixel block with
the window's exact, fractional position inside it (DALI's resize takes a
fractional ROI, so no precision is lost to the level's integer grid).

Why a hand-written chunk path: zarr-python spends about 0.3 ms of Python and
asyncio per `__getitem__` before decoding (REFERENCES.md), several times a
sample's decode cost for small windows. For local stores whose arrays use the
layout that engine/store.py writes (regular chunks, default "/" key encoding,
bytes + zstd codecs), chunk files are read and decoded directly with
numcodecs; anything else (another codec, an fsspec URL) goes through zarr
itself. Both give identical pixels (tests/test_reader.py).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

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
    """Direct reads of one local Zarr v3 array with the store's codecs."""

    _codec = numcodecs.Zstd()

    def __init__(self, root: Path, path: str, meta: dict):
        self.root, self.path = root, path
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = np.dtype(meta["data_type"])
        self.fill = meta.get("fill_value", 0)
        self.missing_is_fill = not layout.keeps_every_chunk(path)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        cy, cx = self.chunks[0], self.chunks[1]
        trailing = self.shape[2:]
        out = np.empty((y1 - y0, x1 - x0) + trailing, self.dtype)
        tail = (0,) * len(trailing)
        for i in range(y0 // cy, (y1 - 1) // cy + 1):
            for j in range(x0 // cx, (x1 - 1) // cx + 1):
                chunk = self._chunk(layout.chunk_key(self.path, (i, j) + tail))
                ys, ye = max(y0, i * cy), min(y1, (i + 1) * cy)
                xs, xe = max(x0, j * cx), min(x1, (j + 1) * cx)
                out[ys - y0:ye - y0, xs - x0:xe - x0] = (
                    self.fill if chunk is None else
                    chunk[ys - i * cy:ye - i * cy, xs - j * cx:xe - j * cx])
        return out

    def _chunk(self, key: str) -> np.ndarray | None:
        file = self.root / key
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            if self.missing_is_fill:
                return None
            raise layout.StoreError(f"{file}: chunk missing; the store is damaged, rebuild it") from None
        try:
            return np.frombuffer(self._codec.decode(raw), self.dtype).reshape(self.chunks)
        except Exception as exc:
            raise layout.StoreError(f"{file}: corrupt chunk ({exc}); the store is damaged, rebuild it") from None


class _ZarrArray:
    """Reads through zarr-python: any store zarr can open, any codec."""

    def __init__(self, array: zarr.Array):
        self.array, self.shape = array, tuple(array.shape)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(self.array[y0:y1, x0:x1])


def _is_direct(meta: dict) -> bool:
    codecs = [c["name"] for c in meta.get("codecs", [])]
    return (meta.get("chunk_grid", {}).get("name") == "regular"
            and meta.get("chunk_key_encoding", {}).get("name") == "default"
            and meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/"
            and codecs == ["bytes", "zstd"] and np.dtype(meta["data_type"]).itemsize == 1)


class WindowReader:
    """Reads crop windows of images, union masks and ELA from a forgery store.

    Cheap to construct and picklable (holds only the path): worker processes
    make their own and open arrays lazily, caching array metadata.
    """

    def __init__(self, store: str | os.PathLike, *, with_ela: bool = False, direct: bool = True,
                 pyramid: bool = True):
        self.store = str(store)
        self.with_ela, self.direct, self.pyramid = with_ela, direct, pyramid
        self._arrays: dict[str, object] = {}
        self._group = None
        self._meta = None

    def __getstate__(self):
        return {"store": self.store, "with_ela": self.with_ela, "direct": self.direct,
                "pyramid": self.pyramid}

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

    def _array(self, path: str):
        arr = self._arrays.get(path)
        if arr is None:
            root = Path(self.store)
            meta_file = root / path / "zarr.json"
            if self.direct and meta_file.is_file():
                meta = json.loads(meta_file.read_text())
                arr = _ChunkFiles(root, path, meta) if _is_direct(meta) else None
            if arr is None:
                if path not in self.group:
                    raise layout.StoreError(f"{self.store}: array {path} missing; the store is damaged")
                arr = _ZarrArray(self.group[path])
            self._arrays[path] = arr
        return arr

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
