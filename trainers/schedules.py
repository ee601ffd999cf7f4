"""Optimiser and learning-rate schedule of a member, stepped once per epoch."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts

from engine.recipes import Recipe


def build_optimizer(model: torch.nn.Module, recipe: Recipe, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over every parameter (frozen ones never get a gradient and are
    skipped, and the optimiser state keeps one layout for old and new
    checkpoints); fused=True runs one kernel for all of them (CUDA)."""
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                             fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe):
    """recipe.schedule: ("cosine", eta_min) over recipe.epochs, or
    ("warm_restarts", T0, Tmult) in epochs."""
    kind, *params = recipe.schedule
    if kind == "cosine":
        (eta_min,) = params
        return CosineAnnealingLR(optimizer, T_max=recipe.epochs, eta_min=eta_min)
    if kind == "warm_restarts":
        t0, t_mult = params
        return CosineAnnealingWarmRestarts(optimizer, T_0=t0, T_mult=t_mult)
    raise ValueError(f"recipe {recipe.name!r}: unknown schedule {recipe.schedule!r}; "
                     "expected ('cosine', eta_min) or ('warm_restarts', T0, Tmult)")
