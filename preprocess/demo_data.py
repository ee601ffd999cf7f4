"""Built-in demo data: a Kaggle-layout folder made from scikit-image's images.

    python preprocess/demo_data.py --out data/demo [--count 160] [--seed 0]
        [--min-side 64] [--max-side 4000] [--supplemental N]
        [--forgery copy_move|fine_trace]

Figures are composed from 1 to 6 panels cut from the real scientific images
that scikit-image ships (cells, IHC, retina, Hubble deep field, moon, ...),
rescaled, on a white background, in grey or RGB. About 54 % of the images are
forged with synthetic copy-move forgeries: a region of the same figure pasted
elsewhere, sometimes rotated, rescaled, blended or JPEG-recompressed; one mask
layer per pasted region (1 to 3), written as (N, H, W) uint8 0/1. The forged
area ratios follow FORGED_AREA_SHARES (the user's table). Some authentic and
forged images share a case id, as in the competition; some images are written
as 16-bit or RGBA PNGs so the builder's conversion path is exercised.

--forgery fine_trace writes the study set of benchmarks/quality_study.py
instead (docs/performance.md, "Model quality"): the
same figures and masks, but a forged region keeps its own content and only
gains a zero-sum checkerboard of +-FINE_TRACE_LEVEL grey levels, so that its
one trace is finer than the step of any whole-image downscale by 2 or more,
which averages it away; every figure's levels are first brought into
[FINE_TRACE_LEVEL, 255 - FINE_TRACE_LEVEL] (authentic ones too), so the
trace is never clipped.

Every image is drawn from its own generator seeded by (seed, image index), so
the output depends on the seed and the arguments only.
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from tqdm import tqdm

from engine.recipes import SIZE_CLASS_EDGES
from engine.store import VAL_FRACTION, size_class, split_of

# scikit-image images that load without a download (checked against 0.26).
SCIENCE_IMAGES = (
    "cell", "immunohistochemistry", "retina", "microaneurysms", "hubble_deep_field",
    "moon", "coins", "brick", "gravel", "grass", "page", "text", "clock", "camera",
    "shepp_logan_phantom", "binary_blobs",
)

# Share of forged images per size class (tiny, small, medium, large, xlarge).
FORGED_AREA_SHARES = (0.24, 0.25, 0.16, 0.20, 0.15)
# Area-ratio bounds beyond the table's edges: the smallest and largest forgery.
MIN_AREA_RATIO = 0.0005
MAX_AREA_RATIO = 0.30
MIN_REGION_PIXELS = 16
# Case kinds: an authentic/forged pair sharing an id, forged only, authentic
# only. Images per case = 1.3, forged images = 0.70 / 1.3 = 54 %.
CASE_KIND_SHARES = {"pair": 0.30, "forged": 0.40, "authentic": 0.30}
# Most sides lie in this range; the rest anywhere in [min_side, max_side].
TYPICAL_SIDE = (300, 2000)
TYPICAL_SHARE = 0.8
GREY_SHARE = 0.35
PNG_FORMAT_SHARES = {"8bit": 0.8, "16bit": 0.1, "rgba": 0.1}
DEFAULT_COUNT = 160
# What a forged region holds: content copied from elsewhere in the figure
# (the demo), or its own content with a trace finer than the resize step (the study set).
FORGERY_KINDS = ("copy_move", "fine_trace")
# fine_trace: the trace's amplitude in grey levels (strong at full resolution, where a
# 3x3 filter sees it; gone after a whole-image downscale by 2 or more)
FINE_TRACE_LEVEL = 12


@functools.cache
def science_images() -> tuple[np.ndarray, ...]:
    """The source images as uint8 RGB arrays (loaded once per process)."""
    images = []
    for name in SCIENCE_IMAGES:
        if name == "binary_blobs":
            img = skimage.data.binary_blobs(length=384, rng=0)
        else:
            img = getattr(skimage.data, name)()
        if img.dtype != np.uint8:
            img = (img.astype(np.float64) / max(float(img.max()), 1e-12) * 255).round().astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        images.append(np.ascontiguousarray(img[:, :, :3]))
    return tuple(images)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def figure_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(height, width): most sides in TYPICAL_SIDE, aspect ratio 1:2 to 2:1."""
    lo, hi = max(min_side, TYPICAL_SIDE[0]), min(max_side, TYPICAL_SIDE[1])
    if rng.random() >= TYPICAL_SHARE or lo >= hi:
        lo, hi = min_side, max_side
    side = _log_uniform(rng, lo, hi)
    other = side * _log_uniform(rng, 0.5, 2.0)
    h, w = (side, other) if rng.random() < 0.5 else (other, side)
    return int(np.clip(round(h), min_side, max_side)), int(np.clip(round(w), min_side, max_side))


