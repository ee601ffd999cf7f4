"""Train one ensemble member from the store: `python trainers/train.py --member NAME`.

The member's recipe (engine/recipes.py; docs/recipes.md lists the six) says
everything; flags override it for one run. Reading order:

  main -> train_member: recipe + flags -> run folder -> (mining) -> model,
          optimiser, schedule; then per epoch
            train_one_epoch  the loader's batches (resumable at any batch),
                             one row per step in logs/<member>_steps.csv
            validate         metrics over the validation rows; select
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

On CUDA: bf16 autocast (fp16 with a gradient scaler on GPUs without bf16) in
training, validation and mining alike, cuDNN autotuning for the fixed input
size, channels-last tensors, fused AdamW; losses stay on the GPU and are read
every SHOW_LOSS_EVERY steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import engine
from engine import storage as storages
from engine import store as layout
from engine.device import DEVICES, resolve_device
from engine.loader import (BACKENDS, MEMORY_FORMATS, SharedMemoryError, cores_per_process,
                           resolve_backend)
from engine.recipes import RECIPES, Recipe, get_recipe
from trainers import distributed, mining, run_folder
from trainers.checkpoint import (OPTIMISER_STATE, RESUME_FIELDS, CheckpointError, best_path,
                                 last_path, load_checkpoint, load_member, recipe_from_dict,
                                 recipe_to_dict, require_checkpoint, save_checkpoint)
from common.help_format import HelpFormatter
from trainers.losses import MemberLoss
from trainers.metrics import check_metric_name, pixel_counts, summarize
from trainers.model import WeightsUnavailable, build_model, encoder_weights_arg, freeze_unused
from trainers.precision import autocast, grad_scaler, precision_name
from trainers.schedules import build_optimizer, build_scheduler

# Errors that are the user's to fix: printed as one message, exit status 2.
USER_ERRORS = (CheckpointError, WeightsUnavailable, layout.StoreError, SharedMemoryError,
               run_folder.RunFolderError, storages.StorageUnavailable)
# Step losses are read from the device (which waits for the GPU to finish the
# step) and logged every this many steps.
SHOW_LOSS_EVERY = 10
# Flags that override a recipe field of the same name for one run.
RECIPE_FLAGS = ("epochs", "img_size", "batch_size", "lr", "encoder", "grad_clip", "early_stop")
INTERRUPTED = 130   # exit status after Ctrl-C, as shells report it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--member", required=True, choices=list(RECIPES))
    p.add_argument("--store", type=storages.location, default=layout.DEFAULT_STORE,
                   help=f"the store (default: {layout.DEFAULT_STORE})")
    p.add_argument("--out", type=Path, default=run_folder.DEFAULT_RUN,
                   help="the run folder (a folder): OUT/models, OUT/logs, OUT/config.json; the "
                        f"members of one ensemble share it (default: {run_folder.DEFAULT_RUN})")
    p.add_argument("--overwrite", action="store_true",
                   help="start this member over in a run folder that already holds a run of it")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--img-size", type=int, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, help="per process; default: the recipe's")
    p.add_argument("--lr", type=float, help="default: the recipe's")
    p.add_argument("--encoder", help="an smp encoder name; default: the recipe's")
    p.add_argument("--grad-clip", type=float,
                   help="clip the gradient norm to this value (default: the recipe's, none)")
    p.add_argument("--early-stop", type=int,
                   help="stop after this many epochs without a better selection metric "
                        "(default: the recipe's; small_specialist 10, others never)")
    p.add_argument("--encoder-weights", type=encoder_weights_arg, default="imagenet",
                   help="imagenet (downloaded once into the Hugging Face cache; offline: the cache "
                        "or a clear error within seconds), none (random, never downloads), or the "
                        "path of a timm/smp weight file for the encoder (default: imagenet)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimiser steps in all (resumed runs included); "
                        "validates and writes checkpoints; --resume continues from there")
    p.add_argument("--save-every", type=int, default=500,
                   help="also write <member>_last.pth every this many steps "
                        "(0: epoch ends only; default: 500)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA where present (default: auto)")
    p.add_argument("--seed", type=int, default=None,
                   help="plan, augmentation, initialisation and dropout all follow it "
                        "(default: 0, or the resumed run's)")
    p.add_argument("--resume", action="store_true", help="continue from <member>_last.pth")
    p.add_argument("--workers", type=int, default=None,
                   help="loader reader processes (default: this process's share of the cores, "
                        "less one, at most 8; 0 reads in the training process)")
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                   help="where the loader's per-sample work runs: dali (DALI operators + Kornia), "
                        "opencv (OpenCV in the reader processes); auto: dali on CUDA, opencv on the CPU")
    p.add_argument("--memory-format", choices=("auto",) + tuple(MEMORY_FORMATS), default="auto",
                   help="layout of the model's activations and input batches; auto: channels_last "
                        "on CUDA (tensor-core convolutions take NHWC), contiguous on the CPU")
    p.add_argument("--ddp", action="store_true",
                   help="use torch.distributed and DistributedDataParallel even in one process "
                        "(automatic under torchrun with more than one process); checks that path")
    p.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_MINUTES,
                   help="minutes a rank waits for the others before the run fails "
                        f"(default: {distributed.DEFAULT_TIMEOUT_MINUTES})")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="write no TensorBoard event files (written when tensorboard is installed)")
    p.add_argument("--record-samples", action="store_true",
                   help="write the meta rows this process trained on to "
                        "logs/<member>_samples_rank<R>.npy")
    p.add_argument("--mining-dir", type=Path, default=None,
                   help="keep mining results in this local folder instead of the store "
                        "(for a read-only store; default: in the store)")
    storages.add_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    storages.configure_from(args)
    layout.use_mining_dir(args.mining_dir)
    for name in ("epochs", "img_size", "batch_size", "max_steps", "early_stop"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        resolve_device(args.device)
    except ValueError as exc:
        p.error(f"--device {args.device}: {exc}")
    return args


def recipe_overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None}


def resumed_run(state: dict, path: Path, args: argparse.Namespace) -> Recipe:
    """The saved run's recipe with the overrides a resumed run may make (more epochs);
    a seed or other recipe flag unlike the saved run's is refused (load_checkpoint
    refused another member's or store's checkpoint already)."""
    saved = recipe_from_dict(state["recipe"])
    changed = {name: value for name, value in recipe_overrides(args).items()
               if name != "epochs" and getattr(saved, name) != value}
    if args.seed is not None and args.seed != state["seed"]:
        changed["seed"] = args.seed
    if changed:
        flags = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in changed.items())
        raise CheckpointError(f"{path}: --resume continues the saved run as it was; {flags} "
                              "differ from it (only --epochs may change). Drop them, or train "
                              "afresh without --resume")
    return dataclasses.replace(saved, epochs=args.epochs or saved.epochs)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed of torch's generator (dropout) for one step: a resumed run redraws the same."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])


def backward(net, batch: dict, criterion, optimizer, scaler, device: torch.device,
             grad_clip) -> torch.Tensor:
    """Forward (under autocast on CUDA), backward, optional clipping; the batch
    loss, detached, still on the device (reading it waits for the GPU)."""
    with autocast(device):
        logits = net(batch["image"])
    loss = criterion(logits.float(), batch["mask"])
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)   # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    return loss.detach()


def update(optimizer, scaler) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def optimiser_step(net, batch: dict, criterion, optimizer, scaler, device: torch.device,
                   grad_clip) -> torch.Tensor:
    """backward, then update; the detached batch loss."""
    loss = backward(net, batch, criterion, optimizer, scaler, device, grad_clip)
    update(optimizer, scaler)
    return loss


class StopOnInterrupt:
    """Ctrl-C raises KeyboardInterrupt at once, except inside `updating()` (an
    optimiser update with its step counters, a checkpoint being written), which
    finishes first: the weights are then always those of a whole number of
    steps, and no file is left half-written. A second Ctrl-C stops at once."""

    def __init__(self):
        self.in_update = self.pending = False
        self.previous = None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame):
        if self.in_update and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def updating(self):
        self.in_update = True
        try:
            yield
        finally:
            self.in_update = False
        if self.pending:
            # raised once: the interrupted run's own last save must not raise it again
            self.pending = False
            raise KeyboardInterrupt


def initial_model(recipe: Recipe, args, models_dir: Path, fingerprint: str) -> tuple[torch.nn.Module, Recipe]:
    """The recipe's initialisation: encoder weights as --encoder-weights says
    (the recipe records which: imagenet, random or file:PATH), or the best
    checkpoint of the member it fine-tunes."""
    if recipe.init.startswith("finetune:"):
        parent = recipe.init.split(":", 1)[1]
        path = require_checkpoint(models_dir, parent, recipe.name, "its initial weights")
        model, parent_recipe, _ = load_member(path, member=parent, fingerprint=fingerprint)
        if parent_recipe.in_channels != recipe.in_channels:
            raise CheckpointError(f"{path}: {parent_recipe.in_channels} input channels, member "
                                  f"{recipe.name!r} needs {recipe.in_channels}")
        # the architecture is the parent's: record its encoder in this run's recipe
        return model.train(), dataclasses.replace(recipe, encoder=parent_recipe.encoder)
    init = {"imagenet": "imagenet", "none": "random"}.get(args.encoder_weights,
                                                          f"file:{args.encoder_weights}")
    return (build_model(recipe.encoder, recipe.in_channels, args.encoder_weights),
            dataclasses.replace(recipe, init=init))


def run_mining(recipe: Recipe, args, models_dir: Path, ddp: distributed.Distributed) -> None:
    """Every rank mines its share, rank 0 writes; reused while the checkpoint is unchanged."""
    # every rank checks, so a missing checkpoint stops all of them, not only rank 0
    path = require_checkpoint(models_dir, mining.MINING_MEMBER, recipe.name,
                              f"{recipe.mining} mining")
    result, reused = mining.ensure_mining(
        args.store, recipe.mining, path, batch_size=recipe.batch_size, img_size=recipe.img_size,
        device=str(ddp.device), workers=args.workers, ddp=ddp)
    if ddp.main:
        print(f"{recipe.mining} mining ({'reused' if reused else 'new'}, checkpoint "
              f"{result['checkpoint'][:12]}): {int(result['flag'].sum())} images flagged")


@torch.no_grad()
def validate(model: torch.nn.Module, loader, ddp: distributed.Distributed) -> dict:
    """Metrics over the member's validation rows (`loader`: the run's
    validation loader, run_loader), each rank scoring its share, in the
    precision of training."""
    model.eval()
    counts = [np.zeros((0, 4), np.int64)]
    for batch in loader:
        with autocast(ddp.device):
            logits = model(batch["image"])
        counts.append(pixel_counts(logits.float(), batch["mask"]))
    model.train()
    return summarize(np.concatenate(ddp.all_gather(np.concatenate(counts))))


class StepLog:
    """One row per optimiser step in logs/<member>_steps.csv (and TensorBoard),
    written every SHOW_LOSS_EVERY steps: the losses wait on the device till then."""

    def __init__(self, run: Path, member: str, enabled: bool, tensorboard: bool):
        self.path = run_folder.logs_dir(run) / f"{member}_steps.csv"
        self.enabled = enabled
        self.board = run_folder.TensorBoard(run, member, enabled and tensorboard)
        self.rows, self.losses = [], []
        self.last_loss = float("nan")

    def add(self, loss: torch.Tensor, **row) -> None:
        self.rows.append(row)
        self.losses.append(loss)
        if len(self.rows) >= SHOW_LOSS_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        for row, loss in zip(self.rows, torch.stack(self.losses).tolist()):
            row["loss"] = loss
        self.last_loss = self.rows[-1]["loss"]
        if self.enabled:
            run_folder.append_rows(self.path, run_folder.STEP_FIELDS, self.rows)
            for row in self.rows:
                self.board.scalars(row["global_step"], {"train/loss": row["loss"], "train/lr": row["lr"],
                                                        "train/samples_per_s": row["samples_per_s"],
                                                        "train/data_wait_share": row["data_wait_share"]})
        self.rows, self.losses = [], []


@dataclasses.dataclass
class Training:
    """What one member's run holds while it trains."""

    args: argparse.Namespace
    ddp: distributed.Distributed
    recipe: Recipe
    seed: int
    fingerprint: str
    model: torch.nn.Module
    net: torch.nn.Module          # the model, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    criterion: torch.nn.Module
    run: dict                     # position and selection state, saved in checkpoints
    log: StepLog
    stop: StopOnInterrupt
    saved_step: int = -1          # global_step of the newest last checkpoint
    seen_rows: list = dataclasses.field(default_factory=list)
    loaders: dict = dataclasses.field(default_factory=dict)   # split -> the run's one loader

    @property
    def models_dir(self) -> Path:
        return run_folder.models_dir(self.args.out)

    def checkpoint_state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "recipe": recipe_to_dict(self.recipe), "fingerprint": self.fingerprint,
                "seed": self.seed, "encoder_weights": self.args.encoder_weights, **self.run}

    def save_last(self) -> None:
        with self.stop.updating():   # a Ctrl-C waits for the file to be whole
            if self.ddp.main:
                save_checkpoint(last_path(self.models_dir, self.recipe.name), self.checkpoint_state())
            self.saved_step = self.run["global_step"]


