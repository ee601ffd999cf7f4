"""build_zarr against hostile input and concurrent builds: the output lock,
builds that would store nothing, files that are not regular files or cannot
be case ids, unbounded reads, and file errors as one-line messages."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import storage as storages
from engine import store as layout
from preprocess import build_zarr
from preprocess.build_zarr import BuildError, build_store, main, output_lock
from preprocess.source import MAX_MASK_LAYERS, BadInput, load_image, load_masks, png_byte_limit
from tests.test_build_zarr import Tiles, _assert_same_store, _mask, _png, _square

BUILD = dict(workers=1, progress=False, figure=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Two authentic images and one forged with its mask, 40 x 50."""
    root = tmp_path_factory.mktemp("small") / "source"
    for case in ("a", "b"):
        _png(root / f"train_images/authentic/{case}.png", 40, 50, seed=len(case))
    _png(root / "train_images/forged/a.png", 40, 50, seed=3)
    _mask(root / "train_masks/a.npy", _square(40, 50))
    return root


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """The store an undisturbed build of `source` gives."""
    out = tmp_path_factory.mktemp("reference") / "store.zarr"
    build_store(source, out, **BUILD)
    return out


def _error_line(capsys) -> str:
    """The error message, which must be the one line after the progress bar."""
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("build_zarr: error: ") and err.count("error: ") == 1, err
    return last


# ---------------------------------------------------------------- the lock

def test_a_second_build_refuses_while_another_holds_the_output(source, reference, tmp_path,
                                                               capsys):
    out = tmp_path / "store.zarr"
    work = layout.partial_path(out) / "first build's work"
    work.parent.mkdir()
    work.write_text("kept")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from preprocess.build_zarr import output_lock\n"
         "with output_lock(Path(sys.argv[1])):\n print('locked', flush=True); sys.stdin.read()",
         str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(["--source", str(source), "--out", str(out), "--workers", "1",
                     "--no-figure"]) == 2
        err = _error_line(capsys)
        assert f"PID {holder.pid} on host {socket.gethostname()}, started " in err
        assert "another build is writing it" in err and str(out) in err
        assert work.read_text() == "kept" and not out.exists()
    finally:
        holder.communicate("")  # end of stdin: the holder leaves the lock
    assert not build_zarr.lock_path(out).exists(), "the lock file goes with its holder"
    build_store(source, out, **BUILD)
    _assert_same_store(out, reference)


def test_the_lock_is_held_through_the_final_rename(source, tmp_path, monkeypatch):
    out = tmp_path / "store.zarr"
    rename = build_zarr.finish

    def finish_while_checking_the_lock(partial, out_):
        with pytest.raises(BuildError, match="another build is writing it"):
            with output_lock(out):
                pass
        rename(partial, out_)

    monkeypatch.setattr(build_zarr, "finish", finish_while_checking_the_lock)
    build_store(source, out, **BUILD)
    assert layout.open_store(out) is not None
    assert not build_zarr.lock_path(out).exists()


