"""Model quality: what each part of the ensemble buys, measured with 95 % bootstrap intervals.

    python benchmarks/quality_study.py --store data/study.zarr --out runs/quality --quick
    python benchmarks/quality_study.py --store data/store.zarr --out runs/quality-full \\
        [--runs DIR] [--device cuda]

1. Trains what the comparison needs into the run folder RUNS (--runs, by
   default OUT/runs), with trainers/run_ensemble.py's machinery (each member
   by trainers/train.py in its own process, in dependency order; a rerun
   skips finished members and resumes an unfinished one): the general
   (averaged) members, the small-forgery specialist, and, in RUNS/no_mining,
   highres_no_ela's successor (high_recall, which fine-tunes it) once more
   with its hard false-negative mining off (recipe field `mining` None: it
   then samples by forged area only). Members RUNS already holds finished
   are taken as they are (a run_ensemble.py run folder serves).
2. Evaluates on the store's validation split with trainers/evaluate.py, in
   one post-processing mode (--mode), these rows:
     general                the general members averaged (whole image)
     general + specialist   ... united with the specialist on the whole image,
                            and on tiles of the full-resolution image
     specialist             the specialist alone, whole image and tiles
     high_recall            with and without hard false-negative mining, alone
   each with the competition score (trainers/score.py), detection recall per
   size class, the false-positive rate on authentic images, pixel Dice, and
   the discrimination: tiny recall minus the share of authentic images
   flagged (what recall bought without false positives).
3. 95 % intervals: the validation images resampled with replacement
   (--bootstrap times, the same resamples for every row, drawn from
   engine/sampling.py's counter-based generator: the same --seed gives the
   same intervals), each figure's 2.5th and 97.5th percentiles.
4. Writes OUT/quality.json, OUT/quality.md and the chart OUT/quality.png
   (each whole or not at all), and prints the table.

--quick: for a 2-core CPU (measured: 43 minutes of training and 5 of
evaluation under load from other work; docs/performance.md, "Model
quality"): the two general members highres_no_ela and high_recall, a small
encoder (mobilenet_v2) from random weights at 128 px, a few hundred
optimiser steps per member, each scored with its last checkpoint (so few
validations leave little to select from, and the specialist's validation
reads whole images, where the study set's trace is gone); the report states
it all. Without --quick every general member trains with its recipe as it is
(ImageNet weights), for a GPU, and is scored with its best checkpoint, as
trainers/predict.py loads it. On the study set (preprocess/demo_data.py
--forgery fine_trace) the answer is known: the forgeries' one trace is finer
than a whole-image downscale.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from common.atomic import atomic_open
from common.help_format import HelpFormatter
from engine import store as layout
from engine.device import DEVICES
from engine.recipes import ENSEMBLE_AVERAGE, ENSEMBLE_UNION, RECIPES, SIZE_CLASS_NAMES
from trainers import run_folder
from trainers.config import ConfigError, RunConfig
from trainers.postprocess import MODES

if TYPE_CHECKING:
    from trainers.ensemble import Ensemble

SPECIALIST = ENSEMBLE_UNION[0]
SUCCESSOR = "high_recall"          # highres_no_ela's successor: fine-tunes it, mines hard FN
PARENT = RECIPES[SUCCESSOR].init.split(":", 1)[1]
NO_MINING = "no_mining"            # RUNS/no_mining: the successor without mining
FORGED = SIZE_CLASS_NAMES[1:]
INTERVAL = (2.5, 97.5)             # percentiles: a 95 % interval

# The rows, and the views of the specialist they compare.
GENERAL = "general"
ENSEMBLE_WHOLE = "general + specialist, whole image"
ENSEMBLE_TILED = "general + specialist, tiles"
SPECIALIST_WHOLE = "specialist alone, whole image"
SPECIALIST_TILED = "specialist alone, tiles"
MINED = f"{SUCCESSOR} with hard-FN mining"
UNMINED = f"{SUCCESSOR} without mining"
ROWS = (GENERAL, ENSEMBLE_WHOLE, ENSEMBLE_TILED, SPECIALIST_WHOLE, SPECIALIST_TILED, MINED,
        UNMINED)
# discrimination = tiny recall - share of authentic images flagged, for these rows
DISCRIMINATING = (SPECIALIST_WHOLE, SPECIALIST_TILED, ENSEMBLE_WHOLE, ENSEMBLE_TILED)
# the figures of each row; recall, false positives and discrimination are shares
FIGURES = ("score", *(f"recall_{c}" for c in FORGED), "false_positive_rate", "pooled_dice",
           "mean_image_dice", "discrimination")
FIGURE_NAMES = {"score": "competition score", "false_positive_rate": "false positives (authentic)",
                "pooled_dice": "Dice (pooled)", "mean_image_dice": "Dice (mean per image)",
                "discrimination": "discrimination (tiny recall - FP rate)",
                **{f"recall_{c}": f"recall {c}" for c in FORGED}}


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What a mode trains: which general members, with which recipe overrides,
    for how many optimiser steps (None: the recipe's epochs), from which weights."""

    mode: str
    general: tuple[str, ...]
    recipe: dict
    max_steps: dict[str, int] | None
    encoder_weights: str
    checkpoint: str      # which checkpoint of each member is scored: "best" or "last"

    def steps(self, member: str) -> int | None:
        return None if self.max_steps is None else self.max_steps[member]


