"""Input cases of a Kaggle-layout folder: finding them and reading them safely.

Layout (DESIGN.md): `train_images/authentic/<case>.png`,
`train_images/forged/<case>.png`, `train_masks/<case>.npy`; optionally
`supplemental_images/<case>.png` (all forged, as in the competition) with
`supplemental_masks/<case>.npy`, and `test_images/` (label unknown: counted,
not stored; predict.py reads those itself).

`discover` pairs files into cases and reports what cannot become a case
(non-PNG files, duplicate ids, forged images without a mask, masks without
an image). `load_image` and `load_masks` decode one case and raise BadInput
naming the file and the problem for everything else. Nothing here loads a
pickle: masks go through np.load(allow_pickle=False).

Pixel conversion, the one documented rule: every PNG becomes uint8 RGB.
16-bit samples v become round(v / 257) (65535 -> 255, exact for v = 257 k);
grey is repeated into three channels; an alpha channel is composited over
white (what a viewer shows; fully opaque pixels are unchanged).
"""
from __future__ import annotations

import os
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


class BadInput(ValueError):
    """One input file that cannot be stored, and why."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


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
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: source folder does not exist")
    if not any((source / folder).is_dir() for folder, _, _ in FOLDERS):
        raise FileNotFoundError(
            f"{source}: none of {', '.join(f for f, _, _ in FOLDERS)} exists; "
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
    """{stem: path} of the files in `folder` with `suffix` (any case); other
    files and stems that occur twice (a.png and a.PNG) go to `problems`."""
    if not folder.is_dir():
        return {}
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix.lower() != suffix:
            problems.append(BadInput(path, f"not a {suffix} file; expected <case>{suffix}"))
            continue
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


def png_size(path: Path, data: bytes) -> tuple[int, int]:
    """(height, width) from the PNG header, checked before decoding."""
    if len(data) == 0:
        raise BadInput(path, "zero-byte file")
    if not data.startswith(PNG_SIGNATURE):
        raise BadInput(path, f"not a PNG file (starts with {data[:8]!r})")
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise BadInput(path, "truncated PNG (no IHDR header)")
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one PNG into (H, W, 3) uint8 RGB (the module's conversion rule)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(path, f"cannot read the file ({exc.strerror})") from None
    height, width = png_size(path, data)
    if height * width > max_pixels:
        raise BadInput(path, f"{width} x {height} = {height * width} pixels exceeds the "
                       f"limit of {max_pixels} (--max-pixels)")
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


def load_masks(path: Path, height: int, width: int) -> np.ndarray:
    """Read one mask file as (N, H, W) uint8 0/1, checked against the image's
    size; (H, W) masks become one layer."""
    if os.path.getsize(path) == 0:
        raise BadInput(path, "zero-byte file")
    try:
        masks = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise BadInput(path, "pickled .npy (object array); refusing to load pickles") from None
        raise BadInput(path, f"unreadable .npy ({exc})") from None
    except (OSError, EOFError) as exc:
        raise BadInput(path, f"unreadable .npy ({exc})") from None
    if not isinstance(masks, np.ndarray):
        raise BadInput(path, "not a single .npy array (an .npz archive?)")
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise BadInput(path, f"mask has {masks.ndim} dimensions {masks.shape}; "
                       "expected (N, H, W) or (H, W)")
    if masks.shape[1:] != (height, width):
        raise BadInput(path, f"mask is {masks.shape[1]} x {masks.shape[2]} (H x W) but its "
                       f"image is {height} x {width}")
    if masks.shape[0] == 0:
        raise BadInput(path, "mask has no layers (shape (0, H, W))")
    if masks.dtype.kind == "f":
        nan = " containing NaN" if np.isnan(masks).any() else ""
        raise BadInput(path, f"float mask ({masks.dtype}{nan}); expected integer 0/1")
    if masks.dtype.kind not in "biu":
        raise BadInput(path, f"mask dtype {masks.dtype}; expected integer 0/1")
    if masks.min() < 0 or masks.max() > 1:  # np.unique sorts: only for the message
        values = np.unique(masks)
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise BadInput(path, f"mask values must be 0 or 1, found {shown}")
    if not masks.any():
        raise BadInput(path, "empty mask (all zero) for a forged image")
    return masks.astype(np.uint8, copy=False)


def count_test_images(source: Path) -> int:
    folder = Path(source) / TEST_FOLDER
    return sum(1 for p in folder.glob("*") if p.suffix.lower() == ".png") if folder.is_dir() else 0
