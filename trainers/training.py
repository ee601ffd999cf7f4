"""The training of one member, for trainers/train.py (whose docstring gives
the reading order, from train() on): run folder, starting point, mining, the
epochs with their checkpoints, validation and logs.

Apart from the command line (trainers/train.py), which imports this module
only once its arguments are parsed: torch, DALI and the model libraries take
seconds to import, and --help or a mistyped flag should not wait for them.
"""
from __future__ import annotations

import dataclasses
import math
import shlex
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

import engine
from engine import storage as storages
from engine import store as layout
from engine.device import resolve_device
from engine.loader import MEMORY_FORMATS, SharedMemoryError, cores_per_process, resolve_backend
from engine.recipes import Recipe
from trainers import config as run_config
from trainers import distributed, mining, run_folder
from trainers.checkpoint import (OPTIMISER_STATE, RESUME_FIELDS, CheckpointError, best_path,
                                 last_path, load_checkpoint, load_member, recipe_from_dict,
                                 recipe_to_dict, require_checkpoint, save_checkpoint)
from trainers.config import ConfigError, RunConfig
from trainers.losses import MemberLoss
from trainers.metrics import check_metric_name, pixel_counts, summarize
from trainers.model import WeightsUnavailable, build_model, freeze_unused
from trainers.precision import autocast, grad_scaler, precision_name
from trainers.schedules import build_optimizer, build_scheduler

if TYPE_CHECKING:
    from trainers.train import Request

# Step losses are read from the device (which waits for the GPU to finish the
# step) and logged every this many steps.
SHOW_LOSS_EVERY = 10
INTERRUPTED = 130   # exit status after Ctrl-C, as shells report it


# Errors that are the user's to fix: printed as one message, exit status 2.
USER_ERRORS = (CheckpointError, WeightsUnavailable, layout.StoreError, SharedMemoryError,
               run_folder.RunFolderError, storages.StorageUnavailable, ConfigError)


def resumed_run(state: dict, path: Path, config: RunConfig) -> Recipe:
    """The saved run's recipe with the overrides a resumed run may make (more epochs);
    a seed or other recipe field unlike the saved run's is refused (load_checkpoint
    refused another member's or store's checkpoint already)."""
    saved = recipe_from_dict(state["recipe"])
    wanted = dataclasses.asdict(run_config.apply_overrides(saved, config.recipe))
    changed = {name: value for name, value in wanted.items()
               if name != "epochs" and value != getattr(saved, name)
               and not dataclasses.is_dataclass(getattr(saved, name))}
    changed.update({name: value for name in ("sampling", "view")
                    if (value := wanted[name]) != dataclasses.asdict(getattr(saved, name))})
    if config.seed is not None and config.seed != state["seed"]:
        changed["seed"] = config.seed
    if changed:
        flags = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in changed.items())
        raise CheckpointError(f"{path}: --resume continues the saved run as it was; {flags} "
                              "differ from it (only --epochs may change). Drop them, or train "
                              "afresh without --resume")
    return dataclasses.replace(saved, epochs=config.recipe.get("epochs", saved.epochs))


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed of torch's generator (dropout) for one batch: a resumed run redraws the same."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])


def backward(net, batch: dict, criterion, scaler, device: torch.device,
             precision: str = "auto", share: float = 1.0) -> torch.Tensor:
    """Forward (under the run's autocast), backward of `share` of the loss
    (gradients add up over accumulated batches); the batch loss, detached,
    still on the device (reading it waits for the GPU)."""
    with autocast(device, precision):
        logits = net(batch["image"])
    loss = criterion(logits.float(), batch["mask"])
    scaled = loss * share if share != 1.0 else loss
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss.detach()


