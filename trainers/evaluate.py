"""The ensemble on the store's validation split, measured as the user's documents do.

    python trainers/evaluate.py --store data/store.zarr --models models/
        [--members a,b,...] [--mode default] [--threshold T] [--min-area A] [--tta]
        [--split val] [--out runs/evaluate]

Member probabilities are computed once per image; from them the full
ensemble and, when the specialist is among the members, the ensemble without
it ("Performance Analysis" of small_forgery_specialist.md). For each:
- the competition score (trainers/score.py's metric);
- image-level detection recall per size class: a forged image counts as
  detected when a predicted instance overlaps its forged pixels;
- the false-positive rate on authentic images (any instance predicted);
- Dice and MCC of the predicted union mask against the true union mask,
  pooled over all pixels and averaged per image (trainers/metrics.py).
Tables go to stdout; OUT/evaluation.png draws them; OUT/solution.csv and
OUT/submission.csv (full ensemble) let trainers/score.py reproduce the score.
Each file is written beside its name and renamed into place when complete
(trainers/atomic.py), so a failed or killed run leaves earlier files whole.
User errors print one `error:` line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from engine.recipes import SIZE_CLASS_NAMES
from engine.store import StoreError
from trainers.atomic import atomic_open
from trainers.checkpoint import CheckpointError
from trainers.ensemble import MODES, Ensemble, PostProcess
from trainers.metrics import summarize
from trainers.predict import (
    add_ensemble_options, batch_instances, ensemble_from_args, predict_batches, store_cases,
    write_submission,
)
from trainers.score import ScoreError, image_score, open_split, true_instances, write_solution

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


def variants(ensemble: Ensemble) -> dict[str, tuple[str, ...]]:
    """The full ensemble, plus the ensemble without union members when both kinds are present."""
    names = tuple(m.name for m in ensemble.members)
    averaged = tuple(n for n in names if ensemble.recipes[n].ensemble_role == "average")
    if averaged and averaged != names:
        return {FULL: names, WITHOUT_SPECIALIST: averaged}
    return {FULL: names}


def evaluate(ensemble: Ensemble, store: str | Path, split: str = "val",
             post: PostProcess = MODES["default"], tta: bool = False, batch_size: int = 4,
             submission: Path | None = None) -> dict[str, Report]:
    """Reports of every variant over a store split; optionally writes the full
    ensemble's submission CSV."""
    group, meta, rows = open_split(store, split)
    chosen = variants(ensemble)
    reports = {name: Report() for name in chosen}
    predicted = []
    cases = tqdm(store_cases(store, rows, ensemble.needs_ela), total=len(rows),
                 desc="evaluate", unit="img")
    for batch, probs in predict_batches(ensemble, cases, tta, batch_size):
        truths = [true_instances(group, case.row) for case in batch]
        for name, members in chosen.items():
            found = batch_instances(batch, ensemble.combine({m: probs[m] for m in members}), post)
            for case, true, pred in zip(batch, truths, found):
                reports[name].add(true, pred, int(meta["size_class"][case.row]),
                                  case.image.shape[:2])
            if name == FULL:
                predicted.extend(zip((case.case_id for case in batch), found))
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
    lines += [f"{label:<24}" + "".join(f"{vals[n]:>{width}}" for n in names) for label, vals in rows]
    return "\n".join(lines)


def draw(reports: dict[str, Report], path: Path) -> None:
    """Recall per size class and the summary figures as grouped bars."""
    fig = Figure(figsize=(12, 4.5))   # no pyplot: no global figure state, no GUI backend
    left, right = fig.subplots(1, 2)
    bar = 0.8 / len(reports)
    summary_labels = ["score", "FP rate", "Dice", "MCC"]
    for k, (name, report) in enumerate(reports.items()):
        recall = [h / t if t else np.nan for h, t in report.recall_by_class().values()]
        left.bar(np.arange(len(FORGED_CLASSES)) + k * bar, recall, bar, label=name)
        fp_hits, fp_total = report.false_positives()
        metrics = report.pixel_metrics()
        values = [report.score(), fp_hits / fp_total if fp_total else np.nan,
                  metrics["pooled_dice"], metrics["pooled_mcc"]]
        right.bar(np.arange(len(summary_labels)) + k * bar, values, bar, label=name)
    centre = bar * (len(reports) - 1) / 2
    left.set(title="Detection recall per size class", ylim=(0, 1.05),
             xticks=np.arange(len(FORGED_CLASSES)) + centre, xticklabels=FORGED_CLASSES)
    right.set(title="Competition score, false-positive rate, pooled Dice and MCC",
              ylim=(min(0, right.get_ylim()[0]), 1.05),
              xticks=np.arange(len(summary_labels)) + centre, xticklabels=summary_labels)
    left.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # A short usage line: an argument error is two lines, not the whole option list.
    parser = argparse.ArgumentParser(usage="%(prog)s --store STORE [--models DIR] [--out DIR] "
                                           "[options; see --help]",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/evaluate"),
                        help="folder for evaluation.png, solution.csv and submission.csv")
    add_ensemble_options(parser)
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name the folder to write the results in")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        post, ensemble = ensemble_from_args(args)
        reports = evaluate(ensemble, args.store, args.split, post, args.tta, args.batch_size,
                           submission=args.out / "submission.csv")
        write_solution(args.store, args.out / "solution.csv", args.split)
        draw(reports, args.out / "evaluation.png")
    except (CheckpointError, StoreError, ScoreError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.split} split of {args.store}; members: {', '.join(args.members)}; "
          f"threshold {post.threshold}, min area {post.min_area} px at 512"
          + ("; flip TTA" if args.tta else ""))
    print(format_tables(reports))
    print(f"figure: {args.out / 'evaluation.png'}; score again with `python trainers/score.py "
          f"--solution {args.out / 'solution.csv'} --submission {args.out / 'submission.csv'}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
