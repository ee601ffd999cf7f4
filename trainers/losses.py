"""Training loss of a member: recipe.focal_weight x focal + recipe.dice_weight x Dice.

smp's binary FocalLoss and DiceLoss match the definitions of docs/recipes.md
(tests/test_losses_metrics.py checks them against the direct formulas):
  focal = mean over pixels of -a_t (1 - p_t)^gamma log p_t, a_t = alpha on
          forged pixels and 1 - alpha elsewhere;
  Dice  = 1 - 2 sum(p t) / (sum p + sum t), pooled over the batch (0 when the
          batch has no forged pixel).
"""
from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn

from engine.recipes import Recipe


class MemberLoss(nn.Module):
    def __init__(self, recipe: Recipe):
        super().__init__()
        self.focal_weight, self.dice_weight = recipe.focal_weight, recipe.dice_weight
        self.focal = FocalLoss("binary", alpha=recipe.focal_alpha, gamma=recipe.focal_gamma)
        self.dice = DiceLoss("binary", from_logits=True)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Losses in float32 even under autocast: (1 - p)^gamma underflows in half precision.
        logits = logits.float()
        loss = self.focal_weight * self.focal(logits, mask)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, mask)
        return loss
