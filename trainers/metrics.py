"""Validation metrics at threshold 0.5, per image and pooled over all pixels.

Per image, the confusion counts (tp, fp, fn, tn) of its pixels; from them
MCC, Dice and recall per image (then averaged) and pooled (counts summed over
all images first). The names in SELECTION_METRICS are those recipe.select_on
uses to pick `<member>_best.pth`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

THRESHOLD = 0.5
RECALL_DICE_WEIGHTS = {"recall": 0.6, "dice": 0.4}   # high_recall's selection metric
SELECTION_METRICS = ("mean_image_mcc", "pooled_mcc", "recall_dice", "mean_image_recall")


def pixel_counts(logits: torch.Tensor, mask: torch.Tensor, threshold: float = THRESHOLD) -> np.ndarray:
    """(B, 4) int64: tp, fp, fn, tn per image of sigmoid(logits) > threshold against mask."""
    import torch   # here: the rest of this module (trainers/evaluate.py's) runs without it

    pred = (torch.sigmoid(logits.float()) > threshold).flatten(1)
    truth = (mask > 0.5).flatten(1)
    tp = (pred & truth).sum(1)
    fp = (pred & ~truth).sum(1)
    fn = (~pred & truth).sum(1)
    tn = (~pred & ~truth).sum(1)
    return torch.stack([tp, fp, fn, tn], 1).cpu().numpy().astype(np.int64)


def mcc(counts: np.ndarray) -> np.ndarray:
    """MCC per row of counts; a row with a zero denominator (truth or prediction
    all one class) scores 1 when prediction equals truth, else 0."""
    tp, fp, fn, tn = np.asarray(counts, dtype=np.float64).T
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    exact = (fp + fn) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        value = (tp * tn - fp * fn) / denom
    return np.where(denom > 0, value, exact.astype(np.float64))


def dice(counts: np.ndarray) -> np.ndarray:
    """2tp / (2tp + fp + fn) per row; 1 when truth and prediction are both empty."""
    tp, fp, fn, _ = np.asarray(counts, dtype=np.float64).T
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, 1.0)


def recall(counts: np.ndarray) -> np.ndarray:
    """tp / (tp + fn) per row; NaN where the truth has no forged pixel."""
    tp, _, fn, _ = np.asarray(counts, dtype=np.float64).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fn > 0, tp / (tp + fn), np.nan)


def _mean_defined(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else 0.0


def summarize(counts: np.ndarray) -> dict[str, float]:
    """Every metric of a validation pass from its per-image counts (N, 4)."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 4)
    pooled = counts.sum(0, keepdims=True)
    out = {
        "mean_image_mcc": _mean_defined(mcc(counts)),
        "mean_image_dice": _mean_defined(dice(counts)),
        "mean_image_recall": _mean_defined(recall(counts)),
        "pooled_mcc": float(mcc(pooled)[0]),
        "pooled_dice": float(dice(pooled)[0]),
        "pooled_recall": _mean_defined(recall(pooled)),
    }
    out["recall_dice"] = (RECALL_DICE_WEIGHTS["recall"] * out["pooled_recall"]
                          + RECALL_DICE_WEIGHTS["dice"] * out["pooled_dice"])
    return out


def check_metric_name(name: str) -> str:
    if name not in SELECTION_METRICS:
        raise ValueError(f"selection metric {name!r}: expected one of {SELECTION_METRICS}")
    return name