def run_loader(t: Training, split: str, epoch: int, start_batch: int = 0):
    """The run's one loader of `split` ("train" or "val"): made on first use,
    then re-planned in place for each epoch, so one DALI pipeline and one set
    of reader workers serve the whole run (engine/loader.py, Loader);
    train_member's finally closes it."""
    loader = t.loaders.get(split)
    if loader is not None:
        return loader.set_epoch(epoch, start_batch)
    args, recipe, ddp = t.args, t.recipe, t.ddp
    loader = engine.make_loader(
        args.store, recipe, split=split, batch_size=recipe.batch_size, img_size=recipe.img_size,
        seed=t.seed, epoch=epoch, device=str(ddp.device), rank=ddp.rank,
        world_size=ddp.world_size, start_batch=start_batch, augment=split == "train",
        workers=args.workers, backend=args.backend, memory_format=args.memory_format)
    t.loaders[split] = loader
    return loader


def train_one_epoch(t: Training, epoch: int) -> dict:
    """Train on the epoch's batches from where the run stands; the epoch's
    figures, with "stopped" set when --max-steps ended it early."""
    args, recipe, ddp, run = t.args, t.recipe, t.ddp, t.run
    loader = run_loader(t, "train", epoch, run["step"])
    first_step, wait, samples = run["step"], 0.0, 0
    loss_sum = torch.zeros((), device=ddp.device)
    steps_to_run = len(loader)
    if args.max_steps:
        steps_to_run = min(steps_to_run, args.max_steps - run["global_step"])
    started = last = time.perf_counter()
    bar = tqdm(total=first_step + steps_to_run, initial=first_step, disable=not ddp.main,
               desc=f"{recipe.name} epoch {epoch + 1}/{recipe.epochs}", unit="step")
    batches = iter(loader)
    stopped = False
    for _ in range(steps_to_run):
        t0 = time.perf_counter()
        batch = next(batches, None)
        waited = time.perf_counter() - t0
        if batch is None:
            break
        torch.manual_seed(step_seed(t.seed, epoch, run["step"], ddp.rank))
        loss = backward(t.net, batch, t.criterion, t.optimizer, t.scaler, ddp.device, recipe.grad_clip)
        # the step, its log row and its recorded rows, all or none: a Ctrl-C
        # waits for the block, so the checkpoint and the logs agree
        with t.stop.updating():
            update(t.optimizer, t.scaler)
            run["step"] += 1
            run["global_step"] += 1
            if args.record_samples:
                t.seen_rows.append(batch["index"].numpy())
            now = time.perf_counter()
            t.log.add(loss, global_step=run["global_step"], epoch=epoch, step=run["step"],
                      lr=t.optimizer.param_groups[0]["lr"],
                      samples_per_s=len(batch["index"]) * ddp.world_size / (now - last),
                      data_wait_share=waited / (now - last))
        loss_sum += loss
        samples += len(batch["index"])
        wait += waited
        last = now
        bar.update()
        if run["step"] - first_step == steps_to_run:
            t.log.flush()   # the epoch's last losses, so the bar ends on a loss, not nan
        if len(t.log.rows) == 0:
            bar.set_postfix(loss=f"{t.log.last_loss:.4f}",
                            samples_s=f"{samples * ddp.world_size / (now - started):.1f}")
        if args.save_every and run["global_step"] % args.save_every == 0:
            t.save_last()
    else:
        stopped = bool(args.max_steps) and run["global_step"] >= args.max_steps
    bar.close()
    t.log.flush()
    seconds = time.perf_counter() - started
    steps = run["step"] - first_step
    return {"stopped": stopped and run["step"] < first_step + len(loader), "seconds": seconds,
            "train_loss": loss_sum.item() / max(steps, 1),
            "samples_per_s": samples * ddp.world_size / seconds, "data_wait_share": wait / seconds}


