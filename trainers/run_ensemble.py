"""The whole ensemble in one command: six members in dependency order, then evaluation.

    python trainers/run_ensemble.py --store data/store.zarr --out runs/ens1 \\
        [train.py's flags: --config FILE --epochs E --img-size P --max-steps K ...] \\
        [--nproc-per-node G] [--tta] [--mode M] [--specialist-view tiled|whole]
        [--images TEST_DIR]

1. Trains every member into the one run folder OUT (trainers/run_folder.py)
   with `trainers/train.py`, each in its own process, in dependency order:
   highres_no_ela first, since hard_negative and high_recall mine with its
   checkpoint and high_recall starts from it. The training flags (the same
   as train.py's, trainers/config.py) make one configuration that every
   member trains with. With --nproc-per-node G > 1 each member trains under
   torchrun.
2. Evaluates the ensemble on the store's validation split
   (trainers/evaluate.py; the specialist on tiles of the full-resolution
   image unless --specialist-view whole): OUT/evaluation/ holds the figure,
   the solution and the ensemble's submission for trainers/score.py; with --images, also
   OUT/submission.csv for a folder of test images.
3. Writes OUT/results.json and OUT/results.md: the competition score with and
   without the specialist, detection recall per size class for both, the
   false-positive rate on authentic images, pixel Dice and MCC, seconds per
   image, and per member its training time, steps and selection score.

Rerunning the same command skips members whose run ended (train.py records
that in OUT/config.json), resumes a member that was killed or interrupted
(even while validating: it checkpoints first), and evaluates again. A member
recorded with another configuration or store (another --img-size, --max-steps,
recipe field, seed, store content) is never reused silently: the rerun is
refused with a line naming the difference, or with --overwrite that member,
and the members that read it, are trained again. Ctrl-C stops the member in
training (it checkpoints) and this command, with status 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from graphlib import TopologicalSorter
from pathlib import Path

from common.atomic import atomic_open
from common.help_format import HelpFormatter
from engine import storage as storages
from engine import store as layout
from engine.recipes import MINING_MEMBER, RECIPES, SIZE_CLASS_NAMES
from trainers import config as run_config
from trainers import run_folder
from trainers.run_folder import last_path
from trainers.config import ConfigError, RunConfig
from trainers.postprocess import MODES
from trainers.tiling import add_specialist_view_argument

ROOT = Path(__file__).resolve().parents[1]
# settings that change what a member's run makes (the recipe aside, compared
# whole): a finished member recorded with others is not this command's
RESULT_SETTINGS = ("encoder_weights", "seed", "max_steps", "warmup_steps", "grad_accum_steps",
                   "precision")


def member_needs() -> dict[str, set[str]]:
    """The members each member reads: the parent it fine-tunes, the
    checkpoint its mining uses."""
    needs = {name: {r.init.split(":", 1)[1]} if r.init.startswith("finetune:") else set()
             for name, r in RECIPES.items()}
    for name, recipe in RECIPES.items():
        if recipe.mining:
            needs[name].add(MINING_MEMBER)
    return needs


def training_order() -> list[str]:
    """Members after the members they read."""
    # static_order of a graph with ties keeps no promise; order ties as the table does
    sorter, order = TopologicalSorter(member_needs()), []
    sorter.prepare()
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=list(RECIPES).index)
        order += ready
        sorter.done(*ready)
    return order


def train_command(member: str, args: argparse.Namespace, config_file: Path,
                  secrets: dict, how: str | None) -> list[str]:
    """train.py for one member: its configuration from `config_file`
    (written without credentials), the credentials as flags, and `how`
    ("--resume", "--overwrite" or None)."""
    script = str(ROOT / "trainers" / "train.py")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(args.nproc_per_node), script]
                if args.nproc_per_node > 1 else [sys.executable, script])
    options = [word for name, value in secrets.items()
               for word in ("--storage-option", storages.format_option((name, value)))]
    return [*launcher, "--member", member, "--config", str(config_file), *options,
            *([how] if how else [])]


def _normal(config: RunConfig, name: str):
    """A setting as it acts: an unset seed is 0, a --max-steps of 0 no limit."""
    value = getattr(config, name)
    return {"seed": value or 0, "max_steps": value or None}.get(name, value)


def difference(recorded: dict, config: RunConfig, fingerprint: str | None) -> str | None:
    """What differs between a member's recorded run (its RUN/config.json
    entry) and a run of it with `config` on a store with `fingerprint`, in
    words; None when nothing that changes the result does."""
    if not recorded:
        return None
    found = []
    if recorded.get("store_fingerprint") != fingerprint:
        found.append(f"store {recorded.get('store')} (fingerprint "
                     f"{str(recorded.get('store_fingerprint'))[:12]}) -> {config.store} "
                     f"(fingerprint {str(fingerprint)[:12]})")
    try:
        before = RunConfig().merged(recorded.get("config") or {}, "the recorded configuration")
    except ConfigError as exc:
        return str(exc)
    found += [f"{name} {_normal(before, name)} -> {_normal(config, name)}"
              for name in RESULT_SETTINGS if _normal(before, name) != _normal(config, name)]
    old = dataclasses.asdict(before.resolved_recipe())
    new = dataclasses.asdict(config.resolved_recipe())
    found += [f"recipe {name} {old[name]} -> {new[name]}" for name in new if old[name] != new[name]]
    return ", ".join(found) or None


def plan_member(member: str, config: RunConfig, fingerprint: str | None, overwrite: bool,
                retrained: set[str]) -> tuple[str, str | None]:
    """(what happens to the member, the train.py flag that does it): "skip"
    (finished with this configuration), "resume", "train", or "refuse"
    (recorded with another; the reason is the second item)."""
    out = config.out
    recorded = run_folder.member_entry(out, member)
    changed = difference(recorded, config, fingerprint)
    stale = sorted(member_needs()[member] & retrained)
    if stale and recorded:
        changed = f"reads {', '.join(stale)}, trained again"
    if changed:
        return ("train", "--overwrite") if overwrite else ("refuse", changed)
    if recorded.get("result"):
        return "skip", None
    if last_path(run_folder.models_dir(out), member).is_file():
        return "resume", "--resume"
    # logs but no checkpoint (killed before its first): nothing to resume from
    started = any(path.exists() for path in run_folder.member_files(out, member))
    return "train", "--overwrite" if started else None


def train_members(args: argparse.Namespace, config: RunConfig) -> int:
    """Train what is not finished; 0, or the failing member's exit status."""
    fingerprint = layout.open_store(config.store, storage=config.storage).attrs.get("fingerprint")
    order, retrained = training_order(), set()
    secrets = {k: v for k, v in config.storage.options.items() if storages.is_secret(k)}
    with tempfile.TemporaryDirectory(prefix="run_ensemble_") as folder:
        for k, member in enumerate(order, 1):
            member_config = dataclasses.replace(config, member=member)
            what, how = plan_member(member, member_config, fingerprint, args.overwrite, retrained)
            if what == "skip":
                print(f"[{k}/{len(order)}] {member}: finished earlier, skipped", flush=True)
                continue
            if what == "refuse":
                print(f"error: {member} in {config.out} was trained otherwise ({how}); rerun "
                      "with --overwrite to train it (and the members that read it) again, or "
                      "choose another --out", file=sys.stderr)
                return 2
            retrained.add(member)
            print(f"[{k}/{len(order)}] {member}: "
                  f"{'resuming' if how == '--resume' else 'training'}", flush=True)
            config_file = Path(folder) / f"{member}.json"
            config_file.write_text(json.dumps(member_config.public()))
            status = run_member(train_command(member, args, config_file, secrets, how))
            if status:
                again = shlex.join(["python", *run_folder.redacted_command(sys.argv)])
                print(f"error: {member} stopped with status {status}; after fixing the cause, "
                      f"rerun the same command ({again}): finished members are skipped, "
                      f"{member} resumes", file=sys.stderr)
                return status
    return 0


