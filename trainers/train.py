"""Train one ensemble member from the store: `python trainers/train.py --member NAME`.

The member's recipe (engine/recipes.py; docs/recipes.md lists the six) says
everything; flags or a --config file override it for one run
(trainers/config.py: one RunConfig, recorded in RUN/config.json). Reading
order, top to bottom:

  main -> parse_args: defaults, --config, typed flags (a resumed run: its
          recorded configuration first); refused here, before any worker
          starts or file is written, when they cannot work
       -> train_member (trainers/training.py): run folder ->
          starting_point (recipe, seed, the checkpoint when resuming) ->
          (mining) -> new_training (model, optimiser, per-step schedule,
          RunState) -> record_start ->
          run_epochs, per epoch:
            train_one_epoch  the loader's batches (resumable at any
                             optimiser step), one row per step in
                             logs/<member>_steps.csv
            end_of_epoch     checkpoint, then validate; select
                             <member>_best.pth, write <member>_last.pth, one
                             row in logs/<member>.csv; stop early where the
                             recipe says
          -> curves in logs/<member>.png

Everything goes into the run folder --out (docs/architecture.md, "Run folders");
all members of an ensemble share one. A rerun of a member already there is
refused unless it --resume's or --overwrite's. Ctrl-C stops at once (an
optimiser update in flight finishes first), writes the last checkpoint, and
prints the command that resumes.

Multi-process: `torchrun --nproc_per_node N trainers/train.py ...` (gloo on
CPU, NCCL on GPU, one GPU per rank); each rank trains on its slice of the
epoch plan, mines and validates its share, and uses its share of the node's
cores for loader workers (docs/architecture.md, "Multi-process training").
`--ddp` runs that code path in one process too.

On CUDA (--precision auto): bf16 autocast (fp16 with a gradient scaler on
GPUs without bf16) in training and validation alike, cuDNN autotuning for the
fixed input size, channels-last tensors, fused AdamW; losses stay on the GPU
and are read every SHOW_LOSS_EVERY steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from common.help_format import HelpFormatter
from engine.recipes import RECIPES
from trainers import config as run_config
from trainers import run_folder
from trainers.config import ConfigError, RunConfig

# Only the command line here, kept free of torch and DALI so that --help and
# a mistyped flag answer at once; the training itself is trainers/training.py,
# imported by main() once the arguments are parsed.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--member", choices=list(RECIPES),
                   help="the member to train (required, here or in --config)")
    run_config.add_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from <member>_last.pth with the settings the run recorded in "
                        "OUT/config.json (flags typed here override them; of the recipe only "
                        "--epochs may change; credentials come again from flags or the environment)")
    p.add_argument("--ddp", action="store_true",
                   help="use torch.distributed and DistributedDataParallel even in one process "
                        "(automatic under torchrun with more than one process); checks that path")
    return p


@dataclasses.dataclass(frozen=True)
class Request:
    """What a command line asks: the run's configuration, and what to do
    with a run of it already in the folder."""

    config: RunConfig
    resume: bool = False
    overwrite: bool = False


def parse_args(argv=None) -> Request:
    """The command line as a checked Request; what cannot work ends here
    with one line and status 2."""
    parser = build_parser()
    args, typed = run_config.parse(parser, argv)
    try:
        return Request(configured(args, typed), args.resume, args.overwrite)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def configured(args: argparse.Namespace, typed: argparse.Namespace) -> RunConfig:
    """Defaults (or, resuming, the run's recorded configuration), then
    --config, then the typed flags; checked."""
    config = run_config.from_args(typed)
    recorded = run_folder.recorded_config(config.out, config.member) if args.resume else None
    if recorded is not None:
        base = RunConfig().merged(recorded, f"{config.out / 'config.json'}")
        config = run_config.from_args(typed, base)
    config.check()
    from engine.device import resolve_device
    from trainers.model import encoder_weights_arg   # torch: once the flags have parsed

    try:
        encoder_weights_arg(config.encoder_weights)
        resolve_device(config.device)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return config


def main(argv=None) -> int:
    request = parse_args(argv)
    from trainers.training import USER_ERRORS, train

    try:
        return train(request)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

