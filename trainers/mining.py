"""Mining: the highres_no_ela checkpoint's view of the training split (docs/recipes.md, "Mining").

hard_negative: authentic training images on which the model marks more than
  HARD_NEGATIVE_PIXEL_SHARE of the pixels forged; the HARD_NEGATIVE_KEEP with
  the highest false-positive ratio are flagged. Score = false-positive ratio.
hard_fn: forged training images whose pixel recall at 0.5 is below
  HARD_FN_RECALL. Score = pixel recall.

Results go into the store (engine.store.mining_path; a folder or a URL), or
with --mining-dir into a local folder (engine.store.mining_group: for a
store that cannot be written), with the sha256 of the checkpoint that made
them, written last; they are reused while that checkpoint file is unchanged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import engine
from engine import store as layout
from engine.storage import NO_SETTINGS, StorageSettings
from engine.store import SPLITS
from engine.recipes import MINING_MEMBER, Recipe
from trainers.checkpoint import file_sha256, load_member
from trainers.distributed import Distributed
from trainers.metrics import THRESHOLD, pixel_counts, recall
from trainers.precision import autocast

HARD_NEGATIVE_PIXEL_SHARE = 0.001
HARD_NEGATIVE_KEEP = 300
HARD_FN_RECALL = 0.5
MINED_LABEL = {"hard_negative": 0, "hard_fn": 1}   # which images each kind looks at


def mining_rows(meta: dict, kind: str) -> np.ndarray:
    """Training-split rows that `kind` scores: authentic for hard negatives, forged for hard FN."""
    keep = (meta["split"] == SPLITS["train"]) & (meta["label"] == MINED_LABEL[kind])
    return np.flatnonzero(keep).astype(np.int64)


def image_scores(counts: np.ndarray, kind: str) -> np.ndarray:
    """Per-image score from (tp, fp, fn, tn) counts at threshold 0.5."""
    if kind == "hard_negative":
        return counts[:, 1] / counts.sum(1)
    return recall(counts)


def flags_from_scores(score: np.ndarray, rows: np.ndarray, kind: str) -> np.ndarray:
    """uint8 flag over all rows of `score` (NaN where not scored); only `rows` can be flagged."""
    flag = np.zeros(score.shape, np.uint8)
    mined = score[rows]
    if kind == "hard_negative":
        candidates = rows[mined > HARD_NEGATIVE_PIXEL_SHARE]
        # stable sort: equal ratios keep row order, so the top-k cut is reproducible
        order = np.argsort(-score[candidates], kind="stable")
        flag[candidates[order[:HARD_NEGATIVE_KEEP]]] = 1
    else:
        flag[rows[mined < HARD_FN_RECALL]] = 1
    return flag


@torch.no_grad()
def score_rows(model: torch.nn.Module, store, recipe: Recipe, rows: np.ndarray, kind: str, *,
               batch_size: int, img_size: int, device: str, workers: int | None = None,
               rank: int = 0, world_size: int = 1,
               storage: StorageSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, float32 scores) of this rank's share of `rows` (every world_size-th),
    from `model` at img_size, in the precision training uses on `device`."""
    model.eval()
    done, scores = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    # closed when done: its reader workers end with the mining
    with engine.make_loader(store, recipe, rows=rows, batch_size=batch_size, img_size=img_size,
                            device=device, workers=workers, rank=rank,
                            world_size=world_size, storage=storage) as loader:
        for batch in tqdm(loader, desc=f"mining {kind}", unit="batch", disable=rank != 0):
            with autocast(device):
                logits = model(batch["image"])
            counts = pixel_counts(logits.float(), batch["mask"], THRESHOLD)
            done.append(batch["index"].cpu().numpy())
            scores.append(image_scores(counts, kind).astype(np.float32))
    return np.concatenate(done), np.concatenate(scores)


def write_mining(store, kind: str, score: np.ndarray, flag: np.ndarray, checkpoint_sha: str,
                 storage: StorageSettings | None = None) -> None:
    storage = storage or NO_SETTINGS
    try:
        # into the store (a folder or a URL), or a read-only store's --mining-dir
        mode = "r" if storage.mining_dir else "r+"
        group = layout.mining_group(layout.open_store(store, mode=mode, storage=storage), "w", storage)
        # A fresh group drops any older result first; the checkpoint attribute
        # goes last, so an interrupted write reads as "no result" (read_mining).
        sub = group.create_group(layout.mining_path(kind), overwrite=True)
        sub.create_array("score", data=score.astype(np.float32))
        sub.create_array("flag", data=flag.astype(np.uint8))
        sub.attrs["checkpoint"] = checkpoint_sha
    except OSError as exc:   # a read-only mount or bucket (PermissionError), a full disk
        raise layout.StoreError(
            f"{store}: cannot write the {kind} mining results into the store "
            f"({exc.strerror or exc}); the mined members read them from there. Pass "
            "--mining-dir DIR to keep them in a local folder instead, train from a writable "
            "copy, or mine once where the store is writable and reuse it read-only: results "
            "are reused while the checkpoint is unchanged") from None


def mine(store, kind: str, model: torch.nn.Module, recipe: Recipe, checkpoint_sha: str, *,
         batch_size: int, img_size: int, device: str, workers: int | None = None,
         ddp: Distributed | None = None, storage: StorageSettings | None = None) -> dict:
    """Score, flag and write one kind of mining result; returns it as read_mining does.
    Under torchrun every rank scores its share and rank 0 writes the whole:
    no rank waits for another to mine alone (a wait the process group's
    timeout would end)."""
    ddp = ddp or Distributed.single(torch.device(device))
    meta = layout.read_meta(layout.open_store(store, storage=storage))
    rows = mining_rows(meta, kind)
    share = score_rows(model, store, recipe, rows, kind, batch_size=batch_size, img_size=img_size,
                       device=device, workers=workers, rank=ddp.rank, world_size=ddp.world_size,
                       storage=storage)
    shares = ddp.all_gather(share)
    if ddp.main:
        score = np.full(len(meta["label"]), np.nan, np.float32)
        for done, scores in shares:
            score[done] = scores
        write_mining(store, kind, score, flags_from_scores(score, rows, kind), checkpoint_sha,
                     storage)
    ddp.barrier()
    return layout.read_mining(layout.open_store(store, storage=storage), kind, storage)


def ensure_mining(store, kind: str, checkpoint: Path, *, batch_size: int, img_size: int,
                  device: str, workers: int | None = None,
                  ddp: Distributed | None = None,
                  storage: StorageSettings | None = None) -> tuple[dict, bool]:
    """The store's `kind` result for this checkpoint, mined now unless already there.
    Returns (result, reused)."""
    sha = file_sha256(checkpoint)
    group = layout.open_store(store, storage=storage)
    existing = layout.read_mining(group, kind, storage)
    if existing is not None and existing["checkpoint"] == sha:
        return existing, True
    model, recipe, _ = load_member(checkpoint, device=device, member=MINING_MEMBER,
                                   fingerprint=group.attrs.get("fingerprint"))
    return mine(store, kind, model, recipe, sha, batch_size=batch_size, img_size=img_size,
                device=device, workers=workers, ddp=ddp, storage=storage), False