QUICK = StudySettings(
    mode="quick", general=(PARENT, SUCCESSOR),
    recipe={"encoder": "mobilenet_v2", "img_size": 128},
    max_steps={PARENT: 300, SUCCESSOR: 150, SPECIALIST: 400},
    encoder_weights="none", checkpoint="last")
FULL = StudySettings(mode="full", general=ENSEMBLE_AVERAGE, recipe={}, max_steps=None,
                     encoder_weights="imagenet", checkpoint="best")


class StudyError(RuntimeError):
    """What stops the study: one line naming the cause and what to do."""


# ------------------------------------------------------------ training

def tuned(settings: StudySettings, args: argparse.Namespace) -> StudySettings:
    """The mode's settings with the command line's overrides."""
    recipe = dict(settings.recipe)
    for name in ("encoder", "img_size", "epochs", "batch_size"):
        if getattr(args, name) is not None:
            recipe[name] = getattr(args, name)
    steps = settings.max_steps
    if args.steps is not None:
        steps = {m: args.steps for m in (*settings.general, SPECIALIST, SUCCESSOR)}
    return dataclasses.replace(settings, recipe=recipe, max_steps=steps,
                               encoder_weights=args.encoder_weights or settings.encoder_weights,
                               checkpoint=args.checkpoint or settings.checkpoint)


def member_config(settings: StudySettings, member: str, args: argparse.Namespace,
                  run: Path) -> RunConfig:
    config = RunConfig(member=member, store=args.store, out=run, recipe=dict(settings.recipe),
                       encoder_weights=settings.encoder_weights, seed=args.seed,
                       max_steps=settings.steps(member), device=args.device,
                       workers=args.workers, tensorboard=False)
    config.check()
    return config


def unmined_config(mined: RunConfig, unmined: Path) -> RunConfig:
    """The successor's configuration as trained with mining (as recorded in
    its run folder, else `mined`), with mining off, into `unmined`: the two
    differ in mining only."""
    recorded = run_folder.recorded_config(mined.out, SUCCESSOR)
    base = RunConfig().merged(recorded, f"{mined.out}/config.json") if recorded else mined
    config = base.updated({"out": unmined, "store": str(mined.store), "recipe": {"mining": None}})
    config.check()
    return config