def run_member(command: list[str]) -> int:
    """The member's train.py, to its end; its exit status."""
    import subprocess

    started = time.perf_counter()
    try:
        status = subprocess.run(command, cwd=ROOT).returncode
    except KeyboardInterrupt:   # the member's train.py got Ctrl-C too and checkpoints
        return 130
    if not status:
        print(f"{command[command.index('--member') + 1]}: done in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return status


def member_summary(run: Path) -> dict:
    """What train.py recorded of each member's finished run (RUN/config.json)."""
    summary = {}
    for member in training_order():
        result = run_folder.member_result(run, member)
        summary[member] = {"train_seconds": result["train_seconds"], "steps": result["global_step"],
                           "select_on": result["select_on"], "best_score": result["best_score"]}
    return summary


def results(reports: dict, config: RunConfig, setting: str) -> dict:
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
            "authentic_images": authentic, "seconds_per_image": report.seconds_per_image(),
            **report.pixel_metrics()}
    full = variants[FULL]
    group = layout.open_store(config.store, storage=config.storage)
    return {"store": str(config.store), "store_fingerprint": group.attrs.get("fingerprint"),
            "setting": setting, "score": full["score"],
            "score_without_specialist": variants.get(WITHOUT_SPECIALIST, {}).get("score"),
            "variants": variants, "members": member_summary(config.out)}


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
    lines.append("| seconds per image (members' forward passes) | "
                 + " | ".join(f"{variants[n]['seconds_per_image']:.3f}" for n in names) + " |")
    lines += ["", "| member | steps | time in training steps | selected on | best |", "|---|---|---|---|---|"]
    for member, m in found["members"].items():
        lines.append(f"| {member} | {m['steps']} | {m['train_seconds']:.0f} s | "
                     f"{run_folder.METRIC_NAMES.get(m['select_on'], m['select_on'])} | "
                     f"{_cell(m['best_score'])} |")
    return "\n".join(lines) + "\n"


