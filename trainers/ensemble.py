"""The six members as one predictor, and the step from probabilities to instances.

docs/recipes.md, "Ensemble": the members whose recipe role is "average"
are averaged with their recipe weights (divided by the weights' sum), then the
"union" member (the small-forgery specialist) is merged as
max(average, weight x p_specialist). Any subset of members works: the weights
of those present are renormalised, and without average members the result is
the weighted specialist alone.

Each member sees the whole image resized to its own input size (with ELA as a
fourth channel when its recipe has 4 input channels), except the union member
in the tiled view (specialist_view="tiled", the default of the command
lines): it sees overlapping tiles of the full-resolution image at the scale
it trained at, blended into one map at the image's size (trainers/tiling.py).
Whole-view outputs are brought to one common size, combined, resized to the
original image; a tiled member's map is then united with that at the
image's size. The result is thresholded; each connected component that is
large enough is one instance.
Forward passes run under trainers/precision.py's autocast (bf16 on CUDA,
float32 on the CPU), as in training; outputs become float32 before the
sigmoid, so thresholds always compare float32 probabilities.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
# The loader's normalisation (tests/test_ensemble.py checks they agree), from
# timm rather than engine.loader, whose DALI, Numba and Kornia prediction does not need.
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import nn

from engine.recipes import Recipe, get_recipe
from trainers.checkpoint import CheckpointError, best_path, export_path, load_member, member_file
# the operating points, in a module of their own so that --help lists them without torch
from trainers.postprocess import ALL_MEMBERS, MIN_AREA_REFERENCE_PIXELS, MODES, PostProcess  # noqa: F401
from trainers.precision import autocast
from trainers.tiling import DEFAULT_SPECIALIST_VIEW, SPECIALIST_VIEWS, TileGrid, tiled_probabilities

def combine(probs: dict[str, torch.Tensor], recipes: dict[str, Recipe]) -> torch.Tensor:
    """Final probability from member probabilities of one shape (average, then union)."""
    if not probs:
        raise ValueError("no member probabilities to combine")
    averaged = [name for name in probs if recipes[name].ensemble_role == "average"]
    united = [name for name in probs if recipes[name].ensemble_role == "union"]
    result = None
    if averaged:
        total = sum(recipes[name].ensemble_weight for name in averaged)
        result = sum(probs[name] * (recipes[name].ensemble_weight / total) for name in averaged)
    for name in united:
        result = unite(result, probs[name], recipes[name].ensemble_weight)
    return result


def unite(result: torch.Tensor | None, prob: torch.Tensor, weight: float) -> torch.Tensor:
    """max(result, weight x prob): a union member merged into a map (None: nothing yet)."""
    scaled = prob * weight
    return scaled if result is None else torch.maximum(result, scaled)


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2 resize to (height, width): area averaging when shrinking (no aliasing
    on 3000 px figures), bilinear when enlarging."""
    height, width = size
    shrink = height * width < array.shape[0] * array.shape[1]
    return cv2.resize(array, (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def model_input(images: list[np.ndarray], elas: list[np.ndarray] | None, size: int) -> torch.Tensor:
    """(B, C, size, size) float32: RGB ImageNet-normalised, plus ELA / 255 when given.

    images: (H, W, 3) uint8 RGB each; elas: (H, W) uint8 each, or None.
    """
    rgb = np.stack([_resize(image, (size, size)) for image in images]).astype(np.float32) / 255.0
    rgb = (rgb - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    channels = [rgb.transpose(0, 3, 1, 2)]
    if elas is not None:
        ela = np.stack([_resize(e, (size, size)) for e in elas]).astype(np.float32) / 255.0
        channels.append(ela[:, None])
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(channels, axis=1)))


@torch.inference_mode()
def member_probabilities(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """sigmoid(model(x)) in float32; with tta, the mean over identity,
    horizontal and vertical flips. Every forward runs in the precision the
    member was trained in (trainers/precision.py: bf16 autocast on CUDA)."""
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with autocast(inputs.device):
            logits = model(inputs)
        return torch.sigmoid(logits.float())

    prob = forward(x)
    if not tta:
        return prob
    for dims in ((3,), (2,)):
        prob = prob + forward(x.flip(dims)).flip(dims)
    return prob / 3


def _memory_format(device: torch.device) -> torch.memory_format:
    # channels_last on CUDA, as the members were trained (trainers/train.py): cuDNN's fast kernels
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch as the members take it; to a GPU from pinned memory, without blocking."""
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return x.contiguous(memory_format=_memory_format(device))


@dataclass
class Member:
    name: str
    model: nn.Module
    recipe: Recipe


@dataclass
class Probabilities:
    """A batch's member probabilities (Ensemble.probabilities), and the
    seconds each member took on it (its forward passes, and its tiling)."""

    shapes: list[tuple[int, int]]                                     # (H, W) of each image
    whole: dict[str, torch.Tensor] = field(default_factory=dict)      # (B, 1, S, S) each
    tiled: dict[str, list[np.ndarray]] = field(default_factory=dict)  # (H, W) per image
    seconds: dict[str, float] = field(default_factory=dict)


class Ensemble:
    """Members (any subset of the six) predicting together on one device."""

    def __init__(self, members: list[Member], device: str | torch.device = "cpu"):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.device = torch.device(device)
        self.members = members
        for member in members:
            member.model.to(self.device, memory_format=_memory_format(self.device)).eval()
        self.recipes = {m.name: m.recipe for m in members}
        self.size = max(m.recipe.img_size for m in members)
        self.needs_ela = any(m.recipe.in_channels == 4 for m in members)

    @classmethod
    def load(cls, models_dir: str | Path, names: tuple[str, ...] = ALL_MEMBERS,
             device: str | torch.device = "cpu") -> Ensemble:
        """Members from `models_dir`, each from its checkpoint `<member>_best.pth`
        or its export `<member>.safetensors` (trainers/checkpoint.py's
        member_file says which); every missing one is named, and a file
        holding another member is refused."""
        for name in names:
            get_recipe(name)          # an unknown name fails with the list of members
        if len(set(names)) != len(names):
            raise ValueError(f"members {list(names)}: a member is listed twice")
        files = {name: member_file(models_dir, name) for name in names}
        missing = [name for name, path in files.items() if path is None]
        if missing:
            raise CheckpointError(
                "no checkpoint or export for: "
                + ", ".join(f"{best_path(models_dir, n)} (or {export_path(models_dir, n).name})"
                            for n in missing)
                + "; train those members (`python trainers/train.py --member NAME`) "
                "or choose others with --members")
        members = []
        for name, path in files.items():
            model, recipe, _ = load_member(path, device=device, member=name)
            members.append(Member(name, model, recipe))
        return cls(members, device)

    def probabilities(self, images: list[np.ndarray], elas: list[np.ndarray] | None,
                      tta: bool = False,
                      specialist_view: str = DEFAULT_SPECIALIST_VIEW) -> Probabilities:
        """Each member's probabilities for a batch of whole images: at
        (B, 1, size, size), or, for the union members in the tiled view, at
        each image's own size (trainers/tiling.py)."""
        if self.needs_ela and elas is None:
            raise ValueError("a member takes ELA as a 4th channel; pass the images' ELA")
        if specialist_view not in SPECIALIST_VIEWS:
            raise ValueError(f"specialist view {specialist_view!r}: choose one of "
                             f"{', '.join(SPECIALIST_VIEWS)}")
        out = Probabilities([image.shape[:2] for image in images])
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        for member in self.members:
            started = time.perf_counter()
            recipe = member.recipe
            member_elas = elas if recipe.in_channels == 4 else None
            if specialist_view == "tiled" and recipe.ensemble_role == "union":
                grids = [TileGrid.for_image(recipe, *shape) for shape in out.shapes]
                out.tiled[member.name] = tiled_probabilities(
                    images, member_elas, grids,
                    lambda tiles, tile_elas, m=member: self._tile_forward(m, tiles, tile_elas, tta))
            else:
                key = (recipe.img_size, recipe.in_channels)
                if key not in inputs:
                    inputs[key] = _on_device(model_input(images, member_elas, key[0]), self.device)
                prob = member_probabilities(member.model, inputs[key], tta)
                if prob.shape[-1] != self.size:
                    prob = nn.functional.interpolate(prob, size=(self.size, self.size),
                                                     mode="bilinear", align_corners=False)
                if self.device.type == "cuda":   # the time is the member's, not the next one's
                    torch.cuda.synchronize(self.device)
                out.whole[member.name] = prob
            out.seconds[member.name] = time.perf_counter() - started
        return out

    def _tile_forward(self, member: Member, tiles: list[np.ndarray],
                      elas: list[np.ndarray] | None, tta: bool) -> list[np.ndarray]:
        """A member's probabilities on tiles, each back at its tile's size."""
        x = _on_device(model_input(tiles, elas, member.recipe.img_size), self.device)
        probs = member_probabilities(member.model, x, tta)[:, 0].cpu().numpy()
        return [to_original_size(prob, tile.shape[:2]) for prob, tile in zip(probs, tiles)]

    def combine(self, probs: Probabilities,
                names: tuple[str, ...] | None = None) -> list[np.ndarray]:
        """The final probability map of each image, at its own size, from the
        members `names` (default: all of `probs`): the whole-view members
        combined (average, then union) and resized to the image, then each
        tiled union member united with that."""
        names = tuple(probs.whole) + tuple(probs.tiled) if names is None else names
        whole = {name: probs.whole[name] for name in names if name in probs.whole}
        tiled = {name: probs.tiled[name] for name in names if name in probs.tiled}
        combined = combine(whole, self.recipes)[:, 0].cpu().numpy() if whole else None
        finals = []
        for k, shape in enumerate(probs.shapes):
            final = (None if combined is None
                     else torch.from_numpy(to_original_size(combined[k], shape)))
            for name, maps in tiled.items():
                final = unite(final, torch.from_numpy(maps[k]), self.recipes[name].ensemble_weight)
            finals.append(final.numpy())
        return finals


def to_original_size(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (S, S) probability map resized to the image's (H, W)."""
    return _resize(np.asarray(prob, dtype=np.float32), shape)


def instances(prob: np.ndarray, post: PostProcess) -> list[np.ndarray]:
    """Bool masks of the components of prob > threshold at least min_area large."""
    binary = (prob > post.threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    min_area = post.min_area_at(*prob.shape)
    return [labels == k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= min_area]
