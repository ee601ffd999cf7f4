"""Where a store's bytes live: the one seam between the engine and storage.

The reader and the builder name a store's objects by key ("images/3/0/c/0/0/0",
zarr v3's keys) and go through a Storage for the bytes: whole objects, byte
ranges of one (a shard's inner chunks) and its last n bytes (a shard's index).

LocalStorage reads a folder with positioned reads (os.pread): zarr-python's
asyncio path costs about 0.3 ms per read before any decoding
(docs/performance.md, "Store"), more than decoding a small chunk. ZarrStorage
serves any other zarr Store (a MemoryStore in tests) through zarr's own
store API, all of one call's ranges requested concurrently.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync


class LocalStorage:
    """A store in a folder of a local or shared file system."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def where(self, key: str = "") -> Path:
        """The file of `key`, for messages."""
        return self.root / key if key else self.root

    def read(self, key: str) -> bytes | None:
        """The whole object, or None when there is none."""
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """Bytes [start, stop) of each range (shorter where the object ends
        first), or None when there is no such object."""
        try:
            fd = os.open(self.root / key, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return [os.pread(fd, stop - start, start) for start, stop in ranges]
        finally:
            os.close(fd)

    def read_suffix(self, key: str, length: int) -> bytes | None:
        """The last `length` bytes (all of a shorter object), or None."""
        try:
            fd = os.open(self.root / key, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            return os.pread(fd, min(length, size), max(0, size - length))
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def write(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def remove(self, prefix: str) -> None:
        """Every object under `prefix`."""
        if (self.root / prefix).exists():   # a stat: cheaper than rmtree's failing calls
            shutil.rmtree(self.root / prefix)

    def keys(self, prefix: str) -> list[str]:
        """Keys of every object under `prefix` (a folder's files)."""
        folder = self.root / prefix
        return [f.relative_to(self.root).as_posix() for f in folder.rglob("*") if f.is_file()]


class ZarrStorage:
    """Any other zarr Store, through zarr's store API."""

    def __init__(self, store: zarr.abc.store.Store):
        self.store = store
        self._prototype = default_buffer_prototype()

    def where(self, key: str = "") -> str:
        return f"{self.store}/{key}" if key else str(self.store)

    def _get(self, key: str, byte_range=None):
        return self.store.get(key, self._prototype, byte_range)

    def read(self, key: str) -> bytes | None:
        found = sync(self._get(key))
        return None if found is None else found.to_bytes()

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        async def all_ranges():
            return await asyncio.gather(*(self._get(key, RangeByteRequest(start, stop))
                                          for start, stop in ranges))
        found = sync(all_ranges())
        return None if any(f is None for f in found) else [f.to_bytes() for f in found]

    def read_suffix(self, key: str, length: int) -> bytes | None:
        found = sync(self._get(key, SuffixByteRequest(length)))
        return None if found is None else found.to_bytes()

    def exists(self, key: str) -> bool:
        return sync(self.store.exists(key))

    def remove(self, prefix: str) -> None:
        sync(self.store.delete_dir(prefix))

    def write(self, key: str, data: bytes) -> None:
        sync(self.store.set(key, self._prototype.buffer.from_bytes(data)))

    def keys(self, prefix: str) -> list[str]:
        async def listed():
            return [key async for key in self.store.list_prefix(prefix)]
        return sync(listed())


def storage_of(group: zarr.Group) -> LocalStorage | ZarrStorage:
    """The Storage holding an open zarr group's store (keys are relative to
    the store's root, so they include the group's own path)."""
    store = group.store
    if isinstance(store, zarr.storage.LocalStore):
        return LocalStorage(store.root)
    return ZarrStorage(store)