def train_into(config: RunConfig, taken: bool, overwrite: bool, retrained: set[str]) -> str:
    """Train config.member into config.out unless it is there finished
    (`taken`: whatever it was trained with; else only when trained with
    this configuration, or trained again with `overwrite`); returns what happened."""
    from trainers.run_ensemble import plan_member, run_member, train_command

    run, member = config.out, config.member
    if taken and run_folder.member_result(run, member):
        return "taken from the run folder as it was trained"
    fingerprint = layout.open_store(config.store).attrs.get("fingerprint")
    what, how = plan_member(member, config, fingerprint, overwrite, retrained)
    if what == "skip":
        return "finished earlier"
    if what == "refuse":
        raise StudyError(f"{member} in {run} was trained otherwise ({how}); rerun with "
                         "--overwrite to train it (and the members that read it) again, or "
                         "choose another --out")
    retrained.add(member)
    with tempfile.TemporaryDirectory(prefix="quality_study_") as folder:
        config_file = Path(folder) / f"{member}.json"
        config_file.write_text(json.dumps(config.public()))
        launch = argparse.Namespace(nproc_per_node=1)   # one process per member
        status = run_member(train_command(member, launch, config_file, {}, how))
    if status:
        raise StudyError(f"training {member} into {run} stopped with status {status}; rerun "
                         "the same command to resume it")
    return "trained"


def share_parent(runs: Path, unmined: Path) -> bool:
    """The successor's parent checkpoint in the unmined run folder too (a
    hard link, else a copy); True when it was (re)placed there."""
    source = run_folder.best_path(run_folder.models_dir(runs), PARENT)
    target = run_folder.best_path(run_folder.models_dir(unmined), PARENT)
    if target.is_file() and target.read_bytes() == source.read_bytes():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:   # another file system
        shutil.copy2(source, target)
    return True


def train_all(settings: StudySettings, args: argparse.Namespace, runs: Path) -> None:
    """Every member the rows need, in dependency order, then the successor without mining."""
    from trainers.run_ensemble import training_order

    needed = [m for m in training_order() if m in (*settings.general, SPECIALIST, SUCCESSOR)]
    unmined = runs / NO_MINING
    plan = [(member, runs) for member in needed] + [(SUCCESSOR, unmined)]
    retrained: set[str] = set()
    for k, (member, run) in enumerate(plan, 1):
        config = member_config(settings, member, args, runs)
        name = member
        if run == unmined:
            retrained = {PARENT} if share_parent(runs, unmined) else set()
            config, name = unmined_config(config, unmined), f"{member} without mining"
        print(f"[{k}/{len(plan)}] {name}: into {run}", flush=True)
        print(f"[{k}/{len(plan)}] {name}: "
              f"{train_into(config, args.runs is not None, args.overwrite, retrained)}", flush=True)


# ------------------------------------------------------------ evaluation

def passes(settings: StudySettings, runs: Path) -> list[tuple[Path, tuple[str, ...], str, dict]]:
    """The evaluations the rows come from: (models' run folder, members,
    specialist view, {evaluate's variant: row})."""
    from trainers.evaluate import FULL as ALL, WITHOUT_SPECIALIST

    united = (*settings.general, SPECIALIST)
    return [(runs, united, "whole", {ALL: ENSEMBLE_WHOLE, WITHOUT_SPECIALIST: GENERAL}),
            (runs, united, "tiled", {ALL: ENSEMBLE_TILED}),
            (runs, (SPECIALIST,), "whole", {ALL: SPECIALIST_WHOLE}),
            (runs, (SPECIALIST,), "tiled", {ALL: SPECIALIST_TILED}),
            (runs, (SUCCESSOR,), "whole", {ALL: MINED}),
            (runs / NO_MINING, (SUCCESSOR,), "whole", {ALL: UNMINED})]


def members_of(run: Path, members: tuple[str, ...], checkpoint: str, device) -> Ensemble:
    """The members of a run folder as one predictor: from their best
    checkpoints, as trainers/predict.py loads them, or from their last."""
    from trainers.checkpoint import load_member
    from trainers.ensemble import Ensemble, Member

    models = run_folder.models_dir(run)
    if checkpoint == "best":
        return Ensemble.load(models, members, device)
    return Ensemble([Member(name, *load_member(run_folder.last_path(models, name), device,
                                              member=name)[:2]) for name in members], device)