def test_a_lock_file_left_by_a_dead_build_does_not_block(source, reference, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    out = tmp_path / "store.zarr"
    build_zarr.lock_path(out).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": "2000-01-01T00:00:00+00:00"}))
    build_store(source, out, **BUILD)
    _assert_same_store(out, reference)
    assert not build_zarr.lock_path(out).exists()


# ---------------------------------------------------------------- nothing stored

@pytest.mark.parametrize("content, words", [
    ({}, "no <case>.png files in supplemental_images"),
    ({"zero.png": b""}, "all 1 input files were skipped"),
])
def test_a_build_that_would_store_nothing_fails(tmp_path, capsys, content, words):
    folder = tmp_path / "source/train_images/authentic"
    folder.mkdir(parents=True)
    for name, data in content.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "store.zarr"
    assert main(["--source", str(tmp_path / "source"), "--out", str(out), "--workers", "1",
                 "--no-figure"]) == 2
    err = _error_line(capsys)
    assert f"{tmp_path / 'source'}: " in err and words in err
    assert not out.exists() and not layout.partial_path(out).exists()


# ---------------------------------------------------------------- hostile files

def test_entries_that_are_not_regular_files_or_case_ids_are_skipped_and_reported(tmp_path,
                                                                                  capsys):
    root = tmp_path / "source"
    auth = root / "train_images/authentic"
    good = _png(auth / "good.png", 40, 50)
    (auth / "linked.png").symlink_to("good.png")
    (auth / "loop.png").symlink_to("loop.png")
    (auth / "dangling.png").symlink_to("missing.png")
    (auth / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(auth / "fifo.png")
    (auth / "folder.png").mkdir()
    png = (auth / "good.png").read_bytes()
    with open(os.fsencode(auth) + b"/latin1-\xe9.png", "wb") as file:
        file.write(png)
    expected = {
        "loop.png": "symlink loop", "dangling.png": "dangling symlink",
        "zero.png": "symlink to '/dev/zero', a character device", "fifo.png": "a FIFO",
        "folder.png": "a folder", "latin1-\\xe9.png": "not valid UTF-8",
        "....png": "hidden file", "a#1.png": "contains '#'", " a.png": "blank",
        "tab\\t.png": "control character",
    }
    for name in ("....png", "a#1.png", " a.png", "tab\t.png"):
        (auth / name).write_bytes(png)
    out = tmp_path / "store.zarr"
    report = build_store(root, out, **BUILD)
    reasons = {Path(item["file"]).name: item["problem"] for item in report["skipped"]}
    assert reasons.keys() == expected.keys()
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
    assert json.loads((out / build_zarr.REPORT).read_text())["skipped"] == report["skipped"]
    assert "latin1-\\xe9.png: file name is not valid UTF-8" in capsys.readouterr().out
    tiles = Tiles(out)
    assert tiles.meta["case_id"].tolist() == ["good", "linked"]
    np.testing.assert_array_equal(tiles.pixels("image", 1), good[..., ::-1])


def test_reads_take_regular_files_of_bounded_size_only(tmp_path):
    """What discovery filters is refused again when read (the file may have
    been replaced since), and nothing is read beyond what a file can hold."""
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="fifo.png: a FIFO; only regular files"):
        load_image(fifo)
    with pytest.raises(BadInput, match="a FIFO"):
        load_masks(fifo, 40, 50)
    with pytest.raises(BadInput, match="/dev/zero: a character device"):
        load_image(Path("/dev/zero"))
    padded = tmp_path / "padded.png"
    _png(padded, 40, 50)
    with open(padded, "ab") as file:  # bytes after IEND: the image still decodes
        file.write(bytes(png_byte_limit(2000)))
    assert load_image(padded).shape == (40, 50, 3)
    with pytest.raises(BadInput, match=f"more than a PNG of at most 2000 pixels takes "
                                       f"\\({png_byte_limit(2000)}"):
        load_image(padded, max_pixels=2000)


def _npy(path: Path, shape: tuple, data: bytes) -> Path:
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": "|u1", "fortran_order": False, "shape": shape})
        file.write(data)
    return path


def test_mask_headers_are_checked_before_the_data_is_read(tmp_path):
    short = _npy(tmp_path / "short.npy", (10_000, 40, 50), bytes(2000))
    with pytest.raises(BadInput, match="truncated .npy: its header announces 20000000 bytes"):
        load_masks(short, 40, 50)
    layers = MAX_MASK_LAYERS + 1
    many = _npy(tmp_path / "many.npy", (layers, 2, 2), b"\1" * (4 * layers))
    with pytest.raises(BadInput, match=f"{layers} layers; the store holds at most"):
        load_masks(many, 2, 2)
    np.savez(tmp_path / "archive.npz", mask=_square(40, 50))
    with pytest.raises(BadInput, match="an .npz archive"):
        load_masks(tmp_path / "archive.npz", 40, 50)


# ---------------------------------------------------------------- file errors

def _full_disk_in_a_worker(monkeypatch):
    write = storages.LocalStorage.write
    calls = []

    def write_until_full(self, key, data):
        calls.append(key)
        if len(calls) == 3:  # a failed write() names no file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, key, data)

    monkeypatch.setattr(storages.LocalStorage, "write", write_until_full)
    return "store.zarr.partial"


def _full_disk_while_finalizing(monkeypatch):
    def write_array(group, path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"/full/{path}")

    monkeypatch.setattr(layout, "create_table", write_array)
    return "/full/meta/"


@pytest.mark.parametrize("fill", [_full_disk_in_a_worker, _full_disk_while_finalizing])
def test_a_full_disk_is_one_line_naming_the_path_and_the_rerun_resumes(
        source, reference, tmp_path, capsys, monkeypatch, fill):
    out = tmp_path / "store.zarr"
    args = ["--source", str(source), "--out", str(out), "--workers", "1", "--no-figure"]
    path = fill(monkeypatch)
    assert main(args) == 2
    err = _error_line(capsys)
    assert path in err and "no space left on the device; free space there and rerun" in err
    assert not out.exists() and layout.partial_path(out).exists()
    assert not build_zarr.lock_path(out).exists()
    monkeypatch.undo()
    assert main(args) == 0
    _assert_same_store(out, reference)


def test_other_file_errors_name_their_path():
    with_name = OSError(errno.EACCES, os.strerror(errno.EACCES), "/store/meta/label")
    assert str(build_zarr.os_error(with_name, Path("/store"))) == \
        "/store/meta/label: Permission denied"
    assert str(build_zarr.os_error(OSError(errno.EIO, os.strerror(errno.EIO)), Path("/store"))) \
        == "/store: Input/output error"


@pytest.mark.parametrize("args, words", [
    (["--source", "{tmp}/missing"], "{tmp}/missing: source folder does not exist"),
    (["--source", "{tmp}/file"], "{tmp}/file: not a folder; --source takes"),
    (["--out", "{tmp}/file/store.zarr"], "{tmp}/file: not a folder, so store.zarr cannot"),
    (["--out", "{tmp}/folder", "--overwrite"], "{tmp}/folder: exists and is not a Zarr store"),
])
def test_user_errors_are_one_line_with_exit_status_2(source, tmp_path, capsys, args, words):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    argv = ["--source", str(source), "--out", str(tmp_path / "store.zarr"), "--no-figure"]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    assert words.format(tmp=tmp_path) in _error_line(capsys)
