"""Ensemble prediction: images in, the competition's submission.csv out.

    python trainers/predict.py --images DIR --out submission.csv [--max-pixels P] [--strict]
    python trainers/predict.py --store data/store.zarr [--split val] --out submission.csv
        [--models models/] [--members a,b,...] [--mode default] [--threshold T]
        [--min-area A] [--specialist-view tiled|whole] [--tta] [--batch-size B]
        [--device auto|cpu|cuda]

--images reads every image of DIR (case id = file stem): PNG with the build
step's decoding and checks, and the other formats OpenCV reads (IMAGE_SUFFIXES:
JPEG, TIFF, BMP, WebP, JPEG 2000, PNM), all with the build's pixel conversion
(preprocess/source.py: 16-bit to 8-bit, grey to RGB, alpha over white; at
most --max-pixels) and the comprehensive member's ELA the way the build step
computes it. Every entry of DIR is accounted for: an image that cannot be
read is named in one line and gets the row `authentic` (the competition wants
a row for every id); any other entry (a folder, FIFO or device named like an
image, a file of another kind) is named and skipped; the run goes on, says at
the end how many images could not be read, and exits 0. With --strict it
stops at the first of either, exit 2.
--store reads a split's images and stored ELA, and names rows as
trainers/score.py's solution writer does, so the two files match.

--models holds, per member, its training checkpoint `<member>_best.pth` or
its export `<member>.safetensors` + `.json` (trainers/export.py); a member
with both is read from the checkpoint (the export may be older). With
--images nothing of the training side is imported (no DALI, Numba, Kornia,
Zarr, SciPy): an offline notebook needs only torch, torchvision, smp, timm,
safetensors, OpenCV, numpy and tqdm besides this repository (README,
"Offline inference").

The CSV is written beside --out and renamed over it when complete
(common/atomic.py): a failed or killed run leaves an existing file as it
was. User errors (a missing checkpoint or store, --out naming a folder,
--device cuda without CUDA...) print one `error:` line and exit 2.

--specialist-view tiled (the default) lets the small-forgery specialist see
overlapping tiles of each full-resolution image at the scale it trained at,
blended into one map (trainers/tiling.py); whole gives it the whole image
resized to its input size, as the other members always see it. The summary
line gives the time per image.

--mode picks one of the documented operating points (threshold, minimum
component area in pixels at 512 x 512, scaled to each image's area; listed
under --help); --threshold and --min-area override the mode's values.
"""
from __future__ import annotations

import argparse
import csv
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from tqdm import tqdm

from engine import storage as storages   # no zarr until a store is opened
from engine.device import DEVICES, resolve_device
from preprocess.ela import compute_ela
from preprocess.source import (DEFAULT_MAX_PIXELS, BadInput, load_image, not_regular, open_regular,
                              png_byte_limit, to_rgb8)
from common.atomic import atomic_open
from common.help_format import HelpFormatter
from trainers.run_folder import DEFAULT_RUN, CheckpointError, models_dir
# trainers/ensemble.py (torch) only where an ensemble is loaded or used, so
# that --help and a mistyped flag answer without torch
from trainers.postprocess import ALL_MEMBERS, MODES, PostProcess
from trainers.rle import AUTHENTIC, SUBMISSION_COLUMNS, encode_annotation
from trainers.tiling import DEFAULT_SPECIALIST_VIEW, add_specialist_view_argument

if TYPE_CHECKING:
    from trainers.ensemble import Ensemble, Probabilities

DEFAULT_MODELS = models_dir(DEFAULT_RUN)   # where train.py puts checkpoints by default


@dataclass
class Case:
    case_id: str
    image: np.ndarray | None        # (H, W, 3) uint8 RGB, original size; None if unreadable
    ela: np.ndarray | None = None   # (H, W) uint8, when a member needs it
    row: int | None = None          # row in the store's meta/, for store cases
    problem: BadInput | None = None  # why the image could not be read


# What --images reads: the 8- and 16-bit formats OpenCV decodes (its float
# formats, EXR and HDR, are not photographs the models were trained on).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".tif", ".tiff", ".bmp", ".dib", ".webp",
                  ".jp2", ".pbm", ".pgm", ".ppm", ".pnm")