def update(net, optimizer, scaler, grad_clip) -> None:
    """Optional clipping of the true gradients, the optimiser step, and the
    gradients cleared for the next step."""
    if scaler is not None:
        scaler.unscale_(optimizer)   # clip the true gradients, not the scaled ones
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimiser_step(net, batch: dict, criterion, optimizer, scaler, device: torch.device,
                   grad_clip, precision: str = "auto") -> torch.Tensor:
    """backward, then update; the detached batch loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward(net, batch, criterion, scaler, device, precision)
    update(net, optimizer, scaler, grad_clip)
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


def initial_model(recipe: Recipe, config: RunConfig, models_dir: Path,
                  fingerprint: str) -> tuple[torch.nn.Module, Recipe]:
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
    weights = config.encoder_weights
    init = {"imagenet": "imagenet", "none": "random"}.get(weights, f"file:{weights}")
    return (build_model(recipe.encoder, recipe.in_channels, weights),
            dataclasses.replace(recipe, init=init))


def run_mining(recipe: Recipe, config: RunConfig, models_dir: Path,
               ddp: distributed.Distributed) -> None:
    """Every rank mines its share, rank 0 writes; reused while the checkpoint is unchanged."""
    # every rank checks, so a missing checkpoint stops all of them, not only rank 0
    path = require_checkpoint(models_dir, mining.MINING_MEMBER, recipe.name,
                              f"{recipe.mining} mining")
    result, reused = mining.ensure_mining(
        config.store, recipe.mining, path, batch_size=recipe.batch_size, img_size=recipe.img_size,
        device=str(ddp.device), workers=config.workers, ddp=ddp, storage=config.storage)
    if ddp.main:
        print(f"{recipe.mining} mining ({'reused' if reused else 'new'}, checkpoint "
              f"{result['checkpoint'][:12]}): {int(result['flag'].sum())} images flagged")


@torch.no_grad()
def validate(model: torch.nn.Module, loader, ddp: distributed.Distributed,
             precision: str = "auto") -> dict:
    """Metrics over the member's validation rows (`loader`: the run's
    validation loader, run_loader), each rank scoring its share, in the
    precision of training."""
    model.eval()
    counts = [np.zeros((0, 4), np.int64)]
    for batch in loader:
        with autocast(ddp.device, precision):
            logits = model(batch["image"])
        counts.append(pixel_counts(logits.float(), batch["mask"]))
    model.train()
    return summarize(np.concatenate(ddp.all_gather(np.concatenate(counts))))


@dataclasses.dataclass
class RunState:
    """Where a run stands and what it selected: saved in every checkpoint
    (at its top level, RESUME_FIELDS), restored on --resume."""

    epoch: int = 0
    step: int = 0                 # batches of the epoch done
    global_step: int = 0          # optimiser steps done
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    history: list = dataclasses.field(default_factory=list)
    # the figures of an epoch whose batches are done and whose validation is
    # not: a run stopped while validating resumes with them
    epoch_figures: dict | None = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state.get(field.name, getattr(self, field.name)))


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

    config: RunConfig
    ddp: distributed.Distributed
    recipe: Recipe
    seed: int
    fingerprint: str
    memory_format: str            # the resolved --memory-format
    model: torch.nn.Module
    net: torch.nn.Module          # the model, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    criterion: torch.nn.Module
    state: RunState               # position and selection, saved in checkpoints
    log: StepLog
    stop: StopOnInterrupt
    saved_step: int = -1          # global_step of the newest last checkpoint
    seen_rows: list = dataclasses.field(default_factory=list)
    loaders: dict = dataclasses.field(default_factory=dict)   # split -> the run's one loader

    @property
    def models_dir(self) -> Path:
        return run_folder.models_dir(self.config.out)

    def checkpoint_state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "recipe": recipe_to_dict(self.recipe), "fingerprint": self.fingerprint,
                "seed": self.seed, "encoder_weights": self.config.encoder_weights,
                **self.state.state_dict()}

    def save_last(self) -> None:
        with self.stop.updating():   # a Ctrl-C waits for the file to be whole
            if self.ddp.main:
                save_checkpoint(last_path(self.models_dir, self.recipe.name), self.checkpoint_state())
            self.saved_step = self.state.global_step


def run_loader(t: Training, split: str, epoch: int, start_batch: int = 0):
    """The run's one loader of `split` ("train" or "val"): made on first use,
    then re-planned in place for each epoch, so one DALI pipeline and one set
    of reader workers serve the whole run (engine/loader.py, Loader);
    train_member's finally closes it."""
    loader = t.loaders.get(split)
    if loader is not None:
        return loader.set_epoch(epoch, start_batch)
    config, recipe, ddp = t.config, t.recipe, t.ddp
    loader = engine.make_loader(
        config.store, recipe, split=split, batch_size=recipe.batch_size, img_size=recipe.img_size,
        seed=t.seed, epoch=epoch, device=str(ddp.device), rank=ddp.rank,
        world_size=ddp.world_size, start_batch=start_batch, augment=split == "train",
        workers=config.workers, backend=config.backend, memory_format=t.memory_format,
        storage=config.storage)
    t.loaders[split] = loader
    return loader