def end_of_epoch(t: Training, epoch: int, figures: dict) -> bool:
    """Validate, select, checkpoint, log; whether the run goes on."""
    recipe, run, ddp = t.recipe, t.run, t.ddp
    metrics = validate(t.model, run_loader(t, "val", epoch), ddp)
    score = metrics[recipe.select_on]
    epoch_done = not figures["stopped"]
    row = {"epoch": epoch, "step": run["step"], "global_step": run["global_step"],
           "train_loss": figures["train_loss"], "lr": t.optimizer.param_groups[0]["lr"],
           "seconds": figures["seconds"], "samples_per_s": figures["samples_per_s"],
           "data_wait_share": figures["data_wait_share"], "select_on": recipe.select_on,
           "select_score": score, **metrics}
    run["history"].append(row)
    improved = score > run["best_score"]
    if improved:
        run["best_score"], run["best_epoch"], run["epochs_since_best"] = score, epoch, 0
    elif epoch_done:
        run["epochs_since_best"] += 1
    if epoch_done:
        t.scheduler.step()
        run["epoch"], run["step"] = epoch + 1, 0
    if ddp.main:
        if improved:
            with t.stop.updating():
                save_checkpoint(best_path(t.models_dir, recipe.name),
                                {k: v for k, v in t.checkpoint_state().items()
                                 if k not in OPTIMISER_STATE})
        run_folder.append_rows(run_folder.logs_dir(t.args.out) / f"{recipe.name}.csv",
                               run_folder.EPOCH_FIELDS, [row])
        t.log.board.scalars(run["global_step"], {f"val/{k}": v for k, v in metrics.items()})
        print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {recipe.select_on} "
              f"{score:.4f} (best {run['best_score']:.4f}), {row['samples_per_s']:.1f} "
              f"samples/s, data wait {row['data_wait_share']:.0%}")
    t.save_last()
    if figures["stopped"] or (t.args.max_steps and run["global_step"] >= t.args.max_steps):
        return False
    if recipe.early_stop and run["epochs_since_best"] >= recipe.early_stop:
        if ddp.main:
            print(f"early stop: no better {recipe.select_on} for {recipe.early_stop} epochs")
        return False
    return True


