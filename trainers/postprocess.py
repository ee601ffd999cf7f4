"""The ensemble's members and operating points: from probabilities to
instances, the threshold and minimum component area (docs/recipes.md,
"Ensemble"; trainers/ensemble.py applies them).

Apart from trainers/ensemble.py, which imports torch, so that the command
lines (trainers/predict.py, trainers/evaluate.py) list them under --help at once.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.recipes import ENSEMBLE_AVERAGE, ENSEMBLE_UNION

ALL_MEMBERS = ENSEMBLE_AVERAGE + ENSEMBLE_UNION
# Minimum component areas are given in pixels of a 512 x 512 model input
# (docs/recipes.md, "Ensemble"); on an image they mean the same fraction of its area.
MIN_AREA_REFERENCE_PIXELS = 512 * 512


@dataclass(frozen=True)
class PostProcess:
    threshold: float
    min_area: int       # pixels at 512 x 512

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold {self.threshold}: must lie strictly between 0 and 1")
        if self.min_area < 0:
            raise ValueError(f"min_area {self.min_area}: must not be negative")

    def min_area_at(self, height: int, width: int) -> float:
        """The minimum component area in pixels of a height x width image."""
        return self.min_area * height * width / MIN_AREA_REFERENCE_PIXELS


# The documented operating points (threshold, minimum area at 512 px).
MODES = {
    "high-precision": PostProcess(0.80, 100),
    "balanced": PostProcess(0.70, 50),
    "default": PostProcess(0.65, 50),
    "high-recall": PostProcess(0.60, 30),
    "max-recall": PostProcess(0.55, 20),
}