def accumulate(t: Training, batches, count: int, epoch: int):
    """Forward and backward of the next `count` batches, their gradients
    adding up (DDP syncs on the last only); (mean loss on the device, the
    batches' rows, seconds waited for them), or None when the loader ran dry."""
    losses, rows, waited = [], [], 0.0
    for k in range(count):
        t0 = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - t0
        if batch is None:
            return None
        torch.manual_seed(step_seed(t.seed, epoch, t.state.step + k, t.ddp.rank))
        sync = k == count - 1 or not hasattr(t.net, "no_sync")
        with nullcontext() if sync else t.net.no_sync():
            losses.append(backward(t.net, batch, t.criterion, t.scaler, t.ddp.device,
                                   t.config.precision, 1.0 / count))
        rows.append(batch["index"])
    return torch.stack(losses).mean() if count > 1 else losses[0], rows, waited


def optimiser_steps(t: Training, loader) -> int:
    """Optimiser steps left in the epoch from where the run stands (the last
    may take fewer than --grad-accum-steps batches), within --max-steps."""
    steps = math.ceil(len(loader) / t.config.grad_accum_steps)
    if t.config.max_steps:
        steps = min(steps, t.config.max_steps - t.state.global_step)
    return max(steps, 0)


def take_step(t: Training, epoch: int, loss, rows: list, waited: float, since: float) -> float:
    """The update, its step counters, its log row and its recorded rows, all
    or none: a Ctrl-C waits for the block, so the checkpoint and the logs
    agree. The time it ended."""
    state, ddp = t.state, t.ddp
    with t.stop.updating():
        update(t.net, t.optimizer, t.scaler, t.recipe.grad_clip)
        lr = t.optimizer.param_groups[0]["lr"]
        t.scheduler.step()
        state.step += len(rows)
        state.global_step += 1
        if t.config.record_samples:
            t.seen_rows.extend(r.numpy() for r in rows)
        now = time.perf_counter()
        samples = sum(len(r) for r in rows)
        t.log.add(loss, global_step=state.global_step, epoch=epoch, step=state.step, lr=lr,
                  samples_per_s=samples * ddp.world_size / (now - since),
                  data_wait_share=waited / (now - since))
    return now


def train_one_epoch(t: Training, epoch: int) -> dict:
    """Train on the epoch's batches from where the run stands; the epoch's
    figures, with "stopped" set when --max-steps ended it early."""
    state, ddp, config = t.state, t.ddp, t.config
    loader = run_loader(t, "train", epoch, state.step)
    first_step, batches_left, steps_to_run = state.step, len(loader), optimiser_steps(t, loader)
    if state.epoch_figures is not None:   # stopped while validating these batches
        if not steps_to_run:
            return state.epoch_figures   # validate them again
        state.epoch_figures = None       # more steps allowed now: train on
    first_global_step = state.global_step
    wait, samples, loss_sum = 0.0, 0, torch.zeros((), device=ddp.device)
    started = last = time.perf_counter()
    bar = tqdm(total=first_step + batches_left, initial=first_step, disable=not ddp.main,
               desc=f"{t.recipe.name} epoch {epoch + 1}/{t.recipe.epochs}", unit="batch")
    batches = iter(loader)
    for done in range(1, steps_to_run + 1):
        taken = accumulate(t, batches, min(config.grad_accum_steps, batches_left), epoch)
        if taken is None:
            break
        loss, rows, waited = taken
        last = take_step(t, epoch, loss, rows, waited, last)
        batches_left -= len(rows)
        loss_sum += loss
        samples += sum(len(r) for r in rows)
        wait += waited
        bar.update(len(rows))
        if done == steps_to_run:
            t.log.flush()   # the epoch's last losses, so the bar ends on a loss, not nan
        if len(t.log.rows) == 0:
            bar.set_postfix(loss=f"{t.log.last_loss:.4f}",
                            samples_s=f"{samples * ddp.world_size / (last - started):.1f}")
        if config.save_every and state.global_step % config.save_every == 0:
            t.save_last()
    bar.close()
    t.log.flush()
    seconds = time.perf_counter() - started
    return {"stopped": batches_left > 0, "seconds": seconds,
            "train_loss": loss_sum.item() / max(state.global_step - first_global_step, 1),
            "samples_per_s": samples * ddp.world_size / seconds, "data_wait_share": wait / seconds}


