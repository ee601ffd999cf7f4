"""Optimiser and learning-rate schedule of a member, stepped once per optimiser step.

The recipe's schedule (engine/recipes.py) is written in epochs; it runs per
optimiser step, so the learning rate moves smoothly inside an epoch, after
`warmup_steps` of linear warm-up from lr / warmup_steps to the recipe's lr
(the first step already learns). The whole rule is one picklable object
under torch's LambdaLR, so a checkpoint's scheduler state resumes it exactly.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from engine.recipes import Recipe


def build_optimizer(model: torch.nn.Module, recipe: Recipe, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over every parameter (frozen ones never get a gradient and are
    skipped, and the optimiser state keeps one layout for old and new
    checkpoints); fused=True runs one kernel for all of them (CUDA)."""
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                             fused=fused)


@dataclasses.dataclass
class StepSchedule:
    """The factor of the recipe's lr at optimiser step `step` (0-based).

    kind "cosine" (eta_min): one half cosine from lr to eta_min over the
    steps after warm-up; "warm_restarts" (T0, Tmult): SGDR's cosine cycles
    of T0, T0*Tmult, ... epochs, in steps."""

    kind: str
    params: tuple
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        step -= self.warmup_steps
        if self.kind == "cosine":
            (eta_min,) = self.params
            span = max(1, self.total_steps - self.warmup_steps)
            floor = eta_min / self.lr
            return floor + (1 - floor) * (1 + math.cos(math.pi * min(step, span) / span)) / 2
        t0, t_mult = self.params
        cycle = t0 * self.steps_per_epoch
        while step >= cycle:   # SGDR: each cycle t_mult times the last
            step -= cycle
            cycle *= t_mult
        return (1 + math.cos(math.pi * step / cycle)) / 2


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, *, steps_per_epoch: int,
                    warmup_steps: int = 0) -> LambdaLR:
    """recipe.schedule: ("cosine", eta_min) over recipe.epochs, or
    ("warm_restarts", T0, Tmult) in epochs; stepped per optimiser step."""
    kind, *params = recipe.schedule
    if kind not in ("cosine", "warm_restarts") or len(params) != (1 if kind == "cosine" else 2):
        raise ValueError(f"recipe {recipe.name!r}: unknown schedule {recipe.schedule!r}; "
                         "expected ('cosine', eta_min) or ('warm_restarts', T0, Tmult)")
    return LambdaLR(optimizer, StepSchedule(kind, tuple(params), recipe.lr, steps_per_epoch,
                                            recipe.epochs * steps_per_epoch, warmup_steps))