def evaluate_run(args: argparse.Namespace, config: RunConfig) -> dict:
    from engine.device import resolve_device
    from trainers.ensemble import Ensemble
    from trainers.evaluate import draw, draw_predictions, evaluate
    from trainers.score import write_solution

    post, out = MODES[args.mode], config.out
    ensemble = Ensemble.load(run_folder.models_dir(out), tuple(training_order()),
                             resolve_device(config.device))
    folder = out / "evaluation"
    shown = []
    reports = evaluate(ensemble, config.store, "val", post, args.tta, submission=folder / "submission.csv",
                       shown=shown, storage=config.storage, specialist_view=args.specialist_view)
    draw_predictions(shown, folder / "predictions.png")
    write_solution(config.store, folder / "solution.csv", "val", config.storage)
    setting = (f"val split; specialist view {args.specialist_view}; threshold "
               f"{post.threshold}, min area {post.min_area} px at 512"
               + ("; flip TTA" if args.tta else ""))
    draw(reports, folder / "evaluation.png", setting)
    found = results(reports, config, setting)
    with atomic_open(out / "results.json") as f:
        json.dump(found, f, indent=2)
    with atomic_open(out / "results.md") as f:
        f.write(results_markdown(found))
    if args.images:
        from trainers import predict
        status = predict.main(["--images", str(args.images), "--models",
                               str(run_folder.models_dir(out)), "--out",
                               str(out / "submission.csv"), "--mode", args.mode,
                               "--specialist-view", args.specialist_view,
                               *(["--tta"] if args.tta else [])])
        if status:
            raise RuntimeError(f"predicting {args.images} failed (status {status})")
    return found


def parse_args(argv=None) -> tuple[argparse.Namespace, RunConfig]:
    """The command line, and the one configuration every member trains with
    (checked for each member before anything runs)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    run_config.add_arguments(p, ensemble=True)
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes (GPUs) per member; more than 1 trains under torchrun")
    p.add_argument("--tta", action="store_true", help="evaluate with flip test-time augmentation")
    add_specialist_view_argument(p)
    p.add_argument("--mode", choices=list(MODES), default="default",
                   help="the ensemble's threshold/minimum-area operating point")
    p.add_argument("--images", type=Path,
                   help="also predict this folder of test PNGs into OUT/submission.csv")
    args, typed = run_config.parse(p, argv)
    try:
        config = run_config.from_args(typed)
        for member in RECIPES:
            dataclasses.replace(config, member=member).check()
    except ConfigError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    if config.out.exists() and not config.out.is_dir():
        p.error(f"--out {config.out}: is a file; the run folder is a folder")
    return args, config


def main(argv=None) -> int:
    args, config = parse_args(argv)
    try:
        status = train_members(args, config)
    except (layout.StoreError, storages.StorageUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if status:
        return status
    from trainers.checkpoint import CheckpointError
    from trainers.score import ScoreError
    try:
        found = evaluate_run(args, config)
    except (CheckpointError, layout.StoreError, ScoreError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(results_markdown(found))
    print(f"results: {config.out / 'results.md'}, {config.out / 'results.json'}; figure: "
          f"{config.out / 'evaluation' / 'evaluation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