def end_of_epoch(t: Training, epoch: int, figures: dict) -> bool:
    """Checkpoint, validate, select, checkpoint again, log; whether the run goes on."""
    recipe, state, ddp = t.recipe, t.state, t.ddp
    if t.saved_step != state.global_step:
        # a run stopped while validating resumes here, not at the last --save-every
        state.epoch_figures = figures
        t.save_last()
    metrics = validate(t.model, run_loader(t, "val", epoch), ddp, t.config.precision)
    state.epoch_figures = None
    row = {"epoch": epoch, "step": state.step, "global_step": state.global_step,
           "train_loss": figures["train_loss"], "lr": t.optimizer.param_groups[0]["lr"],
           "seconds": figures["seconds"], "samples_per_s": figures["samples_per_s"],
           "data_wait_share": figures["data_wait_share"], "select_on": recipe.select_on,
           "select_score": metrics[recipe.select_on], **metrics}
    improved = select(t, epoch, row, epoch_done=not figures["stopped"])
    if ddp.main:
        if improved:
            with t.stop.updating():
                save_checkpoint(best_path(t.models_dir, recipe.name),
                                {k: v for k, v in t.checkpoint_state().items()
                                 if k not in OPTIMISER_STATE})
        run_folder.append_rows(run_folder.logs_dir(t.config.out) / f"{recipe.name}.csv",
                               run_folder.EPOCH_FIELDS, [row])
        t.log.board.scalars(state.global_step, {f"val/{k}": v for k, v in metrics.items()})
        print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {recipe.select_on} "
              f"{row['select_score']:.4f} (best {state.best_score:.4f}), {row['samples_per_s']:.1f} "
              f"samples/s, data wait {row['data_wait_share']:.0%}")
    t.save_last()
    return goes_on(t, figures)


def select(t: Training, epoch: int, row: dict, epoch_done: bool) -> bool:
    """Record the validation in the run's state; whether it is the best yet."""
    state = t.state
    state.history.append(row)
    improved = row["select_score"] > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.epochs_since_best = row["select_score"], epoch, 0
    elif epoch_done:
        state.epochs_since_best += 1
    if epoch_done:
        state.epoch, state.step = epoch + 1, 0
    return improved


def goes_on(t: Training, figures: dict) -> bool:
    """Whether the run trains another epoch: not after --max-steps, nor
    after the recipe's early stop."""
    state, recipe = t.state, t.recipe
    if figures["stopped"] or (t.config.max_steps and state.global_step >= t.config.max_steps):
        return False
    if recipe.early_stop and state.epochs_since_best >= recipe.early_stop:
        if t.ddp.main:
            print(f"early stop: no better {recipe.select_on} for {recipe.early_stop} epochs")
        return False
    return True


def resume_command(config: RunConfig) -> str:
    """The command that continues this run: the rest of its settings come
    back from RUN/config.json, except credentials, never recorded: they are
    named for the user to give again (or to set in the environment)."""
    words = ["python", "trainers/train.py", "--member", config.member, "--out", str(config.out),
             "--resume"]
    for name in config.storage.options:
        if storages.is_secret(name):
            words += ["--storage-option", f"{name}=<{name.upper()}>"]
    return shlex.join(words)


def train(request: Request) -> int:
    config = request.config
    ddp = distributed.setup(resolve_device(config.device), force=config.ddp,
                            timeout_minutes=config.dist_timeout)
    try:
        return train_member(request, ddp)
    finally:
        ddp.close()


