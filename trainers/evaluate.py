"""The ensemble on a store split: score, recall per size class, false positives, Dice, MCC.

    python trainers/evaluate.py --store data/store.zarr --models models/
        [--members a,b,...] [--mode default] [--threshold T] [--min-area A] [--tta]
        [--specialist-view tiled|whole] [--split val] [--out runs/evaluate]

Member probabilities are computed once per image (the specialist on tiles of
the full-resolution image by default, --specialist-view; trainers/tiling.py);
from them the full ensemble and, when the specialist is among the members,
the ensemble without it, which shows what the specialist adds. For each:
- the competition score (trainers/score.py's metric);
- image-level detection recall per size class: a forged image counts as
  detected when a predicted instance overlaps its forged pixels;
- the false-positive rate on authentic images (any instance predicted);
- Dice and MCC of the predicted union mask against the true union mask,
  pooled over all pixels and averaged per image (trainers/metrics.py);
- the seconds per image its members' forward passes took (tiling included).
Tables go to stdout; OUT/evaluation.png draws them, every bar labelled with its
value, the higher-is-better figures in one panel and the false-positive rate
(lower is better) in another; OUT/predictions.png shows the validation
images worst-scored first (up to 16), each with the true mask (green), the
ensemble's (red) and the specialist's own (blue) predicted masks outlined;
OUT/solution.csv and
OUT/submission.csv (full ensemble) let trainers/score.py reproduce the score.
Each file is written beside its name and renamed into place when complete
(common/atomic.py), so a failed or killed run leaves earlier files whole.
User errors print one `error:` line and exit 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from engine.recipes import SIZE_CLASS_EDGES, SIZE_CLASS_NAMES
from engine import storage as storages
from engine.reader import WindowReader
from engine.store import StoreError
from common.atomic import atomic_open
from trainers.run_folder import CheckpointError
# trainers/ensemble.py (torch) comes with a loaded ensemble: --help needs only the modes
from trainers.postprocess import MODES, PostProcess
from common.help_format import HelpFormatter
from trainers.metrics import summarize
from trainers.predict import (
    add_ensemble_options, batch_instances, ensemble_from_args, predict_batches, store_cases,
    write_submission,
)
from trainers.score import ScoreError, image_score, open_split, true_instances, write_solution
from trainers.tiling import DEFAULT_SPECIALIST_VIEW

if TYPE_CHECKING:
    from trainers.ensemble import Ensemble

FULL = "ensemble"
WITHOUT_SPECIALIST = "without specialist"
FORGED_CLASSES = SIZE_CLASS_NAMES[1:]


@dataclass
class Report:
    """Per-image outcomes of one variant of the ensemble."""

    scores: list[float] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)   # tp, fp, fn, tn per image
    size_class: list[int] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)        # any instance predicted
    detected: list[bool] = field(default_factory=list)       # an instance overlaps the forgery
    seconds: float = 0.0     # in its members' forward passes (and tiling), all images

    def add(self, true: list[np.ndarray], pred: list[np.ndarray], size_class: int,
            shape: tuple[int, int]) -> None:
        truth = np.logical_or.reduce(true) if true else np.zeros(shape, bool)
        guess = np.logical_or.reduce(pred) if pred else np.zeros(shape, bool)
        tp = np.count_nonzero(truth & guess)
        fp, fn = np.count_nonzero(guess) - tp, np.count_nonzero(truth) - tp
        self.counts.append(np.array([tp, fp, fn, truth.size - tp - fp - fn], np.int64))
        self.scores.append(image_score(true, pred))
        self.size_class.append(size_class)
        self.flagged.append(bool(pred))
        self.detected.append(tp > 0)

    def score(self) -> float:
        return float(np.mean(self.scores))

    def recall_by_class(self) -> dict[str, tuple[int, int]]:
        """{size class: (detected, images)} of the forged classes."""
        classes, detected = np.array(self.size_class), np.array(self.detected)
        return {name: (int(detected[classes == k].sum()), int((classes == k).sum()))
                for k, name in enumerate(SIZE_CLASS_NAMES) if k > 0}

    def false_positives(self) -> tuple[int, int]:
        """(authentic images with an instance, authentic images)."""
        authentic = np.array(self.size_class) == 0
        return int(np.array(self.flagged)[authentic].sum()), int(authentic.sum())

    def pixel_metrics(self) -> dict[str, float]:
        return summarize(np.stack(self.counts))

    def seconds_per_image(self) -> float:
        return self.seconds / len(self.scores) if self.scores else float("nan")


def variants(ensemble: Ensemble) -> dict[str, tuple[str, ...]]:
    """The full ensemble, plus the ensemble without union members when both kinds are present."""
    names = tuple(m.name for m in ensemble.members)
    averaged = tuple(n for n in names if ensemble.recipes[n].ensemble_role == "average")
    if averaged and averaged != names:
        return {FULL: names, WITHOUT_SPECIALIST: averaged}
    return {FULL: names}


TILE = 192                  # px, the longer side of an image in predictions.png
LABEL_HEIGHT = 18
GRID_COLUMNS = 4
GRID_IMAGES = 16
TRUE, SPECIALIST = "true", "specialist"
OUTLINES = {TRUE: (0, 200, 0), FULL: (230, 0, 0), SPECIALIST: (0, 90, 255)}   # RGB


@dataclass
class Shown:
    """One image of predictions.png: a thumbnail and its masks at the same size."""

    case_id: str
    score: float                  # the full ensemble's image score
    image: np.ndarray             # uint8 RGB, longer side TILE
    masks: dict[str, np.ndarray]  # OUTLINES name -> bool mask

    @classmethod
    def of(cls, case_id: str, score: float, image: np.ndarray,
           instances: dict[str, list[np.ndarray]]) -> "Shown":
        height, width = image.shape[:2]
        scale = TILE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        masks = {name: cv2.resize(np.logical_or.reduce(found).astype(np.uint8) if found else
                                  np.zeros((height, width), np.uint8), size,
                                  interpolation=cv2.INTER_NEAREST).astype(bool)
                 for name, found in instances.items()}
        return cls(case_id, score, cv2.resize(image, size, interpolation=cv2.INTER_AREA), masks)

    def worst_first(self) -> tuple[float, int]:
        """Sort key: the lowest score first; of equal scores, the larger forgery."""
        return self.score, -int(self.masks[TRUE].sum())

    def tile(self) -> np.ndarray:
        """The thumbnail on a TILE square with each mask's outline, its id and score below."""
        out = np.full((TILE + LABEL_HEIGHT, TILE, 3), 255, np.uint8)
        drawn = np.ascontiguousarray(self.image[..., :3])
        for name, mask in self.masks.items():
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(drawn, contours, -1, OUTLINES[name], 1)
        out[:drawn.shape[0], :drawn.shape[1]] = drawn
        cv2.putText(out, f"{self.case_id[:18]} {self.score:.2f}", (2, TILE + LABEL_HEIGHT - 5),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        return out


def draw_predictions(shown: list[Shown], path: Path, limit: int = GRID_IMAGES) -> list[str]:
    """A grid (GRID_COLUMNS wide) of the `limit` worst-scored images, worst
    first, row by row, written to `path` as PNG; returns their case ids in
    that order."""
    chosen = sorted(shown, key=Shown.worst_first)[:limit]
    rows = max(1, math.ceil(len(chosen) / GRID_COLUMNS))
    grid = np.full((rows * (TILE + LABEL_HEIGHT), GRID_COLUMNS * TILE, 3), 255, np.uint8)
    for k, item in enumerate(chosen):
        y, x = divmod(k, GRID_COLUMNS)
        grid[y * (TILE + LABEL_HEIGHT):(y + 1) * (TILE + LABEL_HEIGHT), x * TILE:(x + 1) * TILE] = item.tile()
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode the grid as PNG")
    with atomic_open(path, "wb") as handle:
        handle.write(encoded.tobytes())
    return [item.case_id for item in chosen]


def specialists(ensemble: Ensemble) -> tuple[str, ...]:
    """The members united with the averaged ones (the specialist)."""
    return tuple(m.name for m in ensemble.members if ensemble.recipes[m.name].ensemble_role == "union")


def evaluate(ensemble: Ensemble, store: str | Path, split: str = "val",
             post: PostProcess = MODES["default"], tta: bool = False, batch_size: int = 4,
             submission: Path | None = None, shown: list[Shown] | None = None,
             storage: storages.StorageSettings | None = None,
             specialist_view: str = DEFAULT_SPECIALIST_VIEW) -> dict[str, Report]:
    """Reports of every variant over a store split (a store URL reached with
    `storage`), the specialist seeing `specialist_view` ("tiled" or
    "whole", trainers/tiling.py); optionally writes the full ensemble's
    submission CSV, and appends each image's thumbnail and masks (true,
    ensemble, specialist) to `shown` for draw_predictions."""
    group, meta, rows = open_split(store, split, storage)
    truth_reader = WindowReader(group, storage=storage)
    chosen = variants(ensemble)
    reports = {name: Report() for name in chosen}
    predicted = []
    # what each batch's probabilities are combined as: every variant, and the specialist alone
    combined = dict(chosen)
    if shown is not None and specialists(ensemble):
        combined[SPECIALIST] = specialists(ensemble)
    cases = tqdm(store_cases(store, rows, ensemble.needs_ela, storage), total=len(rows),
                 desc="evaluate", unit="img")
    for batch, probs in predict_batches(ensemble, cases, tta, batch_size, specialist_view):
        truths = [true_instances(truth_reader, case.row) for case in batch]
        found = {name: batch_instances(ensemble.combine(probs, members), post)
                 for name, members in combined.items()}
        for name, members in chosen.items():
            reports[name].seconds += sum(probs.seconds[m] for m in members)
            for case, true, pred in zip(batch, truths, found[name]):
                reports[name].add(true, pred, int(meta["size_class"][case.row]),
                                  case.image.shape[:2])
        predicted.extend(zip((case.case_id for case in batch), found[FULL]))
        if shown is not None:
            scores = reports[FULL].scores[-len(batch):]
            for k, (case, true) in enumerate(zip(batch, truths)):
                outlines = {name: found[name][k] for name in (FULL, SPECIALIST) if name in found}
                shown.append(Shown.of(case.case_id, scores[k], case.image, {TRUE: true, **outlines}))
    if submission is not None:
        write_submission(predicted, submission)
    return reports


def _percent(hits: int, total: int) -> str:
    return f"{100 * hits / total:5.1f}% ({hits}/{total})" if total else "  -"


def format_tables(reports: dict[str, Report]) -> str:
    names = list(reports)
    width = max(22, *(len(n) + 2 for n in names))
    header = f"{'':<24}" + "".join(f"{n:>{width}}" for n in names)
    lines = ["Detection recall per size class (detected = an instance overlaps the forgery)",
             header]
    recalls = {n: r.recall_by_class() for n, r in reports.items()}
    for cls in FORGED_CLASSES:
        lines.append(f"{cls:<24}" + "".join(f"{_percent(*recalls[n][cls]):>{width}}" for n in names))
    lines += ["", "Summary", header]
    metrics = {n: r.pixel_metrics() for n, r in reports.items()}
    rows = [("competition score", {n: f"{r.score():.4f}" for n, r in reports.items()}),
            ("false positives (authentic)",
             {n: _percent(*r.false_positives()) for n, r in reports.items()})]
    for key, label in (("pooled_dice", "Dice (pooled)"), ("pooled_mcc", "MCC (pooled)"),
                       ("mean_image_dice", "Dice (mean per image)"),
                       ("mean_image_mcc", "MCC (mean per image)")):
        rows.append((label, {n: f"{metrics[n][key]:.4f}" for n in names}))
    rows.append(("seconds per image",
                 {n: f"{r.seconds_per_image():.3f}" for n, r in reports.items()}))
    lines += [f"{label:<24}" + "".join(f"{vals[n]:>{width}}" for n in names) for label, vals in rows]
    return "\n".join(lines)


def _class_range(k: int) -> str:
    """Forged area share of size class k (1 = tiny), e.g. "0.5-2 %"."""
    edges = [f"{100 * e:g}" for e in SIZE_CLASS_EDGES]
    if k == 1:
        return f"< {edges[0]} %"
    return f"{edges[k - 2]}-{edges[k - 1]} %" if k <= len(edges) else f">= {edges[-1]} %"


def _images(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


def _panel(axes, bars: dict[str, list[float]], categories: list[str], title: str,
           ylabel: str) -> None:
    """Grouped bars, one colour per variant, each labelled with its value; a
    zero bar shows its 0 label, an undefined one (no images) "n/a"."""
    width = 0.8 / len(bars)
    places = np.arange(len(categories))
    for k, (name, values) in enumerate(bars.items()):
        values = np.asarray(values, float)
        drawn = axes.bar(places + (k - (len(bars) - 1) / 2) * width, np.nan_to_num(values),
                         width, label=name, color=f"C{k}")
        axes.bar_label(drawn, [f"{v:.2f}" if np.isfinite(v) else "n/a" for v in values],
                       padding=2, fontsize=8)
    lowest = min(0.0, np.nanmin([v for values in bars.values() for v in values] + [0.0]))
    axes.set(title=title, ylabel=ylabel, ylim=(lowest - 0.12 * (lowest < 0), 1.12),
             xticks=places)
    axes.set_xticklabels(categories, fontsize=8)
    axes.axhline(0, color="0.3", linewidth=0.8)


def draw(reports: dict[str, Report], path: Path, title: str = "Evaluation") -> Figure:
    """The reports' figures as labelled bars: score, detection recall per size
    class, pooled Dice and MCC (higher is better) beside the false-positive
    rate on authentic images (lower is better), every variant side by side."""
    first = next(iter(reports.values()))
    totals = {name: total for name, (_, total) in first.recall_by_class().items()}
    higher = ["Competition\nscore"]
    higher += [f"Recall: {name}\n{_class_range(k)} area\n{_images(totals[name])}"
               for k, name in enumerate(FORGED_CLASSES, 1)]
    higher += ["Dice\n(pooled over\nall pixels)", "MCC\n(pooled over\nall pixels)"]
    authentic = first.false_positives()[1]
    good, bad = {}, {}
    for name, report in reports.items():
        metrics = report.pixel_metrics()
        good[name] = [report.score(),
                      *(h / t if t else np.nan for h, t in report.recall_by_class().values()),
                      metrics["pooled_dice"], metrics["pooled_mcc"]]
        hits, total = report.false_positives()
        bad[name] = [hits / total if total else np.nan]
    fig = Figure(figsize=(14, 5.2))   # no pyplot: no global figure state, no GUI backend
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [len(higher), 1.6]})
    _panel(left, good, higher, "Higher is better: score, detection recall per size class, "
           "Dice, MCC", "value (1 = perfect)")
    _panel(right, bad, [f"Authentic images\nwith an instance\n{_images(authentic)}"],
           "Lower is better:\nfalse-positive rate", "share of authentic images (0 = none)")
    left.set_xlabel("metric (recall: an instance overlaps the forgery)")
    right.set_xlabel("false positives")
    fig.suptitle(title)
    fig.legend(*left.get_legend_handles_labels(), loc="upper right", ncols=len(reports))
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    return fig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # A short usage line: an argument error is two lines, not the whole option list.
    parser = argparse.ArgumentParser(usage="%(prog)s --store STORE [--models DIR] [--out DIR] "
                                           "[options; see --help]",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--store", type=storages.location, required=True,
                        help="the store whose --split is evaluated (a path or a URL)")
    parser.add_argument("--out", type=Path, default=Path("runs/evaluate"),
                        help="folder for evaluation.png, solution.csv and submission.csv")
    add_ensemble_options(parser)
    storages.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name the folder to write the results in")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        post, ensemble = ensemble_from_args(args)
        storage = storages.StorageSettings.from_args(args)
        shown = []
        reports = evaluate(ensemble, args.store, args.split, post, args.tta, args.batch_size,
                           submission=args.out / "submission.csv", shown=shown, storage=storage,
                           specialist_view=args.specialist_view)
        draw_predictions(shown, args.out / "predictions.png")
        write_solution(args.store, args.out / "solution.csv", args.split, storage)
        setting = (f"{args.split} split of {args.store}; specialist view "
                   f"{args.specialist_view}; threshold {post.threshold}, min area "
                   f"{post.min_area} px at 512" + ("; flip TTA" if args.tta else ""))
        draw(reports, args.out / "evaluation.png", setting)
    except (CheckpointError, StoreError, storages.StorageUnavailable, ScoreError, OSError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{setting}; members: {', '.join(args.members)}")
    print(format_tables(reports))
    print(f"figures: {args.out / 'evaluation.png'}, {args.out / 'predictions.png'} (worst first); score again with `python trainers/score.py "
          f"--solution {args.out / 'solution.csv'} --submission {args.out / 'submission.csv'}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
