"""Reference checks shared by the tests (CPU) and benchmarks/gpu_check.py (GPU).

The golden set: images whose forged pixels can be recognised by colour alone.
Forged regions are pure green on a background with no green (red noise, a
blue texture), so wherever a pipeline moves pixels, the mask it delivers must
keep covering exactly the green pixels.

dali_photometric runs DALI's photometric operators (engine/photometric.py) on
the CPU or the GPU, to compare with the opencv backend's versions.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def

from engine import photometric
from engine import store as layout
from engine.loader import IMAGENET_MEAN, IMAGENET_STD
from engine.recipes import RECIPES


def write_golden_source(root: Path, count: int = 14, seed: int = 3) -> Path:
    """A Kaggle-layout folder of `count` forged and `count` authentic images."""
    rng = np.random.default_rng(seed)
    for sub in ("train_images/forged", "train_images/authentic", "train_masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = int(rng.integers(160, 420)), int(rng.integers(160, 420))
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[..., 0] = rng.integers(0, 256, (h, w))            # red noise
        rgb[..., 2] = cv2.GaussianBlur(rgb[..., 0], (9, 9), 3)  # blue texture
        masks = []
        for _ in range(int(rng.integers(1, 3))):
            side = int(rng.integers(12, min(h, w) // 3))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            m = np.zeros((h, w), np.uint8)
            m[y:y + side, x:x + side] = 1
            masks.append(m)
        union = np.max(masks, axis=0).astype(bool)
        rgb[union] = (0, 255, 0)
        cv2.imwrite(str(root / f"train_images/forged/g{i}.png"), rgb[..., ::-1])
        np.save(root / f"train_masks/g{i}.npy", np.stack(masks))
        cv2.imwrite(str(root / f"train_images/authentic/a{i}.png"), rgb[..., ::-1] * 0 + 90)
    return root


def write_mining_flags(store: Path, flag_rows_by_kind: dict) -> None:
    """A mining result flagging exactly these rows per kind, from no real
    checkpoint: what the mined members' loaders need to run."""
    group = layout.open_store(store, mode="r+")
    n = group["meta/label"].shape[0]
    for kind, rows in flag_rows_by_kind.items():
        flag = np.zeros(n, np.uint8)
        flag[rows] = 1
        sub = group.require_group(layout.mining_path(kind))
        sub.create_array("score", data=flag.astype(np.float32), overwrite=True)
        sub.create_array("flag", data=flag, overwrite=True)
        sub.attrs["checkpoint"] = "stand-in"


def rgb_of(image: torch.Tensor) -> torch.Tensor:
    """The RGB channels of a normalised batch back in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    return image[:, :3] * std + mean


def green(image: torch.Tensor) -> torch.Tensor:
    rgb = rgb_of(image)
    return (rgb[:, 1] > 0.6) & (rgb[:, 0] < 0.35) & (rgb[:, 2] < 0.35)


def _dilate(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(x.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0


def alignment(batches) -> tuple[float, float]:
    """(share of green pixels on the mask, share of mask pixels on green) over
    `batches`, each up to the one pixel that antialiasing blends at a
    region's edge. Both are 1 for a perfectly aligned pipeline."""
    green_total = green_on_mask = mask_total = mask_on_green = 0
    for batch in batches:
        is_green, mask = green(batch["image"]), batch["mask"][:, 0] > 0.5
        green_total += int(is_green.sum())
        green_on_mask += int((is_green & _dilate(mask)).sum())
        mask_total += int(mask.sum())
        mask_on_green += int((mask & _dilate(is_green)).sum())
    if not green_total or not mask_total:
        raise ValueError("no green or no mask pixels in these batches: nothing to compare")
    return green_on_mask / green_total, mask_on_green / mask_total


def recipe_photometric_ops() -> dict[str, dict]:
    """Every photometric (name, params) the recipes use, one_of members included."""
    seen = {}
    for recipe in RECIPES.values():
        for name, params in recipe.augment:
            for op, op_params in (params["ops"] if name == "one_of" else ((name, params),)):
                if op in photometric.PHOTOMETRIC:
                    seen.setdefault(op, op_params)
    return seen


def dali_photometric(images: list[np.ndarray], plan, values: list, device: str = "cpu") -> list[np.ndarray]:
    """DALI's operators of `plan` with the drawn `values` (one list per image,
    photometric.draw's) on uint8 HWC `images`, on device "cpu" or "gpu"."""
    columns = [list(column) for column in zip(*values)]

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=0 if device == "gpu" else None,
                  enable_conditionals=True)
    def pipe():
        nodes = fn.external_source(source=lambda: (images, *columns), num_outputs=1 + len(columns),
                                   batch=True, layout=["HWC"] + [""] * len(columns))
        pixels = nodes[0].gpu() if device == "gpu" else nodes[0]
        return photometric.apply(pixels, plan, list(nodes[1:]), device)

    built = pipe()
    built.build()
    out = built.run()[0]
    if device == "gpu":
        out = out.as_cpu()
    return [np.asarray(out[i]) for i in range(len(images))]