def train_member(request: Request, ddp: distributed.Distributed) -> int:
    config = request.config
    memory_format = set_up_device(config, ddp)
    fingerprint = layout.open_store(config.store, storage=config.storage).attrs.get("fingerprint")
    if ddp.main:
        run_folder.prepare(config.out, config.member, resume=request.resume,
                           overwrite=request.overwrite)
    ddp.barrier()
    recipe, seed, checkpoint = starting_point(request, fingerprint)
    if recipe.mining:
        run_mining(recipe, config, run_folder.models_dir(config.out), ddp)
    t = new_training(config, ddp, recipe, seed, fingerprint, memory_format, checkpoint)
    if ddp.main:
        record_start(t, resumed=checkpoint is not None)
    return run_epochs(t)


def set_up_device(config: RunConfig, ddp: distributed.Distributed) -> str:
    """Threads and cuDNN for this process; the resolved memory format."""
    on_cuda = ddp.device.type == "cuda"
    if ddp.local_world_size > 1:
        torch.set_num_threads(cores_per_process())
    # one input size all run long: let cuDNN time its algorithms once and keep the fastest
    torch.backends.cudnn.benchmark = on_cuda
    if config.memory_format != "auto":
        return config.memory_format
    return "channels_last" if on_cuda else "contiguous"


def starting_point(request: Request, fingerprint: str) -> tuple[Recipe, int, dict | None]:
    """(recipe, seed, the checkpoint when resuming): a new run's recipe is
    the table's with the configuration's overrides; a resumed run's is its
    checkpoint's."""
    config = request.config
    if not request.resume:
        recipe = config.resolved_recipe()
        check_metric_name(recipe.select_on)
        return recipe, 0 if config.seed is None else config.seed, None
    path = last_path(run_folder.models_dir(config.out), config.member)
    state = load_checkpoint(path, member=config.member, fingerprint=fingerprint,
                            fields=RESUME_FIELDS)
    recipe = resumed_run(state, path, config)
    check_metric_name(recipe.select_on)
    return recipe, state["seed"], state


def new_training(config: RunConfig, ddp: distributed.Distributed, recipe: Recipe, seed: int,
                 fingerprint: str, memory_format: str, checkpoint: dict | None) -> Training:
    """Model, optimiser, per-step schedule and run state: a new run's
    initialisation, or the checkpoint's."""
    models_dir = run_folder.models_dir(config.out)
    if checkpoint is None:
        torch.manual_seed(seed)   # initialisation of the decoder and gate
        model, recipe = initial_model(recipe, config, models_dir, fingerprint)
    else:
        config = dataclasses.replace(config, encoder_weights=checkpoint.get(
            "encoder_weights", config.encoder_weights))
        model = build_model(recipe.encoder, recipe.in_channels, encoder_weights="none")
        model.load_state_dict(checkpoint["model"])
    freeze_unused(model, recipe.in_channels)
    model.to(ddp.device, memory_format=MEMORY_FORMATS[memory_format]).train()
    t = Training(config, ddp, recipe, seed, fingerprint, memory_format, model, ddp.wrap(model),
                 build_optimizer(model, recipe, fused=ddp.device.type == "cuda"), None,
                 grad_scaler(ddp.device, config.precision), MemberLoss(recipe), RunState(),
                 StepLog(config.out, recipe.name, ddp.main, config.tensorboard), StopOnInterrupt())
    if checkpoint is not None:
        t.state.load_state_dict(checkpoint)
    # the schedule runs in optimiser steps: the train loader knows an epoch's batches
    loader = run_loader(t, "train", t.state.epoch, t.state.step)
    t.scheduler = build_scheduler(t.optimizer, recipe, warmup_steps=config.warmup_steps,
                                  steps_per_epoch=math.ceil((loader.start_batch + len(loader))
                                                            / config.grad_accum_steps))
    if checkpoint is not None:
        t.optimizer.load_state_dict(checkpoint["optimizer"])
        t.scheduler.load_state_dict(checkpoint["scheduler"])
        if t.scaler is not None and checkpoint.get("scaler"):
            t.scaler.load_state_dict(checkpoint["scaler"])
    t.saved_step = t.state.global_step
    return t