def _skip_reason(path: Path) -> str | None:
    """Why a folder entry is not an image to predict, or None."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file (read: {', '.join(IMAGE_SUFFIXES)})"
    try:
        mode = path.stat().st_mode   # through a link: what it points to
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None if stat.S_ISREG(mode) else not_regular(mode)


def image_files(folder: str | Path) -> tuple[list[Path], list[BadInput]]:
    """The image files of a folder, sorted, and why each other entry is left
    out (a folder, FIFO or device named like an image, another file); a
    folder without any image is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder does not exist")
    files, skipped = [], []
    for path in sorted(folder.iterdir()):
        reason = _skip_reason(path)
        if reason:
            skipped.append(BadInput(path, reason))
        else:
            files.append(path)
    if not files:
        raise FileNotFoundError(f"{folder}: no images to predict ({', '.join(IMAGE_SUFFIXES)})")
    stems = [p.stem for p in files]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise BadInput(folder, f"case ids occur twice (e.g. a.png and a.jpg): {repeated}")
    return files, skipped


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any IMAGE_SUFFIXES file: a PNG as the build
    reads it (its header's size checked before decoding), another format
    decoded by OpenCV (whose own pixel limit bounds the decode), then held
    to max_pixels and converted by the build's rule."""
    if path.suffix.lower() == ".png":
        return load_image(path, max_pixels)
    with open_regular(path) as (file, size):
        if size > png_byte_limit(max_pixels):
            raise BadInput(path, f"{size} bytes, more than an image of at most {max_pixels} "
                           "pixels takes (--max-pixels)")
        data = file.read(size)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype not in (np.uint8, np.uint16):
        raise BadInput(path, "unreadable, truncated or not an 8- or 16-bit image "
                       "(the decoder failed)")
    height, width = pixels.shape[:2]
    if height * width > max_pixels:
        raise BadInput(path, f"{width} x {height} = {height * width} pixels exceeds the "
                       f"limit of {max_pixels} (--max-pixels)")
    return to_rgb8(pixels)


def folder_cases(files: list[Path], with_ela: bool,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Case]:
    """A case per file; one that cannot be read carries its problem instead of pixels."""
    for path in files:
        try:
            image = read_image(path, max_pixels)
        except BadInput as exc:
            yield Case(path.stem, None, problem=exc)
            continue
        yield Case(path.stem, image, compute_ela(image) if with_ela else None)


def store_split(store: Path, split: str, with_ela: bool,
                storage: storages.StorageSettings | None = None) -> tuple[int, Iterator[Case]]:
    """How many rows a split of the store has, and their cases."""
    from engine.store import open_store, read_meta   # here: --images runs without Zarr
    from trainers.score import split_rows

    rows = split_rows(read_meta(open_store(store, storage=storage)), split)
    return len(rows), store_cases(store, rows, with_ela, storage)


def store_cases(store, rows: np.ndarray, with_ela: bool,
                storage: storages.StorageSettings | None = None) -> Iterator[Case]:
    """Cases of store rows, named as the solution writer names them."""
    from engine.reader import WindowReader   # here: --images runs without Zarr
    from engine.store import ela_path, image_path
    from trainers.score import store_case_ids

    reader = WindowReader(store, storage=storage)   # refuses missing or corrupt chunks (StoreDamaged)
    names = store_case_ids(reader.meta["case_id"], rows)
    for name, row in zip(names, rows):
        image = reader.read_array(image_path(int(row)))
        ela = reader.read_array(ela_path(int(row))) if with_ela else None
        yield Case(name, image, ela, int(row))


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def batch_probabilities(ensemble: Ensemble, batch: list[Case], tta: bool = False,
                        specialist_view: str = DEFAULT_SPECIALIST_VIEW) -> Probabilities:
    """Each member's probabilities for a batch of readable cases (Ensemble.probabilities)."""
    elas = [c.ela for c in batch] if ensemble.needs_ela else None
    return ensemble.probabilities([c.image for c in batch], elas, tta, specialist_view)


def predict_batches(ensemble: Ensemble, cases: Iterable[Case], tta: bool = False,
                    batch_size: int = 4, specialist_view: str = DEFAULT_SPECIALIST_VIEW,
                    ) -> Iterator[tuple[list[Case], Probabilities]]:
    """Batches of readable cases with each member's probabilities."""
    for batch in batched(cases, batch_size):
        yield batch, batch_probabilities(ensemble, batch, tta, specialist_view)


def batch_instances(finals: list[np.ndarray], post: PostProcess) -> list[list[np.ndarray]]:
    """Instance masks of each image from its final probability map (Ensemble.combine)."""
    from trainers.ensemble import instances

    return [instances(final, post) for final in finals]


def predict_instances(ensemble: Ensemble, cases: Iterable[Case], post: PostProcess,
                      tta: bool = False, batch_size: int = 4,
                      specialist_view: str = DEFAULT_SPECIALIST_VIEW,
                      ) -> Iterator[tuple[str, list[np.ndarray]]]:
    """(case id, instance masks at the original size) for every case, in order;
    a case that could not be read has none, as an authentic image has none
    (the competition wants a row for every id)."""
    for batch in batched(cases, batch_size):
        readable = [case for case in batch if case.problem is None]
        found = iter(batch_instances(ensemble.combine(batch_probabilities(
            ensemble, readable, tta, specialist_view)), post) if readable else [])
        for case in batch:
            yield case.case_id, [] if case.problem else next(found)


def write_submission(results: Iterable[tuple[str, list[np.ndarray]]], path: str | Path) -> int:
    """Write `case_id,annotation` rows, whole or not at all (common/atomic.py);
    returns how many."""
    count = 0
    try:
        with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(SUBMISSION_COLUMNS)
            for case_id, masks in results:
                writer.writerow([case_id, encode_annotation(masks)])
                count += 1
    except OSError as exc:   # a full disk's error names no file: say which
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, f"{path}: cannot write the submission ({exc.strerror}); "
                      "an earlier file there is kept") from None
    return count


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def member_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("--members needs at least one member name")
    return names


