"""Geometric transform of the training images: centre square crop + antialiased resize to R x R."""

from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC
RESAMPLE_NAME = "bicubic (antialiased, Pillow)"


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """Return the centred square crop of `image`, resized to `resolution`, as uint8 CHW.

    Equivalent to "resize the shorter side to R, then centre-crop R x R", done as a single resample of
    the crop box so the filter sees the original pixels (Pillow's filters widen their support when
    downscaling, which is what makes the resize antialiased).
    """
    width, height = image.size
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    resized = image.resize((resolution, resolution), RESAMPLE, box=(left, top, left + side, top + side))
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))