def record_start(t: Training, resumed: bool) -> None:
    """The run's entry in RUN/config.json (credentials redacted), and what it is, printed."""
    config, recipe, ddp = t.config, t.recipe, t.ddp
    on_cuda = ddp.device.type == "cuda"
    precision = precision_name(ddp.device, config.precision)
    where = run_folder.write_config(config.out, recipe.name, {
        "member": recipe.name, "recipe": recipe_to_dict(recipe), "seed": t.seed,
        "config": config.public(), "device": str(ddp.device), "world_size": ddp.world_size,
        "precision": precision, "store": str(config.store), "store_fingerprint": t.fingerprint,
        "resumed_at_step": t.state.global_step if resumed else None})
    print(f"{recipe.name}: device {ddp.device}"
          f"{f' ({torch.cuda.get_device_name(ddp.device)})' if on_cuda else ''}, "
          f"backend {resolve_backend(config.backend, ddp.device)}, "
          f"world size {ddp.world_size} ({ddp.backend}), precision {precision}, "
          f"memory format {t.memory_format}, {cores_per_process()} cores per process")
    print(f"{recipe.name}: {recipe.epochs} epochs, batch {recipe.batch_size} x {recipe.img_size} px"
          f"{f' x {config.grad_accum_steps} accumulated' if config.grad_accum_steps > 1 else ''}, "
          f"lr {recipe.lr:g} {recipe.schedule[0]} per step"
          f"{f' after {config.warmup_steps} warm-up steps' if config.warmup_steps else ''}, "
          f"init {recipe.init}, encoder {recipe.encoder} ({config.encoder_weights} weights), "
          f"seed {t.seed}; run folder {config.out} (config: {where})")


def run_epochs(t: Training) -> int:
    """The epochs from where the run stands; 0, or how it was stopped."""
    config, recipe, ddp, state = t.config, t.recipe, t.ddp, t.state
    status = 0
    try:
        with t.stop:
            for epoch in range(state.epoch, recipe.epochs):
                if (config.max_steps and state.global_step >= config.max_steps
                        and state.epoch_figures is None):   # validated already
                    break
                figures = train_one_epoch(t, epoch)
                if not end_of_epoch(t, epoch, figures):
                    break
        if ddp.main:
            run_folder.record_result(config.out, recipe.name, {
                "finished": True, "global_step": state.global_step, "epoch": state.epoch,
                "best_score": state.best_score, "best_epoch": state.best_epoch,
                "select_on": recipe.select_on,
                "train_seconds": sum(row["seconds"] for row in state.history)})
    except (KeyboardInterrupt, storages.StorageUnavailable) as exc:
        # a store URL that stops answering mid-run (after botocore's retries)
        # ends the run as Ctrl-C does: the steps done so far are kept, and
        # the resume command below always has a checkpoint to start from
        if (t.saved_step != state.global_step
                or not last_path(t.models_dir, recipe.name).is_file()):
            t.save_last()
        interrupted = isinstance(exc, KeyboardInterrupt)
        status = INTERRUPTED if interrupted else 2
        # Ctrl-C reaches every rank, so rank 0 speaks for all; a storage error
        # may reach one rank only, and torchrun's agent stops the others as
        # soon as it exits: that rank says it (rank 0 writes the checkpoints,
        # so only rank 0 can say which step the last one holds)
        if ddp.main:
            print("\ninterrupted" if interrupted else f"\nerror: {exc}\nstopped",
                  f"at step {state.global_step}; the last checkpoint holds it. "
                  f"Resume with: {resume_command(config)}", file=sys.stderr)
        elif not interrupted:
            print(f"\nrank {ddp.rank}: error: {exc}\nstopped; the last checkpoint holds the "
                  f"steps rank 0 saved. Resume with: {resume_command(config)}", file=sys.stderr)
    finally:
        close_run(t)
    return status


def close_run(t: Training) -> None:
    """The loaders' pipelines and reader workers end; logs, samples and curves written."""
    for loader in t.loaders.values():
        loader.close()
    t.log.flush()
    t.log.board.close()
    if t.config.record_samples:
        rows = np.concatenate(t.seen_rows) if t.seen_rows else np.zeros(0, np.int64)
        np.save(run_folder.logs_dir(t.config.out)
                / f"{t.recipe.name}_samples_rank{t.ddp.rank}.npy", rows)
    if t.ddp.main and run_folder.read_rows(t.log.path):
        run_folder.plot_curves(t.config.out, t.recipe.name)
