"""Member checkpoints: what they hold, how they are written and read back.

A checkpoint is one torch.save'd dict: model, optimiser, scheduler (and AMP
scaler) states, the position of the run (epoch, step = next batch of that
epoch, global_step), the recipe as a dict, the store's fingerprint, the seed
and the run's history. That is `<member>_last.pth`, which --resume reads;
`<member>_best.pth` is the same without the optimiser, scheduler and scaler
(OPTIMISER_STATE): its readers (prediction, export, fine-tuning, mining)
need the model, and AdamW's two moments would double its size. Random state is a function of (seed, epoch, step,
rank): the loader re-seeds every batch and the trainer re-seeds torch before
every step, so the seed and the position restore it exactly (DALI has no
state to save: docs/architecture.md, "Determinism and resume").

An export (trainers/export.py) is what prediction needs and nothing else:
`<member>.safetensors`, the model's tensors only (a third of the last
checkpoint, readable without torch's pickle format), and `<member>.json` beside it: the
recipe, the store's fingerprint, the sha256 of the checkpoint it came from and
of the weights file, the export time and the versions of torch, smp, timm and
safetensors. load_member reads either kind.

Files are written beside their target and renamed into place
(common/atomic.py), so a kill leaves either the old or the new file, never a
truncated one. Every load checks what it needs: the format, the fields, and,
where the caller knows them, which member and which store the checkpoint
belongs to (a renamed file must not train or mine under another name).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import safetensors.torch
import torch

from engine.recipes import Recipe, SamplingRule, View
from common.atomic import atomic_open
from trainers.model import build_model
from trainers.run_folder import CheckpointError, best_path, last_path  # noqa: F401 (re-exported)

FORMAT = "forgery-member-checkpoint"
OPTIMISER_STATE = ("optimizer", "scheduler", "scaler")   # in last checkpoints, not best
TRAINING_STATE = ("model",) + OPTIMISER_STATE
MEMBER_FIELDS = ("model", "recipe", "fingerprint")     # enough to predict with
RESUME_FIELDS = MEMBER_FIELDS + ("optimizer", "scheduler", "seed", "epoch", "step", "global_step",
                                 "best_score", "best_epoch", "epochs_since_best", "history")
EXPORT_FORMAT = "forgery-member-export"
EXPORT_FIELDS = ("recipe", "fingerprint", "weights_sha256")   # enough to predict with
# Recorded in an export: the packages that build the model its tensors fit.
EXPORT_PACKAGES = ("torch", "segmentation-models-pytorch", "timm", "safetensors")


def export_path(folder: Path, member: str) -> Path:
    """The exported weights of `member`; their description is the same name with .json."""
    return Path(folder) / f"{member}.safetensors"


def member_file(models_dir: Path, member: str) -> Path | None:
    """What prediction loads for `member` from models_dir: `<member>_best.pth`
    where there is one, else the export `<member>.safetensors`; None when
    neither exists. The checkpoint wins where both are present because exports
    are made from checkpoints: if the two differ, the member was trained again
    after the export, and the export is the stale one."""
    for path in (best_path(models_dir, member), export_path(models_dir, member)):
        if path.is_file():
            return path
    return None


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def _tuples(value):
    """JSON's lists as the tuples the recipe table writes (it has no lists), so
    an exported recipe equals the checkpoint's."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    return value


# Recipe fields older checkpoints carry and recipes no longer have
RETIRED_RECIPE_FIELDS = ("extra",)


def recipe_from_dict(data: dict) -> Recipe:
    kept = {k: v for k, v in data.items() if k not in RETIRED_RECIPE_FIELDS}
    return Recipe(**{**kept, "sampling": SamplingRule(**data["sampling"]),
                     "view": View(**data["view"])})