# Flags the resume command leaves out: those naming the run (written first)
# and those whose values the checkpoint brings back (recipe, seed, weights).
NOT_REPEATED_ON_RESUME = {"help", "member", "store", "out", "resume", "overwrite", "seed",
                          "encoder_weights", *RECIPE_FLAGS}


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run: its member, store and run
    folder, then every other flag it was given (device, workers, storage
    options, cache, ...) that the checkpoint does not bring back."""
    words = ["python", "trainers/train.py", "--member", args.member, "--store", str(args.store),
             "--out", str(args.out), "--resume"]
    for action in build_parser()._actions:
        value = getattr(args, action.dest, None)
        if (not action.option_strings or action.dest in NOT_REPEATED_ON_RESUME
                or value == action.default):
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:   # a switch
            words.append(flag)
        elif isinstance(value, list):   # a repeated flag: --storage-option
            for item in value:
                words += [flag, storages.format_option(item)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def train(args: argparse.Namespace) -> int:
    ddp = distributed.setup(resolve_device(args.device), force=args.ddp,
                            timeout_minutes=args.dist_timeout)
    try:
        return train_member(args, ddp)
    finally:
        ddp.close()


def train_member(args: argparse.Namespace, ddp: distributed.Distributed) -> int:
    on_cuda = ddp.device.type == "cuda"
    if args.memory_format == "auto":
        args.memory_format = "channels_last" if on_cuda else "contiguous"
    if ddp.local_world_size > 1:
        torch.set_num_threads(cores_per_process())
    # one input size all run long: let cuDNN time its algorithms once and keep the fastest
    torch.backends.cudnn.benchmark = on_cuda
    fingerprint = layout.open_store(args.store).attrs.get("fingerprint")
    if ddp.main:
        run_folder.prepare(args.out, args.member, resume=args.resume, overwrite=args.overwrite)
    ddp.barrier()
    models_dir = run_folder.models_dir(args.out)

    # --- recipe, and the run's state when resuming
    state = None
    if args.resume:
        path = last_path(models_dir, args.member)
        state = load_checkpoint(path, member=args.member, fingerprint=fingerprint,
                                fields=RESUME_FIELDS)
        recipe = resumed_run(state, path, args)
        seed = state["seed"]
        args.encoder_weights = state.get("encoder_weights", args.encoder_weights)
    else:
        recipe = dataclasses.replace(get_recipe(args.member), **recipe_overrides(args))
        seed = 0 if args.seed is None else args.seed
    check_metric_name(recipe.select_on)
    if recipe.mining:
        run_mining(recipe, args, models_dir, ddp)

    # --- model, optimiser, schedule
    if state is None:
        torch.manual_seed(seed)   # initialisation of the decoder and gate
        model, recipe = initial_model(recipe, args, models_dir, fingerprint)
    else:
        model = build_model(recipe.encoder, recipe.in_channels, encoder_weights="none")
        model.load_state_dict(state["model"])
    freeze_unused(model, recipe.in_channels)
    model.to(ddp.device, memory_format=MEMORY_FORMATS[args.memory_format]).train()
    optimizer = build_optimizer(model, recipe, fused=on_cuda)
    scheduler = build_scheduler(optimizer, recipe)
    scaler = grad_scaler(ddp.device)
    run = {"epoch": 0, "step": 0, "global_step": 0, "best_score": -np.inf, "best_epoch": -1,
           "epochs_since_best": 0, "history": []}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        run.update({k: state[k] for k in run})

    config = {"member": recipe.name, "recipe": recipe_to_dict(recipe), "seed": seed,
              "flags": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "device": str(ddp.device), "world_size": ddp.world_size,
              "precision": precision_name(ddp.device), "store": str(args.store),
              "store_fingerprint": fingerprint, "resumed_at_step": run["global_step"] if state else None}
    if ddp.main:
        where = run_folder.write_config(args.out, recipe.name, config)
        print(f"{recipe.name}: device {ddp.device}"
              f"{f' ({torch.cuda.get_device_name(ddp.device)})' if on_cuda else ''}, "
              f"backend {resolve_backend(args.backend, ddp.device)}, "
              f"world size {ddp.world_size} ({ddp.backend}), precision {precision_name(ddp.device)}, "
              f"memory format {args.memory_format}, {cores_per_process()} cores per process")
        print(f"{recipe.name}: {recipe.epochs} epochs, batch {recipe.batch_size} x {recipe.img_size} px, "
              f"lr {recipe.lr:g} {recipe.schedule[0]}, init {recipe.init}, encoder {recipe.encoder} "
              f"({args.encoder_weights} weights), seed {seed}; run folder {args.out} (config: {where})")

    t = Training(args, ddp, recipe, seed, fingerprint, model, ddp.wrap(model), optimizer, scheduler,
                 scaler, MemberLoss(recipe), run,
                 StepLog(args.out, recipe.name, ddp.main, not args.no_tensorboard), StopOnInterrupt(),
                 saved_step=run["global_step"])
    status = 0
    try:
        with t.stop:
            for epoch in range(run["epoch"], recipe.epochs):
                if args.max_steps and run["global_step"] >= args.max_steps:
                    break
                figures = train_one_epoch(t, epoch)
                if not end_of_epoch(t, epoch, figures):
                    break
        if ddp.main:
            run_folder.record_result(args.out, recipe.name, {
                "finished": True, "global_step": run["global_step"], "epoch": run["epoch"],
                "best_score": run["best_score"], "best_epoch": run["best_epoch"],
                "select_on": recipe.select_on,
                "train_seconds": sum(row["seconds"] for row in run["history"])})
    except (KeyboardInterrupt, storages.StorageUnavailable) as exc:
        # a store URL that stops answering mid-run (after botocore's retries)
        # ends the run as Ctrl-C does: the steps done so far are kept, and
        # the resume command below always has a checkpoint to start from
        if (t.saved_step != run["global_step"]
                or not last_path(t.models_dir, recipe.name).is_file()):
            t.save_last()
        interrupted = isinstance(exc, KeyboardInterrupt)
        status = INTERRUPTED if interrupted else 2
        if ddp.main:
            print("\ninterrupted" if interrupted else f"\nerror: {exc}\nstopped",
                  f"at step {run['global_step']}; the last checkpoint holds it. "
                  f"Resume with: {resume_command(args)}", file=sys.stderr)
    finally:
        for loader in t.loaders.values():   # their pipelines and reader workers end here
            loader.close()
        t.log.flush()
        t.log.board.close()
        if args.record_samples:
            rows = np.concatenate(t.seen_rows) if t.seen_rows else np.zeros(0, np.int64)
            np.save(run_folder.logs_dir(args.out) / f"{recipe.name}_samples_rank{ddp.rank}.npy", rows)
        if ddp.main and run_folder.read_rows(t.log.path):
            run_folder.plot_curves(args.out, recipe.name)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