def evaluate_rows(settings: StudySettings, args: argparse.Namespace, runs: Path) -> dict:
    """{row: (trainers.evaluate.Report, how it was made)} on the validation split."""
    from engine.device import resolve_device
    from trainers.evaluate import evaluate

    post, device = MODES[args.mode], resolve_device(args.device)
    rows = {}
    for k, (run, members, view, named) in enumerate(passes(settings, runs), 1):
        print(f"[{k}/6] evaluating {', '.join(named.values())}", flush=True)
        ensemble = members_of(run, members, settings.checkpoint, device)
        reports = evaluate(ensemble, args.store, "val", post, False, args.batch_size,
                           specialist_view=view)
        for variant, row in named.items():
            used = members if row != GENERAL else settings.general
            rows[row] = (reports[variant], {"run": str(run), "members": list(used),
                                            "specialist_view": view if SPECIALIST in used else None})
    return {row: rows[row] for row in ROWS}


def figures(report) -> dict[str, float]:
    """A report's figures (FIGURES); NaN where a class has no images."""
    hits, authentic = report.false_positives()
    found = {"score": report.score(),
             **{f"recall_{c}": h / t if t else np.nan
                for c, (h, t) in report.recall_by_class().items()},
             "false_positive_rate": hits / authentic if authentic else np.nan}
    pixels = report.pixel_metrics()
    found.update(pooled_dice=pixels["pooled_dice"], mean_image_dice=pixels["mean_image_dice"],
                 discrimination=found["recall_tiny"] - found["false_positive_rate"])
    return {name: float(found[name]) for name in FIGURES}


def resampled(report, rows: np.ndarray):
    """The report of the images `rows` (with repeats), for the bootstrap:
    its per-image lists resampled (its total seconds left out)."""
    lists = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)
             if isinstance(getattr(report, f.name), list)}
    return type(report)(**{name: [values[i] for i in rows] for name, values in lists.items()})