def save_checkpoint(path: Path, state: dict) -> None:
    """Write state to path atomically (a temporary file renamed into place);
    a write the disk refuses (full, a quota) is a CheckpointError naming the
    file, which then holds what it held before."""
    try:
        with atomic_open(path, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
    except (OSError, RuntimeError) as exc:
        # torch's zip writer, closing after a failed write, raises a
        # RuntimeError of its own over the OSError that says why
        refused = exc if isinstance(exc, OSError) else exc.__context__
        if not isinstance(refused, OSError):
            raise
        kept = "the previous checkpoint there is kept" if Path(path).is_file() else "nothing written"
        raise CheckpointError(f"{path}: cannot write the checkpoint ({refused.strerror or refused}); "
                              f"{kept}. Free space there and run again") from None


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
    _check_owner(path, state, member, fingerprint)
    return state


def _check_owner(path: Path, saved: dict, member: str | None, fingerprint: str | None) -> None:
    """Refuse a checkpoint or export (`saved`: its recipe and fingerprint) of
    another member or store than the ones given."""
    recipe = saved.get("recipe")
    saved_member = recipe.get("name") if isinstance(recipe, dict) else None
    if member is not None and saved_member != member:
        raise CheckpointError(f"{path}: holds member {saved_member!r}, not {member!r} (a renamed "
                              f"file?); use {saved_member}'s own files or train {member!r}")
    if fingerprint is not None and saved.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: trained on a store with fingerprint {saved.get('fingerprint')!r}, this store has "
            f"{fingerprint!r}; use the store it was trained on, or train {saved_member!r} on this one")


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


def export_member(checkpoint: Path, folder: Path, member: str) -> Path:
    """Export `member`'s training checkpoint into `folder` (the module
    docstring says what is written); returns the weights' path. The weights
    are written first: a run killed between the two files leaves a description
    whose weights_sha256 no longer matches, which load_exported refuses."""
    state = load_checkpoint(checkpoint, member=member)
    weights = safetensors.torch.save({name: tensor.contiguous() for name, tensor in state["model"].items()})
    path = export_path(folder, member)
    with atomic_open(path, "wb") as f:
        f.write(weights)
    description = {
        "format": EXPORT_FORMAT,
        "recipe": recipe_to_dict(recipe_from_dict(state["recipe"])),
        "fingerprint": state["fingerprint"],
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "source": {"file": Path(checkpoint).name, "sha256": file_sha256(checkpoint)},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: metadata.version(name) for name in EXPORT_PACKAGES},
    }
    with atomic_open(path.with_suffix(".json"), "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2)
        f.write("\n")
    return path


def load_exported(path: Path, *, member: str | None = None,
                  fingerprint: str | None = None) -> tuple[dict, dict]:
    """(tensors on the CPU, description) of the export at `path`
    (`<member>.safetensors`), refused with a CheckpointError naming the file
    when either file is missing or unreadable, the weights are not the ones
    the description was written with, or the export belongs to another member
    or store than the ones given."""
    path = Path(path)
    described = path.with_suffix(".json")
    again = "export the member again (python trainers/export.py)"
    if not path.is_file():
        raise CheckpointError(f"{path}: no exported weights here")
    if not described.is_file():
        raise CheckpointError(f"{described} does not exist: exported weights need the description "
                              f"written beside them; {again}")
    try:
        info = json.loads(described.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{described}: not readable ({type(exc).__name__}: {exc}); {again}") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{described}: not a member export of this project")
    missing = [name for name in EXPORT_FIELDS if name not in info]
    if missing:
        raise CheckpointError(f"{described}: incomplete, {', '.join(missing)} missing; {again}")
    weights = path.read_bytes()   # once: for its hash, then its tensors
    if hashlib.sha256(weights).hexdigest() != info["weights_sha256"]:
        raise CheckpointError(f"{path}: not the weights {described.name} describes (its sha256 "
                              f"differs: a damaged copy, or files of two exports); {again}")
    info["recipe"] = _tuples(info["recipe"])
    _check_owner(path, info, member, fingerprint)
    try:
        tensors = safetensors.torch.load(weights)
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: not readable weights ({type(exc).__name__}: {exc}); {again}") from None
    return tensors, info


def load_member(path, device="cpu", *, member: str | None = None, fingerprint: str | None = None):
    """(model, recipe, info) of a saved member, from a training checkpoint
    (`.pth`) or an export (`.safetensors` and its `.json`): the model in eval
    mode on `device`, outputting logits; info is the checkpoint without
    training state, or the export's description.
    member, fingerprint: refuse a checkpoint or export of another member or store."""
    if Path(path).suffix == ".safetensors":
        tensors, info = load_exported(path, member=member, fingerprint=fingerprint)
    else:
        state = load_checkpoint(path, member=member, fingerprint=fingerprint)
        tensors = state["model"]
        info = {k: v for k, v in state.items() if k not in TRAINING_STATE}
    recipe = recipe_from_dict(info["recipe"])
    model = build_model(recipe.encoder, recipe.in_channels, encoder_weights="none")
    model.load_state_dict(tensors)
    model.to(device).eval()
    return model, recipe, info
