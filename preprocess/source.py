"""Input cases of a Kaggle-layout folder: finding them and reading them safely.

Layout (README, "Input layout"): `train_images/authentic/<case>.png`,
`train_images/forged/<case>.png`, `train_masks/<case>.npy`; optionally
`supplemental_images/<case>.png` (all forged, as in the competition) with
`supplemental_masks/<case>.npy`, and `test_images/` (label unknown: counted,
not stored; predict.py reads those itself).

`discover` pairs files into cases and reports what cannot become a case
(non-PNG files, duplicate ids, forged images without a mask, masks without
an image). `image_size` and `mask_layers` read only a case's headers (what
a build plans with, checked as a decode would); `load_image` and
`load_masks` decode one case. All raise BadInput naming the file and the
problem for everything else. Nothing here loads a
pickle: masks go through np.load(allow_pickle=False).

Hostile folders: only regular files are read. Symlinks are followed to
their target; symlink loops, dangling links, FIFOs, sockets, devices (a
link to /dev/zero) and sub-folders are reported and skipped, never opened
(a FIFO would block the build, a device feed it without end). Reads check
the open file again (fstat: a FIFO swapped in after discovery cannot block)
and its size before reading: a PNG may hold at most `png_byte_limit`
bytes, a mask exactly what its .npy header says, checked against its image
before the data is read. Names that cannot be a case id are reported and
skipped too: hidden files (`.DS_Store`, `....png`), names that are not
UTF-8 (shown with \\x escapes; the store keeps case ids as UTF-8 text and
submissions need them as text, so a surrogate-escaped id could be neither),
and ids with control characters, surrounding blanks or `#`: trainers/score.py
writes `<case id>#<row>` for an authentic and a forged image sharing an id
and strips blanks when reading, so an id with either could collide with
another image's.

Pixel conversion, the one documented rule: every PNG becomes uint8 RGB.
16-bit samples v become round(v / 257) (65535 -> 255, exact for v = 257 k);
grey is repeated into three channels; an alpha channel is composited over
white (what a viewer shows; fully opaque pixels are unchanged).
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# (image folder, mask folder, label); the image folder's sort order is the
# store's row order.
FOLDERS = (
    ("supplemental_images", "supplemental_masks", 1),
    ("train_images/authentic", "train_masks", 0),
    ("train_images/forged", "train_masks", 1),
)
TEST_FOLDER = "test_images"
# 40 megapixels: above the largest competition figure (about 3900 x 3900 =
# 15 MP) with room to spare, below what one worker can hold comfortably
# (the image, its pyramid, ELA and masks take about 10 bytes per pixel).
DEFAULT_MAX_PIXELS = 40_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# meta/n_instances is int16: a mask with more layers cannot be stored.
MAX_MASK_LAYERS = np.iinfo(np.int16).max
FILE_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
              stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


class BadInput(ValueError):
    """One input file that cannot be stored, and why."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{shown(path)}: {problem}")
        self.path = shown(path)
        self.problem = problem