def resamples(images: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` resamples of `images` rows with replacement; resample b is
    engine/sampling.py's counter-based draw of (seed, b): the same seed,
    the same resamples, on any machine."""
    from engine.sampling import sample_indices

    weights = np.ones(images)
    return [sample_indices(weights, images, seed, b) for b in range(count)]


def with_intervals(report, draws: list[np.ndarray]) -> dict[str, dict]:
    """{figure: {value, low, high}}: the figure on every image, and its 95 %
    bootstrap interval (None where undefined: a class without images)."""
    point = figures(report)
    samples = np.array([list(figures(resampled(report, rows)).values()) for rows in draws])
    out = {}
    for k, name in enumerate(FIGURES):
        column = samples[:, k][np.isfinite(samples[:, k])]
        low, high = np.percentile(column, INTERVAL) if len(column) else (np.nan, np.nan)
        out[name] = {key: None if not np.isfinite(v) else float(v)
                     for key, v in (("value", point[name]), ("low", low), ("high", high))}
    return out


def report_counts(report) -> dict:
    """The counts behind the shares, and the time its members took per image."""
    hits, authentic = report.false_positives()
    return {"detected_by_size_class": {c: list(v) for c, v in report.recall_by_class().items()},
            "flagged_authentic": [hits, authentic],
            "seconds_per_image": report.seconds_per_image()}


# ------------------------------------------------------------ results

def member_summary(runs: Path) -> dict:
    """What each trained member's run recorded: steps, time, encoder, size, mining."""
    summary = {}
    for run in (runs, runs / NO_MINING):
        for member, entry in json.loads((run / "config.json").read_text())["members"].items():
            if run != runs and member != SUCCESSOR:
                continue
            result, recipe = entry.get("result") or {}, entry.get("recipe") or {}
            summary[f"{member}{' without mining' if run != runs else ''}"] = {
                "steps": result.get("global_step"), "train_seconds": result.get("train_seconds"),
                "encoder": recipe.get("encoder"), "img_size": recipe.get("img_size"),
                "init": recipe.get("init"), "mining": recipe.get("mining"),
                "device": entry.get("device")}
    return summary


def _cell(figure: dict, name: str) -> str:
    if figure["value"] is None:
        return "-"
    scale, unit = (100, "%") if name.startswith(("recall", "false", "discrimination")) else (1, "")
    digits = 0 if unit else 3
    interval = ("" if figure["low"] is None
                else f" [{scale * figure['low']:.{digits}f}, {scale * figure['high']:.{digits}f}]")
    return f"{scale * figure['value']:.{digits}f}{unit}{interval}"


def markdown(found: dict) -> str:
    """The rows as a table, each figure with its 95 % interval in brackets."""
    lines = [f"# Model quality ({found['mode']}): {found['setting']}", "",
             "| row | " + " | ".join(FIGURE_NAMES[n] for n in FIGURES) + " | seconds per image |",
             "|---|" + "---|" * (len(FIGURES) + 1)]
    for row, entry in found["rows"].items():
        cells = [_cell(entry["figures"][n], n) if n != "discrimination" or row in DISCRIMINATING
                 else "" for n in FIGURES]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {entry['seconds_per_image']:.3f} |")
    counts = found["validation"]["by_size_class"]
    lines += ["", "Validation images: " + ", ".join(f"{c} {n}" for c, n in counts.items())
              + f"; intervals: {found['bootstrap']['resamples']} bootstrap resamples of the "
              f"images (seed {found['bootstrap']['seed']})."]
    return "\n".join(lines) + "\n"


def draw(found: dict, path: Path) -> None:
    """Bars with their 95 % intervals: score, recall per size class and Dice
    (higher is better) beside the false-positive rate and the discrimination."""
    from matplotlib.figure import Figure

    higher = ["score", *(f"recall_{c}" for c in FORGED), "pooled_dice"]
    other = ["false_positive_rate", "discrimination"]
    fig = Figure(figsize=(16, 6))   # no pyplot: no global state, no GUI backend
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [len(higher), 2.4]})
    rows = list(found["rows"])
    width = 0.85 / len(rows)
    for axes, names in ((left, higher), (right, other)):
        places = np.arange(len(names))
        for k, row in enumerate(rows):
            entries = [found["rows"][row]["figures"][n] for n in names]
            shown = [e["value"] if e["value"] is not None and
                     (n != "discrimination" or row in DISCRIMINATING) else np.nan
                     for n, e in zip(names, entries)]
            errors = np.array([[v - e["low"], e["high"] - v] if np.isfinite(v) and e["low"] is not None
                               else [0.0, 0.0] for v, e in zip(shown, entries)]).T
            axes.bar(places + (k - (len(rows) - 1) / 2) * width, np.nan_to_num(shown), width,
                     yerr=errors, capsize=2, label=row, color=f"C{k}")
        axes.set_xticks(places)
        axes.set_xticklabels([FIGURE_NAMES[n].replace(" (", "\n(") for n in names], fontsize=8)
        axes.axhline(0, color="0.3", linewidth=0.8)
    left.set(title="Higher is better (bars: 95 % bootstrap intervals)", ylim=(0, 1.05))
    right.set(title="False positives (lower is better);\ndiscrimination (higher is better)",
              ylim=(-1.05, 1.05))
    fig.suptitle(f"Model quality ({found['mode']}): {found['setting']}")
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncols=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


def study(args: argparse.Namespace) -> dict:
    settings = tuned(QUICK if args.quick else FULL, args)
    runs = args.runs or args.out / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_all(settings, args, runs)
    trained = time.perf_counter()
    rows = evaluate_rows(settings, args, runs)
    evaluated = time.perf_counter()
    first = next(iter(rows.values()))[0]
    draws = resamples(len(first.scores), args.bootstrap, args.seed)
    meta = layout.read_meta(layout.open_store(args.store))
    post = MODES[args.mode]
    found = {
        "mode": settings.mode, "store": str(args.store),
        "store_fingerprint": layout.open_store(args.store).attrs.get("fingerprint"),
        "setting": (f"val split, {len(first.scores)} images; threshold {post.threshold}, min "
                    f"area {post.min_area} px at 512; general members "
                    f"{', '.join(settings.general)}; {settings.checkpoint} checkpoints"),
        "settings": {"general": list(settings.general), "recipe_overrides": settings.recipe,
                     "max_steps": settings.max_steps, "encoder_weights": settings.encoder_weights,
                     "checkpoint": settings.checkpoint,
                     "seed": args.seed, "device": args.device, "mode": args.mode,
                     "runs": str(runs)},
        "validation": {"images": len(first.scores), "by_size_class": {
            name: int(np.sum(meta["size_class"][meta["split"] == layout.SPLITS["val"]] == k))
            for k, name in enumerate(SIZE_CLASS_NAMES)}},
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "percentiles": INTERVAL},
        "rows": {row: {**how, "figures": with_intervals(report, draws), **report_counts(report)}
                 for row, (report, how) in tqdm(rows.items(), desc="bootstrap intervals",
                                                unit="row")},
        "members": member_summary(runs),
        "seconds": {"training": trained - started, "evaluation": evaluated - trained},
    }
    found["discrimination"] = {row: found["rows"][row]["figures"]["discrimination"]
                               for row in DISCRIMINATING}
    with atomic_open(args.out / "quality.json") as handle:
        json.dump(found, handle, indent=2)
    with atomic_open(args.out / "quality.md") as handle:
        handle.write(markdown(found))
    draw(found, args.out / "quality.png")
    return found


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("--store", type=Path, required=True, help="the store (its val split is scored)")
    p.add_argument("--out", type=Path, default=Path("runs/quality"),
                   help="folder of quality.json, quality.md and quality.png")
    p.add_argument("--runs", type=Path, help="run folder of the members: those it holds "
                   "finished are taken as they are, the rest trained into it (default OUT/runs)")
    p.add_argument("--overwrite", action="store_true",
                   help="train again a member the run folder holds trained with other settings "
                        "(and the members that read it); default: refuse, naming the difference")
    p.add_argument("--quick", action="store_true",
                   help="for a CPU (under an hour on 2 cores): two general members, "
                        "mobilenet_v2 from random weights at 128 px, a few hundred steps each")
    p.add_argument("--steps", type=int, help="optimiser steps of every member (default: the "
                   "mode's; quick: " + ", ".join(f"{m} {n}" for m, n in QUICK.max_steps.items())
                   + "; full: the recipes' epochs)")
    p.add_argument("--encoder", help="every member's encoder (default: the mode's)")
    p.add_argument("--img-size", type=int, help="every member's input size (default: the mode's)")
    p.add_argument("--epochs", type=int, help="every member's epochs (default: the recipes')")
    p.add_argument("--batch-size", type=int, help="every member's batch (default: the recipes')")
    p.add_argument("--encoder-weights", help="imagenet, none or a file (default: quick none, "
                   "full imagenet)")
    p.add_argument("--checkpoint", choices=("best", "last"),
                   help="which checkpoint of each member is scored (default: quick last, full "
                        "best): a few hundred steps give few validations to choose from, and "
                        "the specialist's validation reads whole images")
    p.add_argument("--mode", choices=list(MODES), default="default",
                   help="post-processing operating point of every row")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals")
    p.add_argument("--seed", type=int, default=0, help="training and bootstrap seed")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA where present")
    p.add_argument("--workers", type=int, help="loader reader processes (default: the loader's)")
    args = p.parse_args(argv)
    if args.bootstrap < 1:
        p.error("--bootstrap must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        found = study(args)
    except (StudyError, ConfigError, layout.StoreError, run_folder.CheckpointError, OSError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(found))
    print(f"wrote {args.out / 'quality.json'}, {args.out / 'quality.md'}, "
          f"{args.out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
