"""The whole ensemble in one command: six members in dependency order, then evaluation.

    python trainers/run_ensemble.py --store data/store.zarr --out runs/ens1 \\
        [--epochs E --img-size P --batch-size B --max-steps K --encoder-weights W \\
         --device D --workers N --backend B --seed S --nproc-per-node G] \\
        [--tta] [--mode M] [--images TEST_DIR]

1. Trains every member into the one run folder OUT (trainers/run_folder.py)
   with `trainers/train.py`, each in its own process, in dependency order:
   highres_no_ela first, since hard_negative and high_recall mine with its
   checkpoint and high_recall starts from it. The training flags go to every
   member. With --nproc-per-node G > 1 each member trains under torchrun.
2. Evaluates the ensemble on the store's validation split
   (trainers/evaluate.py): OUT/evaluation/ holds the figure, the solution and
   the ensemble's submission for trainers/score.py; with --images, also
   OUT/submission.csv for a folder of test images.
3. Writes OUT/results.json and OUT/results.md: the competition score with and
   without the specialist, detection recall per size class for both, the
   false-positive rate on authentic images, pixel Dice and MCC, and per
   member its training time, steps and selection score.

Rerunning the same command skips members whose run ended (train.py records
that in OUT/config.json), resumes a member that was killed or interrupted,
and evaluates again. Ctrl-C stops the member in training (it checkpoints) and
this command, with status 130.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from graphlib import TopologicalSorter
from pathlib import Path

from engine import storage as storages
from engine import store as layout
from engine.device import DEVICES
from engine.recipes import RECIPES, SIZE_CLASS_NAMES
from trainers import run_folder
from common.atomic import atomic_open
from trainers.checkpoint import last_path
from common.help_format import HelpFormatter
from trainers.mining import MINING_MEMBER

ROOT = Path(__file__).resolve().parents[1]
# flags passed unchanged to every member's train.py: (flag, type, help)
TRAIN_FLAGS = (("--epochs", int, "epochs per member (default: each recipe's)"),
               ("--img-size", int, "input size (default: each recipe's, 512)"),
               ("--batch-size", int, "batch per process (default: each recipe's, 4)"),
               ("--max-steps", int, "optimiser steps per member (default: no limit)"),
               ("--encoder-weights", str, "imagenet, none or a weight file (default: imagenet)"),
               ("--device", str, "auto, cpu or cuda (default: auto)"),
               ("--workers", int, "loader reader processes per rank (default: train.py's)"),
               ("--backend", str, "loader backend auto, dali or opencv (default: auto)"),
               ("--seed", int, "seed of every member (default: 0)"))


def training_order() -> list[str]:
    """Members after the members they read: the parent they fine-tune, the
    checkpoint their mining uses."""
    needs = {name: {r.init.split(":", 1)[1]} if r.init.startswith("finetune:") else set()
             for name, r in RECIPES.items()}
    for name, recipe in RECIPES.items():
        if recipe.mining:
            needs[name].add(MINING_MEMBER)
    # static_order of a graph with ties keeps no promise; order ties as the table does
    sorter, order = TopologicalSorter(needs), []
    sorter.prepare()
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=list(RECIPES).index)
        order += ready
        sorter.done(*ready)
    return order


def train_command(member: str, args: argparse.Namespace, resume: bool) -> list[str]:
    flags = []
    for flag, _, _ in TRAIN_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            flags += [flag, str(value)]
    script = str(ROOT / "trainers" / "train.py")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(args.nproc_per_node), script]
                if args.nproc_per_node > 1 else [sys.executable, script])
    return [*launcher, "--member", member, "--store", str(args.store), "--out", str(args.out),
            *flags, *(["--resume"] if resume else [])]


def train_members(args: argparse.Namespace) -> int:
    """Train what is not finished; 0, or the failing member's exit status."""
    import subprocess

    order = training_order()
    for k, member in enumerate(order, 1):
        if run_folder.member_result(args.out, member):
            print(f"[{k}/{len(order)}] {member}: finished earlier, skipped", flush=True)
            continue
        resume = last_path(run_folder.models_dir(args.out), member).is_file()
        print(f"[{k}/{len(order)}] {member}: {'resuming' if resume else 'training'}", flush=True)
        started = time.perf_counter()
        try:
            status = subprocess.run(train_command(member, args, resume), cwd=ROOT).returncode
        except KeyboardInterrupt:   # the member's train.py got Ctrl-C too and checkpoints
            status = 130
        if status:
            again = shlex.join(["python", *sys.argv])
            print(f"error: {member} stopped with status {status}; after fixing the cause, rerun "
                  f"the same command ({again}): finished members are skipped, {member} resumes",
                  file=sys.stderr)
            return status
        print(f"[{k}/{len(order)}] {member}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def member_summary(run: Path) -> dict:
    """What train.py recorded of each member's finished run (RUN/config.json)."""
    summary = {}
    for member in training_order():
        result = run_folder.member_result(run, member)
        summary[member] = {"train_seconds": result["train_seconds"], "steps": result["global_step"],
                           "select_on": result["select_on"], "best_score": result["best_score"]}
    return summary


def results(reports: dict, args: argparse.Namespace, setting: str) -> dict:
    from trainers.evaluate import FULL, WITHOUT_SPECIALIST

    variants = {}
    for name, report in reports.items():
        flagged, authentic = report.false_positives()
        variants[name] = {
            "score": report.score(),
            "recall_by_size_class": {cls: {"detected": hit, "images": total,
                                           "recall": hit / total if total else None}
                                     for cls, (hit, total) in report.recall_by_class().items()},
            "false_positive_rate": flagged / authentic if authentic else None,
            "authentic_images": authentic, **report.pixel_metrics()}
    full = variants[FULL]
    return {"store": str(args.store),
            "store_fingerprint": layout.open_store(args.store).attrs.get("fingerprint"),
            "setting": setting, "score": full["score"],
            "score_without_specialist": variants.get(WITHOUT_SPECIALIST, {}).get("score"),
            "variants": variants, "members": member_summary(args.out)}


def _cell(value, percent=False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.4f}"


def results_markdown(found: dict) -> str:
    variants = found["variants"]
    names = list(variants)
    lines = [f"# Ensemble results: {found['setting']}", "",
             f"Store `{found['store']}` (fingerprint `{found['store_fingerprint']}`).", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| competition score (higher is better) | "
             + " | ".join(_cell(variants[n]["score"]) for n in names) + " |"]
    for cls in SIZE_CLASS_NAMES[1:]:
        cells = []
        for n in names:
            c = variants[n]["recall_by_size_class"][cls]
            cells.append(f"{_cell(c['recall'], True)} ({c['detected']}/{c['images']})")
        lines.append(f"| detection recall, {cls} | " + " | ".join(cells) + " |")
    lines.append("| false-positive rate on authentic images (lower is better) | "
                 + " | ".join(_cell(variants[n]["false_positive_rate"], True) for n in names) + " |")
    for key in ("pooled_dice", "mean_image_dice", "pooled_mcc", "mean_image_mcc"):
        lines.append(f"| {run_folder.METRIC_NAMES[key]} | "
                     + " | ".join(_cell(variants[n][key]) for n in names) + " |")
    lines += ["", "| member | steps | time in training steps | selected on | best |", "|---|---|---|---|---|"]
    for member, m in found["members"].items():
        lines.append(f"| {member} | {m['steps']} | {m['train_seconds']:.0f} s | "
                     f"{run_folder.METRIC_NAMES.get(m['select_on'], m['select_on'])} | "
                     f"{_cell(m['best_score'])} |")
    return "\n".join(lines) + "\n"


def evaluate_run(args: argparse.Namespace) -> dict:
    from engine.device import resolve_device
    from trainers.ensemble import MODES, Ensemble
    from trainers.evaluate import draw, draw_predictions, evaluate
    from trainers.score import write_solution

    post = MODES[args.mode]
    ensemble = Ensemble.load(run_folder.models_dir(args.out), tuple(training_order()),
                             resolve_device(args.device or "auto"))
    folder = args.out / "evaluation"
    shown = []
    reports = evaluate(ensemble, args.store, "val", post, args.tta, submission=folder / "submission.csv",
                       shown=shown)
    draw_predictions(shown, folder / "predictions.png")
    write_solution(args.store, folder / "solution.csv", "val")
    setting = (f"val split; threshold {post.threshold}, min area {post.min_area} px at 512"
               + ("; flip TTA" if args.tta else ""))
    draw(reports, folder / "evaluation.png", setting)
    found = results(reports, args, setting)
    with atomic_open(args.out / "results.json") as f:
        json.dump(found, f, indent=2)
    with atomic_open(args.out / "results.md") as f:
        f.write(results_markdown(found))
    if args.images:
        from trainers import predict
        status = predict.main(["--images", str(args.images), "--models",
                               str(run_folder.models_dir(args.out)), "--out",
                               str(args.out / "submission.csv"), "--mode", args.mode,
                               *(["--tta"] if args.tta else [])])
        if status:
            raise RuntimeError(f"predicting {args.images} failed (status {status})")
    return found


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--store", type=storages.location, default=layout.DEFAULT_STORE,
                   help=f"the store (default: {layout.DEFAULT_STORE})")
    p.add_argument("--out", type=Path, default=run_folder.DEFAULT_RUN,
                   help=f"the run folder for all six members (default: {run_folder.DEFAULT_RUN})")
    for flag, kind, text in TRAIN_FLAGS:
        p.add_argument(flag, type=kind, help=text, **({"choices": DEVICES} if flag == "--device" else {}))
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes (GPUs) per member; more than 1 trains under torchrun (default: 1)")
    p.add_argument("--tta", action="store_true", help="evaluate with flip test-time augmentation")
    from trainers.ensemble import MODES
    p.add_argument("--mode", choices=list(MODES), default="default",
                   help="the ensemble's threshold/minimum-area operating point (default: default)")
    p.add_argument("--images", type=Path,
                   help="also predict this folder of test PNGs into OUT/submission.csv")
    p.add_argument("--mining-dir", type=Path, default=None,
                   help="keep mining results in this local folder instead of the store "
                        "(for a read-only store; default: in the store)")
    storages.add_arguments(p)
    args = p.parse_args(argv)
    storages.configure_from(args)   # the members' processes inherit these two
    layout.use_mining_dir(args.mining_dir)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: is a file; the run folder is a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    status = train_members(args)
    if status:
        return status
    from trainers.checkpoint import CheckpointError
    from trainers.score import ScoreError
    try:
        found = evaluate_run(args)
    except (CheckpointError, layout.StoreError, ScoreError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(results_markdown(found))
    print(f"results: {args.out / 'results.md'}, {args.out / 'results.json'}; figure: "
          f"{args.out / 'evaluation' / 'evaluation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
