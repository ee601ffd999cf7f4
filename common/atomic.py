"""Output files that appear complete or not at all.

`atomic_open(path)` writes a hidden `.NAME.PID.partial` beside the target and
renames it over the target (os.replace) only when the block ends without an
error: a failed or killed run leaves the previous file as it was. The
leftover of a killed run (kill -9 leaves no chance to clean up) is never read,
and the next write of the same file removes it.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def partial_path(path: Path, pid: int | None = None) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.partial")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def remove_leftovers(path: Path) -> None:
    """Partial files of `path` whose writer process is gone."""
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = partial.name[len(path.name) + 2:-len(".partial")]
        if pid.isdigit() and not _alive(int(pid)):
            partial.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **open_args) -> Iterator[IO]:
    """open(path, mode) for writing, replacing `path` only when the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; name the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    partial = partial_path(path)
    try:
        with open(partial, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