def add_ensemble_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by predict and evaluate: which checkpoints, which rows
    of a store, post-processing, TTA, batching and device."""
    parser.add_argument("--split", default="val", choices=["train", "val", "all"],
                        help="with --store: which rows (default val)")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS,
                        help="folder of <member>_best.pth (a run folder's models/) or of exported "
                             "<member>.safetensors + .json (trainers/export.py), either per member "
                             f"(default {DEFAULT_MODELS})")
    parser.add_argument("--members", type=member_names, default=ALL_MEMBERS,
                        help=f"comma-separated subset (default all: {','.join(ALL_MEMBERS)})")
    modes = ", ".join(f"{name} {p.threshold}/{p.min_area}" for name, p in MODES.items())
    parser.add_argument("--mode", choices=list(MODES), default="default",
                        help=f"threshold/min area at 512 px: {modes}")
    parser.add_argument("--threshold", type=float, help="overrides the mode's threshold")
    parser.add_argument("--min-area", type=int, help="overrides the mode's minimum area "
                        "(pixels at 512 x 512, scaled to each image's area)")
    add_specialist_view_argument(parser)
    parser.add_argument("--tta", action="store_true", help="average with flipped inputs")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: CUDA where present (default)")


def ensemble_from_args(args: argparse.Namespace) -> tuple[PostProcess, Ensemble]:
    """The post-processing and the loaded members that add_ensemble_options asked for."""
    from trainers.ensemble import Ensemble

    post = MODES[args.mode]
    if args.threshold is not None:
        post = replace(post, threshold=args.threshold)
    if args.min_area is not None:
        post = replace(post, min_area=args.min_area)
    return post, Ensemble.load(args.models, args.members, resolve_device(args.device))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # A short usage line: an argument error is two lines, not the whole option list.
    parser = argparse.ArgumentParser(usage="%(prog)s (--images DIR | --store STORE) [--out CSV] "
                                           "[options; see --help]",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path,
                        help="folder of images, PNG, JPEG, TIFF, BMP, WebP... (case id = file stem)")
    source.add_argument("--store", type=storages.location,
                        help="forgery store to predict a split of (a path or a URL)")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"),
                        help="the CSV to write (default submission.csv); replaced only "
                             "when complete")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help="with --images: an image with more pixels is not read, as in the "
                             f"build (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first image that cannot be read, or --images entry "
                             "that is not an image file (exit 2, nothing written), instead of "
                             "writing 'authentic' for it or skipping it")
    add_ensemble_options(parser)
    storages.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; name the CSV to write, "
                     f"e.g. {args.out / 'submission.csv'}")
    return args


def reported(cases: Iterable[Case], unreadable: list[Case], strict: bool) -> Iterator[Case]:
    """The cases, with a line for each one that could not be read (kept in
    `unreadable`); strict stops at the first."""
    for case in cases:
        if case.problem is not None:
            if strict:
                raise case.problem
            tqdm.write(f"warning: {case.problem}; its row says {AUTHENTIC!r}", file=sys.stderr)
            unreadable.append(case)
        yield case


def user_errors() -> tuple[type[Exception], ...]:
    """What main reports as one `error:` line, exit 2. The store's errors only
    once its module is imported: --images never imports it (nor Zarr), so
    none can have been raised."""
    store = sys.modules.get("engine.store")
    return (CheckpointError, BadInput, OSError, ValueError, storages.StorageUnavailable) + \
        ((store.StoreError,) if store else ())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unreadable: list[Case] = []
    try:
        if args.images:   # listed before the models load: a wrong folder is named at once
            files, skipped = image_files(args.images)
            for problem in skipped:
                if args.strict:
                    raise problem
                print(f"warning: {problem}; skipped, no row", file=sys.stderr)
        post, ensemble = ensemble_from_args(args)
        if args.images:
            total, cases = len(files), folder_cases(files, ensemble.needs_ela, args.max_pixels)
        else:
            total, cases = store_split(args.store, args.split, ensemble.needs_ela,
                                       storages.StorageSettings.from_args(args))
        cases = reported(tqdm(cases, total=total, desc="predict", unit="img"), unreadable,
                         args.strict)
        started = time.perf_counter()
        count = write_submission(predict_instances(ensemble, cases, post, args.tta,
                                                   args.batch_size, args.specialist_view),
                                 args.out)
        seconds = time.perf_counter() - started
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} rows to {args.out} (members: {', '.join(args.members)}; specialist "
          f"view {args.specialist_view}; threshold {post.threshold}, min area {post.min_area} "
          f"px at 512; {seconds / max(count, 1):.2f} s per image, reading included)")
    if unreadable:
        print(f"warning: {len(unreadable)} of {count} images could not be read (named above); "
              f"their rows say {AUTHENTIC!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
