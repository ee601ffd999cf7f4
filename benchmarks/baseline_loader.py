"""The loader this project replaces, kept as the benchmark's reference.

Per sample it decodes the full PNG, loads the .npy mask, finds the forgery
with np.where, crops and resizes with OpenCV and augments with OpenCV/numpy on
the CPU, under a torch DataLoader with a WeightedRandomSampler: what the
public reference pipeline did. It is deliberately not optimised.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from engine.recipes import Recipe

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _flip_h(img, mask, rng, p):
    return (img[:, ::-1], mask[:, ::-1]) if rng.random() < p["p"] else (img, mask)


def _flip_v(img, mask, rng, p):
    return (img[::-1], mask[::-1]) if rng.random() < p["p"] else (img, mask)


def _rot90(img, mask, rng, p):
    if rng.random() >= p["p"]:
        return img, mask
    k = int(rng.integers(p["k"][0], p["k"][1] + 1))
    return np.rot90(img, k), np.rot90(mask, k)


def _brightness_mul(img, mask, rng, p):
    if rng.random() >= p["p"]:
        return img, mask
    return np.clip(img * rng.uniform(*p["range"]), 0, 255).astype(np.uint8), mask


def _contrast_brightness(img, mask, rng, p):
    if rng.random() >= p["p"]:
        return img, mask
    out = img.astype(np.float32) * rng.uniform(*p["contrast"]) + rng.uniform(*p["brightness"])
    return np.clip(out, 0, 255).astype(np.uint8), mask


def _hsv(img, mask, rng, p):
    if rng.random() >= p["p"]:
        return img, mask
    hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-p["hue"], p["hue"]) / 2) % 180
    hsv[..., 1] *= rng.uniform(*p["saturation"])
    hsv[..., 2] *= rng.uniform(*p["value"])
    return cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB), mask


def _blur(img, mask, rng, p):
    if rng.random() >= p["p"]:
        return img, mask
    k = int(rng.choice([k for k in range(p["kernel"][0], p["kernel"][1] + 1) if k % 2]))
    return cv2.GaussianBlur(np.ascontiguousarray(img), (k, k), 0), mask


def _jpeg(img, mask, rng, p):
    if rng.random() >= p["p"]:
        return img, mask
    q = int(rng.integers(p["quality"][0], p["quality"][1] + 1))
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img), [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), mask


AUGMENT = {"hflip": _flip_h, "vflip": _flip_v, "rot90": _rot90, "brightness_mul": _brightness_mul,
           "contrast_brightness": _contrast_brightness, "hue_saturation_value": _hsv,
           "gaussian_blur": _blur, "jpeg": _jpeg}


def unsupported_ops(recipe: Recipe) -> list[str]:
    """Augmentations of the recipe this reference does not implement (skipped)."""
    return [name for name, _ in recipe.augment if name not in AUGMENT]


def _window(recipe: Recipe, mask: np.ndarray, rng) -> tuple[int, int, int, int]:
    h, w = mask.shape
    view = recipe.view
    if view.kind == "around_forgery":
        ys, xs = np.where(mask > 0)
        cy, cx = ys.mean(), xs.mean()
        side = max(ys.max() - ys.min(), xs.max() - xs.min()) * rng.uniform(*view.side_mult)
        side = int(min(max(side, view.min_side), min(h, w)))
        y0 = int(np.clip(cy - side / 2, 0, h - side))
        x0 = int(np.clip(cx - side / 2, 0, w - side))
        return y0, x0, y0 + side, x0 + side
    if view.kind == "random_crop":
        ch, cw = (max(1, int(s * rng.uniform(*view.side_range))) for s in (h, w))
    else:  # random_resized_crop, whole: a scale-range crop of the same aspect
        frac = np.sqrt(rng.uniform(*view.scale))
        ch, cw = max(1, int(h * frac)), max(1, int(w * frac))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return y0, x0, y0 + ch, x0 + cw


class ReplacedDataset(Dataset):
    """One sample = full PNG decode + .npy load + np.where + OpenCV crop/resize/augment."""

    def __init__(self, images: list[Path], masks: list[Path | None], recipe: Recipe,
                 img_size: int, seed: int):
        self.images, self.masks = images, masks
        self.recipe, self.img_size, self.seed = recipe, img_size, seed
        self.calls = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.calls += 1
        rng = np.random.default_rng([self.seed, i, self.calls])
        img = cv2.cvtColor(cv2.imread(str(self.images[i]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        if self.masks[i] is not None:
            layers = np.load(self.masks[i])
            mask = layers.max(axis=0) if layers.ndim == 3 else layers
        else:
            mask = np.zeros(img.shape[:2], np.uint8)
        y0, x0, y1, x1 = _window(self.recipe, mask, rng)
        size = (self.img_size, self.img_size)
        img = cv2.resize(img[y0:y1, x0:x1], size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask[y0:y1, x0:x1], size, interpolation=cv2.INTER_NEAREST)
        for name, params in self.recipe.augment:
            if name in AUGMENT:
                img, mask = AUGMENT[name](img, mask, rng, params)
        img = (img.astype(np.float32) / 255 - MEAN) / STD
        return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(mask[None]).astype(np.float32)))


def make_replaced_loader(images, masks, weights, recipe: Recipe, *, img_size: int,
                         batch_size: int, workers: int, num_samples: int, seed: int) -> DataLoader:
    dataset = ReplacedDataset(images, masks, recipe, img_size, seed)
    sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples,
                                    replacement=True, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0)
