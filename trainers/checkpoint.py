"""Member checkpoints: what they hold, how they are written and read back.

A checkpoint is one torch.save'd dict: model, optimiser, scheduler (and AMP
scaler) states, the position of the run (epoch, step = next batch of that
epoch, global_step), the recipe as a dict, the store's fingerprint, the seed
and the run's history. Random state is a function of (seed, epoch, step,
rank): the loader re-seeds every batch and the trainer re-seeds torch before
every step, so the seed and the position restore it exactly (DALI has no
state to save: REFERENCES.md).

Files are written beside their target and renamed into place
(trainers/atomic.py), so a kill leaves either the old or the new file, never a
truncated one. Every load checks what it needs: the format, the fields, and,
where the caller knows them, which member and which store the checkpoint
belongs to (a renamed file must not train or mine under another name).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from engine.recipes import Recipe, SamplingRule, View
from trainers.atomic import atomic_open
from trainers.model import build_model

FORMAT = "forgery-member-checkpoint"
TRAINING_STATE = ("model", "optimizer", "scheduler", "scaler")
MEMBER_FIELDS = ("model", "recipe", "fingerprint")     # enough to predict with
RESUME_FIELDS = MEMBER_FIELDS + ("optimizer", "scheduler", "seed", "epoch", "step", "global_step",
                                 "best_score", "best_epoch", "epochs_since_best", "history")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit this run."""


def best_path(models_dir: Path, member: str) -> Path:
    return Path(models_dir) / f"{member}_best.pth"


def last_path(models_dir: Path, member: str) -> Path:
    return Path(models_dir) / f"{member}_last.pth"


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_from_dict(data: dict) -> Recipe:
    return Recipe(**{**data, "sampling": SamplingRule(**data["sampling"]),
                     "view": View(**data["view"])})


def save_checkpoint(path: Path, state: dict) -> None:
    """Write state to path atomically (a temporary file renamed into place)."""
    with atomic_open(path, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)


def load_checkpoint(path: Path, map_location="cpu", *, member: str | None = None,
                    fingerprint: str | None = None, fields=MEMBER_FIELDS) -> dict:
    """The checkpoint at `path`, refused with a CheckpointError naming the file
    when it is unreadable, lacks `fields`, or belongs to another member or
    store than the ones given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a member checkpoint of this project")
    missing = [name for name in fields if name not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, {', '.join(missing)} missing; "
                              "train the member again (without --resume)")
    recipe = state.get("recipe")
    saved_member = recipe.get("name") if isinstance(recipe, dict) else None
    if member is not None and saved_member != member:
        raise CheckpointError(f"{path}: holds member {saved_member!r}, not {member!r} (a renamed "
                              f"file?); use {saved_member}'s own files or train {member!r}")
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: trained on a store with fingerprint {state.get('fingerprint')!r}, this store has "
            f"{fingerprint!r}; use the store it was trained on, or train {saved_member!r} on this one")
    return state


def require_checkpoint(models_dir: Path, member: str, needed_by: str, purpose: str) -> Path:
    """The best checkpoint of `member`, or a CheckpointError saying how to make it."""
    path = best_path(models_dir, member)
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: member {needed_by!r} needs the {member!r} checkpoint "
            f"for {purpose}. Train that member first: "
            f"`python trainers/train.py --member {member}` (with the same --out)")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_member(path, device="cpu", *, member: str | None = None, fingerprint: str | None = None):
    """(model, recipe, info) of a saved member: the model in eval mode on
    `device`, outputting logits; info is the checkpoint without training state.
    member, fingerprint: refuse a checkpoint of another member or store."""
    state = load_checkpoint(path, member=member, fingerprint=fingerprint)
    recipe = recipe_from_dict(state["recipe"])
    model = build_model(recipe.encoder, recipe.in_channels, encoder_weights="none")
    model.load_state_dict(state["model"])
    model.to(device).eval()
    info = {k: v for k, v in state.items() if k not in TRAINING_STATE}
    return model, recipe, info