def compose_figure(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) uint8 figure: a grid of panels on white."""
    rows = int(rng.integers(1, 3)) if height >= 160 else 1
    cols = int(rng.integers(1, 4)) if width >= 240 else 1
    gap = max(1, min(height, width) // 50)
    figure = np.full((height, width, 3), 255, np.uint8)
    ys = np.linspace(0, height, rows + 1).astype(int)
    xs = np.linspace(0, width, cols + 1).astype(int)
    sources = science_images()
    for r in range(rows):
        for c in range(cols):
            y0, y1 = ys[r] + (gap if r else 0), ys[r + 1] - (gap if r < rows - 1 else 0)
            x0, x1 = xs[c] + (gap if c else 0), xs[c + 1] - (gap if c < cols - 1 else 0)
            src = sources[int(rng.integers(len(sources)))]
            figure[y0:y1, x0:x1] = _panel(rng, src, y1 - y0, x1 - x0)
    if rng.random() < GREY_SHARE:
        grey = cv2.cvtColor(figure, cv2.COLOR_RGB2GRAY)
        figure = np.repeat(grey[:, :, None], 3, axis=2)
    return figure


def _panel(rng: np.random.Generator, src: np.ndarray, h: int, w: int) -> np.ndarray:
    """A random crop of src (40-100 % of each side) resized to (h, w)."""
    sh, sw = src.shape[:2]
    ch, cw = int(sh * rng.uniform(0.4, 1.0)), int(sw * rng.uniform(0.4, 1.0))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    crop = src[y:y + ch, x:x + cw]
    interp = cv2.INTER_AREA if h * w < ch * cw else cv2.INTER_LINEAR
    return cv2.resize(crop, (w, h), interpolation=interp)


def forgery_masks(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(N, H, W) uint8 0/1 masks of 1-3 disjoint regions whose union's area
    ratio falls in a size class drawn from FORGED_AREA_SHARES."""
    k = int(rng.choice(len(FORGED_AREA_SHARES), p=FORGED_AREA_SHARES))
    bounds = (MIN_AREA_RATIO,) + SIZE_CLASS_EDGES + (MAX_AREA_RATIO,)
    pixels = height * width
    lo = max(bounds[k], MIN_REGION_PIXELS / pixels)
    hi = bounds[k + 1]
    for _ in range(100):  # redraw until disjoint regions land in class k
        target = _log_uniform(rng, lo, hi) * pixels
        n = int(min(rng.integers(1, 4), max(1, target // MIN_REGION_PIXELS)))
        shares = rng.uniform(0.5, 1.5, n)
        masks = _draw_regions(rng, height, width, target * shares / shares.sum())
        if masks is not None and size_class(masks.max(axis=0).sum() / pixels) == k + 1:
            return masks
    raise RuntimeError(f"no {k + 1}-class forgery fits a {height} x {width} image")


def _draw_regions(rng, height, width, areas) -> np.ndarray | None:
    """One layer per area: an ellipse or rectangle of that area, placed where
    it overlaps no earlier one; None when some region finds no such place."""
    masks = np.zeros((len(areas), height, width), np.uint8)
    union = np.zeros((height, width), np.uint8)
    for i, area in enumerate(areas):
        ellipse = rng.random() < 0.5
        aspect = _log_uniform(rng, 0.5, 2.0)
        box_area = area * (4 / np.pi if ellipse else 1.0)
        bh = int(np.clip(round(np.sqrt(box_area * aspect)), 2, height))
        bw = int(np.clip(round(box_area / bh), 2, width))
        for _ in range(20):
            layer = np.zeros((height, width), np.uint8)
            y, x = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, width - bw + 1))
            if ellipse:
                cv2.ellipse(layer, ((x + bw / 2 - 0.5, y + bh / 2 - 0.5), (bw, bh), 0), 1, -1)
            else:
                layer[y:y + bh, x:x + bw] = 1
            if layer.any() and not (layer & union).any():
                break
        else:
            return None
        masks[i] = layer
        union |= layer
    return masks


def paste_copies(rng: np.random.Generator, figure: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The figure with each mask region replaced by content copied from
    elsewhere in the same figure, sometimes rotated, rescaled, blended or
    JPEG-recompressed."""
    forged = figure.copy()
    h, w = figure.shape[:2]
    for layer in masks:
        ys, xs = np.nonzero(layer)
        y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        bh, bw = y1 - y0, x1 - x0
        scale = rng.uniform(0.7, 1.4) if rng.random() < 0.3 else 1.0
        sh, sw = min(h, max(1, round(bh / scale))), min(w, max(1, round(bw / scale)))
        sy, sx = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
        patch = figure[sy:sy + sh, sx:sx + sw]
        if rng.random() < 0.3:
            angle = 90.0 * rng.integers(1, 4) if rng.random() < 0.5 else rng.uniform(-30, 30)
            rot = cv2.getRotationMatrix2D(((sw - 1) / 2, (sh - 1) / 2), float(angle), 1.0)
            patch = cv2.warpAffine(patch, rot, (sw, sh), borderMode=cv2.BORDER_REFLECT)
        patch = cv2.resize(patch, (int(bw), int(bh)), interpolation=cv2.INTER_LINEAR)
        if rng.random() < 0.25:
            ok, jpeg = cv2.imencode(".jpg", patch, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 91))])
            patch = cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED).reshape(patch.shape)
        dest = forged[y0:y1, x0:x1]
        if rng.random() < 0.25:
            alpha = rng.uniform(0.6, 0.95)
            patch = cv2.addWeighted(patch, alpha, dest, 1 - alpha, 0)
        region = layer[y0:y1, x0:x1].astype(bool)
        dest[region] = patch[region]
    return forged


def trace_headroom(figure: np.ndarray) -> np.ndarray:
    """The figure's levels mapped linearly from [0, 255] into [FINE_TRACE_LEVEL,
    255 - FINE_TRACE_LEVEL], so that adding the fine trace never clips (a clipped
    trace would no longer average to zero, and would show at any scale)."""
    span = (255 - 2 * FINE_TRACE_LEVEL) / 255
    return np.round(FINE_TRACE_LEVEL + figure.astype(np.float32) * span).astype(np.uint8)


def fine_trace(rng: np.random.Generator, figure: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The figure (levels within trace_headroom's range) with a zero-sum pattern
    added inside the masks: every 2x2 block at even coordinates gets
    +-FINE_TRACE_LEVEL as [[+1, -1], [-1, +1]], its sign drawn per block
    (re-noising, with the noise's block means zero). An area-averaging
    downscale by 2 or more cancels it where blocks fall whole into an output
    pixel; partial blocks (a factor that is not even, the region's border)
    leave a little (tests/test_demo_data.py measures how little)."""
    height, width = figure.shape[:2]
    signs = rng.choice(np.array([-1, 1], np.int16), size=((height + 1) // 2, (width + 1) // 2))
    checker = np.array([[1, -1], [-1, 1]], np.int16) * FINE_TRACE_LEVEL
    pattern = np.kron(signs, checker)[:height, :width]
    region = masks.max(axis=0).astype(bool)
    forged = figure.astype(np.int16)
    forged[region] += pattern[region][:, None]
    return forged.astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray, png_format: str) -> None:
    """Write an RGB figure as 8-bit grey/RGB, 16-bit or RGBA PNG. Grey figures
    (equal channels) are written with one channel; 16-bit values are v * 257,
    so the builder's conversion round(v / 257) restores them exactly."""
    grey = bool((rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all())
    pixels = rgb[:, :, 0] if grey else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if png_format == "16bit":
        pixels = pixels.astype(np.uint16) * 257
    elif png_format == "rgba":
        bgr = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR) if grey else pixels
        pixels = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    if not cv2.imwrite(str(path), pixels):
        raise OSError(f"{path}: OpenCV could not write the PNG")


@dataclass(frozen=True)
class DemoImage:
    case_id: str
    forged: bool
    folder: str   # "train_images/authentic", "train_images/forged" or "supplemental_images"


def plan_images(count: int, supplemental: int, seed: int) -> list[DemoImage]:
    """Which images to write: case kinds drawn from CASE_KIND_SHARES until
    `count` training images, then `supplemental` forged supplemental images."""
    rng = np.random.default_rng([seed, 0])
    ids = (10000 + rng.choice(90000, size=count + supplemental, replace=False)).astype(str)
    kinds, shares = zip(*CASE_KIND_SHARES.items())
    plan: list[DemoImage] = []
    case = 0
    while len(plan) < count:
        kind = kinds[rng.choice(len(kinds), p=shares)]
        if kind in ("pair", "authentic"):
            plan.append(DemoImage(ids[case], False, "train_images/authentic"))
        if kind in ("pair", "forged") and len(plan) < count:
            plan.append(DemoImage(ids[case], True, "train_images/forged"))
        case += 1
    plan += [DemoImage(ids[count + i], True, "supplemental_images") for i in range(supplemental)]
    return with_representative_split(plan, seed)


def with_representative_split(plan: list[DemoImage], seed: int) -> list[DemoImage]:
    """The plan with case ids (other 5-digit numbers) that the store's split
    (engine.store.split_of, a hash of the case id) sends to val in the
    share VAL_FRACTION of each kind of case, cases with a forged image and
    authentic-only ones, at least one of a kind of two or more: a hash
    alone would give a small demo no validation image of a kind as often
    as not."""
    cases = list(dict.fromkeys(item.case_id for item in plan))
    forged = {item.case_id for item in plan if item.forged}
    val = set()
    for kind in ([c for c in cases if c in forged], [c for c in cases if c not in forged]):
        share = round(VAL_FRACTION * len(kind))
        val.update(kind[:max(share, 1) if len(kind) >= 2 else share])
    rng = np.random.default_rng([seed, 1])
    need = {1: len(val), 0: len(cases) - len(val)}
    found: dict[int, list[str]] = {0: [], 1: []}
    drawn = set()
    while any(len(found[side]) < need[side] for side in found):
        case_id = str(10000 + int(rng.integers(90000)))
        if case_id not in drawn:
            drawn.add(case_id)
            side = int(split_of(np.array([case_id]))[0])
            if len(found[side]) < need[side]:
                found[side].append(case_id)
    renamed = {case: found[int(case in val)].pop() for case in cases}
    return [replace(item, case_id=renamed[item.case_id]) for item in plan]


def mask_folder(image_folder: str) -> str:
    return "supplemental_masks" if image_folder == "supplemental_images" else "train_masks"


def write_demo(out: Path, count: int = DEFAULT_COUNT, seed: int = 0, min_side: int = 64,
               max_side: int = 4000, supplemental: int | None = None,
               progress: bool = True, forgery: str = "copy_move") -> list[Path]:
    """Write the demo folder under `out`; returns the image paths written.
    A pair (same case id) shares one figure: the forged one is the authentic
    one with copies pasted in (forgery "copy_move") or with the fine trace
    added ("fine_trace")."""
    if not 16 <= min_side <= max_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    if forgery not in FORGERY_KINDS:
        raise ValueError(f"forgery {forgery!r}: choose one of {', '.join(FORGERY_KINDS)}")
    supplemental = count // 10 if supplemental is None else supplemental
    plan = plan_images(count, supplemental, seed)
    formats, format_shares = zip(*PNG_FORMAT_SHARES.items())
    written = []
    figures: dict[str, np.ndarray] = {}
    for index, item in enumerate(tqdm(plan, desc="demo images", disable=not progress)):
        rng = np.random.default_rng([seed, 1, index])
        figure = figures.pop(item.case_id, None)
        if figure is None:
            figure = compose_figure(rng, *figure_size(rng, min_side, max_side))
            if forgery == "fine_trace":
                figure = trace_headroom(figure)
            if not item.forged:  # its forged twin, if any, comes next
                figures[item.case_id] = figure
        folder = out / item.folder
        folder.mkdir(parents=True, exist_ok=True)
        if item.forged:
            masks = forgery_masks(rng, *figure.shape[:2])
            forge = paste_copies if forgery == "copy_move" else fine_trace
            figure = forge(rng, figure, masks)
            mask_dir = out / mask_folder(item.folder)
            mask_dir.mkdir(parents=True, exist_ok=True)
            np.save(mask_dir / f"{item.case_id}.npy", masks)
        path = folder / f"{item.case_id}.png"
        write_png(path, figure, formats[rng.choice(len(formats), p=format_shares)])
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="folder to write")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="training images")
    parser.add_argument("--supplemental", type=int, default=None,
                        help="forged supplemental images (default count // 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=64)
    parser.add_argument("--max-side", type=int, default=4000)
    parser.add_argument("--forgery", choices=FORGERY_KINDS, default="copy_move",
                        help="copy_move: the demo's copy-move forgeries; fine_trace: the "
                             "study set, forgeries whose only trace is finer than a "
                             "whole-image downscale by 2 (docs/performance.md, \"Model quality\")")
    args = parser.parse_args(argv)
    paths = write_demo(args.out, args.count, args.seed, args.min_side, args.max_side,
                       args.supplemental, forgery=args.forgery)
    print(f"wrote {len(paths)} images under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
