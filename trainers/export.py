"""Export members for prediction: weights only, without the training state.

    python trainers/export.py --models models/ --out export/ [--members a,b,...]

For each member's `<member>_best.pth` in --models (a training checkpoint: the
model with the run's record, torch's pickle format) writes
`<member>.safetensors` (the model's tensors only) and `<member>.json` beside it (the recipe, the store's
fingerprint, the sha256 of the checkpoint and of the weights, the export time
and the versions of torch, smp, timm and safetensors;
trainers/checkpoint.py's module docstring describes the files). Each file is
written beside its target and renamed into place when complete.

`python trainers/predict.py --models export/` predicts with them as with the
checkpoints, without the training side's packages (README, "Offline
inference"). Without --members every member with a checkpoint in --models is
exported. User errors (no checkpoint, a checkpoint of another member, an
unwritable --out) print one `error:` line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.recipes import get_recipe
from trainers.postprocess import ALL_MEMBERS
from trainers.run_folder import CheckpointError, best_path
from common.help_format import HelpFormatter
from trainers.predict import DEFAULT_MODELS, member_names


def megabytes(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def chosen_members(models: Path, asked: tuple[str, ...] | None) -> tuple[str, ...]:
    """The members to export: those asked for, each of which must have a
    checkpoint, or else every member that has one."""
    if not models.is_dir():
        raise CheckpointError(f"--models {models}: no such folder")
    if asked is None:
        found = tuple(name for name in ALL_MEMBERS if best_path(models, name).is_file())
        if not found:
            raise CheckpointError(f"{models}: no <member>_best.pth of any member "
                                  f"({', '.join(ALL_MEMBERS)}); train one first")
        return found
    for name in asked:
        get_recipe(name)          # an unknown name fails with the list of members
    missing = [str(best_path(models, name)) for name in asked if not best_path(models, name).is_file()]
    if missing:
        raise CheckpointError(f"no checkpoint: {', '.join(missing)}; train those members "
                              "(`python trainers/train.py --member NAME`) or leave them out of --members")
    return asked


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS,
                        help=f"folder of <member>_best.pth (default {DEFAULT_MODELS})")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to write <member>.safetensors and <member>.json into")
    parser.add_argument("--members", type=member_names,
                        help=f"comma-separated subset of {','.join(ALL_MEMBERS)} "
                             "(default: every member with a checkpoint in --models)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name the folder to write the export into")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainers.checkpoint import export_member   # torch: after the command line is parsed

    try:
        for name in chosen_members(args.models, args.members):
            checkpoint = best_path(args.models, name)
            weights = export_member(checkpoint, args.out, name)
            print(f"{name}: {checkpoint} ({megabytes(checkpoint)}) -> {weights} "
                  f"({megabytes(weights)}) + {weights.with_suffix('.json').name}")
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
