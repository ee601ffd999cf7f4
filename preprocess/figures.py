"""The build's summary figure: size-class histogram and sample images with
their masks outlined, written next to the store."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import zarr  # noqa: E402

from engine import store as layout  # noqa: E402
from engine.reader import WindowReader  # noqa: E402
from engine.recipes import SIZE_CLASS_NAMES  # noqa: E402

SAMPLES = 8
THUMB_SIDE = 256


def thumbnail_level(height: int, width: int) -> int:
    """The coarsest pyramid level of an image of this size whose long side
    is still >= THUMB_SIDE."""
    level = 0
    while (level + 1 < layout.level_count(height, width)
           and max(height >> (level + 1), width >> (level + 1)) >= THUMB_SIDE):
        level += 1
    return level


def sample_rows(meta: dict, count: int) -> np.ndarray:
    """Forged rows spread over the size classes (largest class index first
    after a stable sort), then authentic rows to fill up."""
    forged = np.flatnonzero(meta["label"] == 1)
    forged = forged[np.argsort(meta["size_class"][forged], kind="stable")]
    picks = forged[np.linspace(0, len(forged) - 1, min(count, len(forged))).astype(int)] \
        if len(forged) else forged
    authentic = np.flatnonzero(meta["label"] == 0)[: count - len(picks)]
    return np.concatenate([picks, authentic]).astype(int)


def write_summary_figure(group: zarr.Group, png: Path) -> None:
    meta = layout.read_meta(group)
    reader = WindowReader(group)
    rows = sample_rows(meta, SAMPLES)
    cols = 4
    grid_rows = 1 + int(np.ceil(len(rows) / cols))
    fig = plt.figure(figsize=(3 * cols, 2.6 * grid_rows))
    hist = fig.add_subplot(grid_rows, 1, 1)
    counts = np.bincount(meta["size_class"], minlength=len(SIZE_CLASS_NAMES))
    hist.bar(SIZE_CLASS_NAMES, counts, color=["grey"] + ["tab:red"] * (len(counts) - 1))
    hist.set_ylabel("images")
    hist.set_title(f"{len(meta['label'])} images by size class (forged area / image area)")
    for i, row in enumerate(rows):
        ax = fig.add_subplot(grid_rows, cols, cols + i + 1)
        level = thumbnail_level(int(meta["height"][row]), int(meta["width"][row]))
        ax.imshow(reader.read_array(layout.image_path(row, level)))
        if meta["label"][row]:
            ax.contour(reader.read_array(layout.mask_path(row, level)), levels=[0.5],
                       colors="yellow", linewidths=1)
        name = SIZE_CLASS_NAMES[meta["size_class"][row]]
        ax.set_title(f"{meta['case_id'][row]} {name} {meta['width'][row]}x{meta['height'][row]}",
                     fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
