"""Error level analysis (ELA): the comprehensive member's fourth channel.

docs/recipes.md: re-encode the image as JPEG at quality 90 (OpenCV), take the
absolute difference to the original, convert it to grey, multiply by 10 and
clip to 255. The builder computes it once per image at full resolution;
trainers/predict.py reuses it for test images, so both see the same channel.
"""
from __future__ import annotations

import cv2
import numpy as np

JPEG_QUALITY = 90
GAIN = 10


def compute_ela(rgb_uint8: np.ndarray) -> np.ndarray:
    """ELA of an (H, W, 3) uint8 RGB image, as (H, W) uint8."""
    if rgb_uint8.dtype != np.uint8 or rgb_uint8.ndim != 3 or rgb_uint8.shape[2] != 3:
        raise ValueError(
            f"compute_ela needs an (H, W, 3) uint8 RGB image, got {rgb_uint8.dtype} "
            f"{rgb_uint8.shape}"
        )
    # OpenCV's JPEG codec expects BGR: encoding RGB would swap the chroma planes.
    bgr = cv2.cvtColor(rgb_uint8, cv2.COLOR_RGB2BGR)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {rgb_uint8.shape}")
    diff = cv2.absdiff(bgr, cv2.imdecode(jpeg, cv2.IMREAD_COLOR))
    grey = cv2.cvtColor(diff, cv2.COLOR_BGR2GRAY)
    return cv2.convertScaleAbs(grey, alpha=GAIN)  # saturates at 255
