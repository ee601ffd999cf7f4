"""Train one ensemble member from the store: `python trainers/train.py --member NAME`.

The member's recipe (engine/recipes.py) says everything; flags override it for
one run. One loop, top to bottom:

  recipe + flags -> store -> (mining) -> model -> optimiser, schedule
  for each epoch: train on the loader's batches (resumable at any batch),
                  validate, select `<member>_best.pth`, write `<member>_last.pth`
                  and a CSV row; stop early where the recipe says
  -> PNG of the curves

Multi-process: `torchrun --nproc_per_node N trainers/train.py ...` (gloo on
CPU, NCCL on GPU, one GPU per rank); each rank trains on its slice of the
epoch plan, mines and validates its share, and uses its share of the node's
cores for loader workers. `--ddp` runs that code path in one process too.

On CUDA: bf16 autocast (fp16 with a gradient scaler on GPUs without bf16) in
training, validation and mining alike, cuDNN autotuning for the fixed input
size, channels-last tensors, fused AdamW; the loss stays on the GPU and is
read only when the progress bar shows it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import engine
from engine import store as layout
from engine.loader import BACKENDS, MEMORY_FORMATS, SharedMemoryError, cores_per_process, resolve_device
from engine.recipes import RECIPES, Recipe, get_recipe
from trainers import distributed, mining
from trainers.checkpoint import (RESUME_FIELDS, CheckpointError, best_path, last_path, load_checkpoint,
                                 load_member, recipe_from_dict, recipe_to_dict,
                                 require_checkpoint, save_checkpoint)
from trainers.losses import MemberLoss
from trainers.metrics import check_metric_name, pixel_counts, summarize
from trainers.model import ENCODER_WEIGHTS, WeightsUnavailable, build_model, freeze_unused
from trainers.precision import autocast, grad_scaler, precision_name
from trainers.schedules import build_optimizer, build_scheduler

# Errors that are the user's to fix: printed as one message, exit status 2.
USER_ERRORS = (CheckpointError, WeightsUnavailable, layout.StoreError, SharedMemoryError)
# The progress bar's loss is read from the device every this many steps
# (each read waits for the GPU to finish the step).
SHOW_LOSS_EVERY = 10
# Flags that override a recipe field of the same name for one run.
RECIPE_FLAGS = ("epochs", "img_size", "batch_size", "lr", "encoder", "grad_clip", "early_stop")
CSV_FIELDS = ("epoch", "step", "global_step", "train_loss", "lr", "seconds", "samples_per_s",
              "data_wait_share", "select_on", "select_score", "mean_image_mcc", "pooled_mcc",
              "mean_image_dice", "pooled_dice", "mean_image_recall", "pooled_recall",
              "recall_dice")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--member", required=True, choices=list(RECIPES))
    p.add_argument("--store", type=Path, default=layout.DEFAULT_STORE,
                   help=f"the store (default: {layout.DEFAULT_STORE})")
    p.add_argument("--out", type=Path, default=None,
                   help="writes OUT/models and OUT/logs (default: ./models and ./logs)")
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
    p.add_argument("--encoder-weights", choices=ENCODER_WEIGHTS, default="imagenet",
                   help="'none' never downloads (offline machines, tests); default: imagenet")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimiser steps in all (resumed runs included); "
                        "validates and writes checkpoints; --resume continues from there")
    p.add_argument("--save-every", type=int, default=500,
                   help="also write <member>_last.pth every this many steps "
                        "(0: epoch ends only; default: 500)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA where present (default)")
    p.add_argument("--seed", type=int, default=None,
                   help="plan, augmentation, initialisation and dropout all follow it "
                        "(default: 0, or the resumed run's)")
    p.add_argument("--resume", action="store_true", help="continue from <member>_last.pth")
    p.add_argument("--workers", type=int, default=None, help="loader reader processes")
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
    p.add_argument("--record-samples", action="store_true",
                   help="write the meta rows this process trained on to "
                        "logs/<member>_samples_rank<R>.npy")
    args = p.parse_args(argv)
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


def optimiser_step(net, batch: dict, criterion, optimizer, scaler, device: torch.device,
                   grad_clip) -> torch.Tensor:
    """Forward (under autocast on CUDA), backward, optional clipping, update;
    the batch loss, detached, still on the device (reading it waits for the GPU)."""
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
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach()


def initial_model(recipe: Recipe, args, models_dir: Path, fingerprint: str) -> tuple[torch.nn.Module, Recipe]:
    """ImageNet (or random) initialisation, or the best checkpoint of the member it fine-tunes."""
    if recipe.init.startswith("finetune:"):
        parent = recipe.init.split(":", 1)[1]
        path = require_checkpoint(models_dir, parent, recipe.name, "its initial weights")
        model, parent_recipe, _ = load_member(path, member=parent, fingerprint=fingerprint)
        if parent_recipe.in_channels != recipe.in_channels:
            raise CheckpointError(f"{path}: {parent_recipe.in_channels} input channels, member "
                                  f"{recipe.name!r} needs {recipe.in_channels}")
        # the architecture is the parent's: record its encoder in this run's recipe
        return model.train(), dataclasses.replace(recipe, encoder=parent_recipe.encoder)
    return build_model(recipe.encoder, recipe.in_channels, args.encoder_weights), recipe


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
def validate(model: torch.nn.Module, recipe: Recipe, args, ddp: distributed.Distributed, seed: int,
             epoch: int) -> dict:
    """Metrics over the member's validation rows, each rank scoring its share,
    in the precision of training."""
    model.eval()
    loader = engine.make_loader(args.store, recipe, split="val", batch_size=recipe.batch_size,
                                img_size=recipe.img_size, seed=seed, epoch=epoch,
                                device=str(ddp.device), rank=ddp.rank,
                                world_size=ddp.world_size, augment=False, workers=args.workers,
                                backend=args.backend, memory_format=args.memory_format)
    counts = [np.zeros((0, 4), np.int64)]
    for batch in loader:
        with autocast(ddp.device):
            logits = model(batch["image"])
        counts.append(pixel_counts(logits.float(), batch["mask"]))
    model.train()
    return summarize(np.concatenate(ddp.all_gather(np.concatenate(counts))))


def append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_curves(history: list[dict], path: Path, member: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [row["global_step"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [row["train_loss"] for row in history], marker="o")
    ax_loss.set(xlabel="optimiser step", ylabel="train loss", title=member)
    ax_metric.plot(x, [row["select_score"] for row in history], marker="o")
    ax_metric.set(xlabel="optimiser step", ylabel=history[-1]["select_on"], title="validation")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    out = args.out or Path(".")
    models_dir, logs_dir = out / "models", out / "logs"
    models_dir.mkdir(parents=True, exist_ok=True)
    logs_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = layout.open_store(args.store).attrs.get("fingerprint")

    # --- recipe, and the run's state when resuming
    state = None
    if args.resume:
        path = last_path(models_dir, args.member)
        state = load_checkpoint(path, member=args.member, fingerprint=fingerprint,
                                fields=RESUME_FIELDS)
        recipe = resumed_run(state, path, args)
        seed = state["seed"]
    else:
        recipe = dataclasses.replace(get_recipe(args.member), **recipe_overrides(args))
        seed = 0 if args.seed is None else args.seed
    check_metric_name(recipe.select_on)
    if ddp.main:
        print(f"{recipe.name}: device {ddp.device}"
              f"{f' ({torch.cuda.get_device_name(ddp.device)})' if on_cuda else ''}, "
              f"backend {args.backend if args.backend != 'auto' else ('dali' if on_cuda else 'opencv')}, "
              f"world size {ddp.world_size} ({ddp.backend}), precision {precision_name(ddp.device)}, "
              f"memory format {args.memory_format}, {cores_per_process()} cores per process")
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
    criterion = MemberLoss(recipe)
    run = {"epoch": 0, "step": 0, "global_step": 0, "best_score": -np.inf, "best_epoch": -1,
           "epochs_since_best": 0, "history": []}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        run.update({k: state[k] for k in run})
    elif ddp.main:
        (logs_dir / f"{recipe.name}.csv").unlink(missing_ok=True)
    net = ddp.wrap(model)

    def checkpoint_state() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "recipe": recipe_to_dict(recipe), "fingerprint": fingerprint, "seed": seed,
                **run}

    seen_rows = []
    stopped = False
    for epoch in range(run["epoch"], recipe.epochs):
        if args.max_steps and run["global_step"] >= args.max_steps:
            break
        # --- train: the loader starts at the batch a resumed run left off
        loader = engine.make_loader(
            args.store, recipe, split="train", batch_size=recipe.batch_size,
            img_size=recipe.img_size, seed=seed, epoch=epoch, device=str(ddp.device),
            rank=ddp.rank, world_size=ddp.world_size, start_batch=run["step"],
            workers=args.workers, backend=args.backend, memory_format=args.memory_format)
        first_step, wait, samples = run["step"], 0.0, 0
        loss_sum = torch.zeros((), device=ddp.device)
        steps_to_run = len(loader)
        if args.max_steps:
            steps_to_run = min(steps_to_run, args.max_steps - run["global_step"])
        started = time.perf_counter()
        bar = tqdm(total=first_step + steps_to_run, initial=first_step, disable=not ddp.main,
                   desc=f"{recipe.name} epoch {epoch + 1}/{recipe.epochs}", unit="step")
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - t0
            if batch is None:
                break
            torch.manual_seed(step_seed(seed, epoch, run["step"], ddp.rank))
            loss = optimiser_step(net, batch, criterion, optimizer, scaler, ddp.device,
                                  recipe.grad_clip)
            run["step"] += 1
            run["global_step"] += 1
            loss_sum += loss
            samples += len(batch["index"])
            if args.record_samples:
                seen_rows.append(batch["index"].numpy())
            bar.update()
            done = run["step"] - first_step
            if done % SHOW_LOSS_EVERY == 0 or done == steps_to_run:
                rate = samples * ddp.world_size / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.1f}")
            if ddp.main and args.save_every and run["global_step"] % args.save_every == 0:
                save_checkpoint(last_path(models_dir, recipe.name), checkpoint_state())
            if args.max_steps and run["global_step"] >= args.max_steps:
                stopped = True
                break
        bar.close()
        seconds = time.perf_counter() - started
        steps = run["step"] - first_step

        # --- validate, select, checkpoint, log
        metrics = validate(model, recipe, args, ddp, seed, epoch)
        score = metrics[recipe.select_on]
        lr = optimizer.param_groups[0]["lr"]
        epoch_done = not stopped or run["step"] == len(loader) + first_step
        row = {"epoch": epoch, "step": run["step"], "global_step": run["global_step"],
               "train_loss": loss_sum.item() / max(steps, 1), "lr": lr, "seconds": seconds,
               "samples_per_s": samples * ddp.world_size / seconds,
               "data_wait_share": wait / seconds, "select_on": recipe.select_on,
               "select_score": score, **metrics}
        run["history"].append(row)
        improved = score > run["best_score"]
        if improved:
            run["best_score"], run["best_epoch"], run["epochs_since_best"] = score, epoch, 0
        elif epoch_done:
            run["epochs_since_best"] += 1
        if epoch_done:
            scheduler.step()
            run["epoch"], run["step"] = epoch + 1, 0
        if ddp.main:
            if improved:
                save_checkpoint(best_path(models_dir, recipe.name), checkpoint_state())
            save_checkpoint(last_path(models_dir, recipe.name), checkpoint_state())
            append_csv(logs_dir / f"{recipe.name}.csv", row)
            print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {recipe.select_on} "
                  f"{score:.4f} (best {run['best_score']:.4f}), {row['samples_per_s']:.1f} "
                  f"samples/s, data wait {row['data_wait_share']:.0%}")
        if stopped:
            break
        if recipe.early_stop and run["epochs_since_best"] >= recipe.early_stop:
            if ddp.main:
                print(f"early stop: no better {recipe.select_on} for {recipe.early_stop} epochs")
            break

    if args.record_samples:
        rows = np.concatenate(seen_rows) if seen_rows else np.zeros(0, np.int64)
        np.save(logs_dir / f"{recipe.name}_samples_rank{ddp.rank}.npy", rows)
    if ddp.main and run["history"]:
        plot_curves(run["history"], logs_dir / f"{recipe.name}.png", recipe.name)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