def shown(path: Path | str) -> str:
    """`path` as one line of printable text: bytes that are not UTF-8 become
    \\x escapes, and so do control characters (in a name that has any)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _is_utf8(text: str) -> bool:
    """False for a name with bytes that are not UTF-8 (Python holds them as
    lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Case:
    case_id: str
    label: int               # 0 authentic, 1 forged
    folder: str              # image folder relative to the source root
    image: Path
    mask: Path | None        # forged images only


def discover(source: Path) -> tuple[list[Case], list[BadInput]]:
    """All cases under `source`, sorted by (folder, case id), and the files
    that cannot become a case."""
    source = Path(source)
    if not source.exists():
        raise BadInput(source, "source folder does not exist")
    if not source.is_dir():
        raise BadInput(source, "not a folder; --source takes the Kaggle-layout folder")
    if not _is_utf8(str(source)):
        raise BadInput(source, "folder name is not valid UTF-8; rename it (or link it under a "
                       "UTF-8 name) so that file names can be reported and stored")
    if not any((source / folder).is_dir() for folder, _, _ in FOLDERS):
        raise BadInput(
            source, f"none of {', '.join(f for f, _, _ in FOLDERS)} exists; "
            "expected the Kaggle layout (train_images/authentic, train_images/forged, train_masks)"
        )
    cases: list[Case] = []
    problems: list[BadInput] = []
    masks = {m: _files_by_stem(source / m, ".npy", problems) for m in sorted({m for _, m, _ in FOLDERS})}
    unused = {m: set(found) for m, found in masks.items()}
    for folder, mask_folder, label in FOLDERS:
        for case_id, image in sorted(_files_by_stem(source / folder, ".png", problems).items()):
            mask = masks[mask_folder].get(case_id) if label else None
            if label and mask is None:
                problems.append(BadInput(image, f"forged image without a mask "
                                         f"({mask_folder}/{case_id}.npy is missing)"))
                continue
            if label:
                unused[mask_folder].discard(case_id)
            cases.append(Case(case_id, label, folder, image, mask))
    for mask_folder, stems in unused.items():
        problems.extend(BadInput(masks[mask_folder][s], "mask without a forged image")
                        for s in sorted(stems))
    return cases, problems


def _files_by_stem(folder: Path, suffix: str, problems: list[BadInput]) -> dict[str, Path]:
    """{stem: path} of the regular files in `folder` with `suffix` (any
    case); every other entry and stems that occur twice (a.png and a.PNG)
    go to `problems`."""
    if not folder.is_dir():
        return {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise BadInput(folder, f"cannot list the folder ({exc.strerror})") from None
    found: dict[str, list[Path]] = {}
    for path in entries:
        problem = _entry_problem(path, suffix)
        if problem:
            problems.append(BadInput(path, problem))
        else:
            found.setdefault(path.stem, []).append(path)
    unique = {}
    for stem, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            problems.extend(BadInput(p, f"duplicate case id {stem!r} in {folder} ({names})")
                            for p in paths)
        else:
            unique[stem] = paths[0]
    return unique


def _entry_problem(path: Path, suffix: str) -> str | None:
    """Why a folder entry cannot be a case file; None for a regular file
    (possibly behind symlinks) named <case id><suffix>."""
    name = path.name
    if not _is_utf8(name):
        return "file name is not valid UTF-8 (shown with \\x escapes); rename the file"
    if name.startswith("."):
        return "hidden file (name starts with '.'); case files are named <case>" + suffix
    try:
        mode = path.stat().st_mode  # follows symlinks
    except OSError as exc:
        if not path.is_symlink():
            return f"cannot read the file's status ({exc.strerror})"
        if exc.errno == errno.ELOOP:
            return "symlink loop; not read"
        return f"dangling symlink (its target {os.readlink(path)!r} does not exist); not read"
    if not stat.S_ISREG(mode):
        link = f"symlink to {os.readlink(path)!r}, " if path.is_symlink() else ""
        return link + not_regular(mode)
    if path.suffix.lower() != suffix:
        return f"not a {suffix} file; expected <case>{suffix}"
    return _case_id_problem(path.stem)


def _case_id_problem(case_id: str) -> str | None:
    """Why a file stem cannot be a case id (module docstring: collisions)."""
    if not case_id.isprintable():
        return "case id has a control character; rename the file"
    if case_id != case_id.strip():
        return ("case id begins or ends with a blank, which submissions strip (it could "
                "collide with another id); rename the file")
    if "#" in case_id:
        return ("case id contains '#', which submission ids use for <case id>#<row> (it could "
                "collide with another image's); rename the file")
    return None


def not_regular(mode: int) -> str:
    return FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file") + "; only regular files are read"


@contextlib.contextmanager
def open_regular(path: Path):
    """The open file and its size, provided it is a regular file. Checked on
    the open file, which is opened without blocking: a FIFO or device put
    there after discovery is refused, never read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise BadInput(path, f"cannot read the file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise BadInput(path, not_regular(status.st_mode))
        if status.st_size == 0:
            raise BadInput(path, "zero-byte file")
        try:
            yield file, status.st_size
        except OSError as exc:
            raise BadInput(path, f"cannot read the file ({exc.strerror})") from None


def png_byte_limit(max_pixels: int) -> int:
    """The largest PNG file read for an image of at most `max_pixels` pixels:
    stored without compression at 16-bit RGBA (8 bytes a pixel) plus one
    filter byte a row and deflate and chunk framing, both under a byte a
    pixel, and 1 MiB of other chunks."""
    return 9 * max_pixels + 2**20


def png_size(path: Path, data: bytes) -> tuple[int, int]:
    """(height, width) from the PNG header, checked before decoding."""
    if not data.startswith(PNG_SIGNATURE):
        raise BadInput(path, f"not a PNG file (starts with {data[:8]!r})")
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise BadInput(path, "truncated PNG (no IHDR header)")
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def image_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of a PNG from its header alone (the first bytes of
    the file), with load_image's checks of its file and pixel count: what
    the build plans with before any image is decoded."""
    with open_regular(path) as (file, size):
        _check_png_bytes(path, size, max_pixels)
        return _checked_png_size(path, file.read(len(PNG_SIGNATURE) + 16), max_pixels)


def _check_png_bytes(path: Path, size: int, max_pixels: int) -> None:
    if size > png_byte_limit(max_pixels):
        raise BadInput(path, f"{size} bytes, more than a PNG of at most {max_pixels} pixels "
                       f"takes ({png_byte_limit(max_pixels)}; --max-pixels)")


def _checked_png_size(path: Path, data: bytes, max_pixels: int) -> tuple[int, int]:
    height, width = png_size(path, data)
    if height * width > max_pixels:
        raise BadInput(path, f"{width} x {height} = {height * width} pixels exceeds the "
                       f"limit of {max_pixels} (--max-pixels)")
    return height, width


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one PNG into (H, W, 3) uint8 RGB (the module's conversion rule)."""
    with open_regular(path) as (file, size):
        _check_png_bytes(path, size, max_pixels)
        data = file.read(size)
    height, width = _checked_png_size(path, data, max_pixels)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise BadInput(path, "unreadable or truncated PNG (the decoder failed)")
    if pixels.shape[:2] != (height, width):
        raise BadInput(path, f"decoded shape {pixels.shape[:2]} differs from its header "
                       f"({height}, {width})")
    return to_rgb8(pixels)


def to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """OpenCV's decoded PNG (grey, grey+alpha, BGR or BGRA; 8 or 16 bit)
    -> uint8 RGB."""
    if pixels.dtype == np.uint16:
        # (v + 128) // 257 == round(v / 257) for 16-bit v
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    if channels in (2, 4):
        colour, alpha = pixels[:, :, :-1], pixels[:, :, -1:]
        if (alpha == 255).all():
            pixels = colour
        else:
            a = alpha.astype(np.float32) / 255
            pixels = (colour * a + 255 * (1 - a)).round().astype(np.uint8)
    if pixels.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(pixels, 3, axis=2))
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def mask_layers(path: Path, height: int, width: int) -> int:
    """The layer count of a mask file from its .npy header alone, with
    load_masks' checks of the header against its image (height x width)."""
    with open_regular(path) as (file, size):
        return _checked_mask_header(path, file, size, height, width)


def _checked_mask_header(path: Path, file, size: int, height: int, width: int) -> int:
    """Layers of the mask whose .npy header is at `file`'s start (left just
    after the header), its shape, layer count and size checked."""
    shape, data_bytes = _npy_header(path, file)
    if len(shape) not in (2, 3):
        raise BadInput(path, f"mask has {len(shape)} dimensions {shape}; "
                       "expected (N, H, W) or (H, W)")
    if shape[-2:] != (height, width):
        raise BadInput(path, f"mask is {shape[-2]} x {shape[-1]} (H x W) but its "
                       f"image is {height} x {width}")
    layers = shape[0] if len(shape) == 3 else 1
    if layers == 0:
        raise BadInput(path, "mask has no layers (shape (0, H, W))")
    if layers > MAX_MASK_LAYERS:
        raise BadInput(path, f"mask has {layers} layers; the store holds at most "
                       f"{MAX_MASK_LAYERS} a case")
    if size - file.tell() < data_bytes:
        raise BadInput(path, f"truncated .npy: its header announces {data_bytes} bytes "
                       f"of data, the file holds {size - file.tell()}")
    return layers


def load_masks(path: Path, height: int, width: int) -> np.ndarray:
    """Read one mask file as (N, H, W) uint8 0/1, checked against the image's
    size; (H, W) masks become one layer. The .npy header's shape and dtype
    are checked before any data is read."""
    with open_regular(path) as (file, size):
        _checked_mask_header(path, file, size, height, width)
        file.seek(0)
        try:
            masks = np.load(file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BadInput(path, f"unreadable .npy ({exc})") from None
    if masks.ndim == 2:
        masks = masks[None]
    if masks.dtype.kind == "f":
        nan = " containing NaN" if np.isnan(masks).any() else ""
        raise BadInput(path, f"float mask ({masks.dtype}{nan}); expected integer 0/1")
    if masks.dtype.kind not in "biu":
        raise BadInput(path, f"mask dtype {masks.dtype}; expected integer 0/1")
    if masks.min() < 0 or masks.max() > 1:  # np.unique sorts: only for the message
        values = np.unique(masks)
        found = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise BadInput(path, f"mask values must be 0 or 1, found {found}")
    if not masks.any():
        raise BadInput(path, "empty mask (all zero) for a forged image")
    return masks.astype(np.uint8, copy=False)


def _npy_header(path: Path, file) -> tuple[tuple[int, ...], int]:
    """Shape and data size in bytes from the .npy header at `file`'s start."""
    start = file.read(len(np.lib.format.MAGIC_PREFIX))
    if start.startswith(b"PK\x03\x04"):
        raise BadInput(path, "an .npz archive; expected a single .npy array")
    if start != np.lib.format.MAGIC_PREFIX:
        raise BadInput(path, f"not an .npy file (starts with {start!r})")
    file.seek(0)
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise ValueError(f".npy format version {version}; expected 1.0 or 2.0")
    except ValueError as exc:
        raise BadInput(path, f"unreadable .npy ({exc})") from None
    if dtype.hasobject:
        raise BadInput(path, "pickled .npy (object array); refusing to load pickles")
    return shape, math.prod(shape) * dtype.itemsize


def count_test_images(source: Path) -> int:
    folder = Path(source) / TEST_FOLDER
    return sum(1 for p in folder.glob("*") if p.suffix.lower() == ".png") if folder.is_dir() else 0
