"""Images at the judge's resolution, and the crops of the spec's boxes the classifier reads."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from vgen.data import emoji_scenes as es
from vgen.errors import UsageError
from vgen.evaluate.judge.settings import CROP, MARGIN, RESOLUTION


def box_crop(box: es.Box, resolution: int = RESOLUTION) -> tuple[int, int, int, int]:
    """The integer crop (x0, y0, x1, y1) at `resolution` of a box in the spec's 64 px coordinates."""
    s = resolution / es.SIZE
    x0, y0, x1, y1 = box
    return (max(0, math.floor(x0 * s - MARGIN)), max(0, math.floor(y0 * s - MARGIN)),
            min(resolution, math.ceil(x1 * s + MARGIN)), min(resolution, math.ceil(y1 * s + MARGIN)))


def to_judge_resolution(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [N,3,H,W] (square) -> float [N,3,32,32] in [0, 1]."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
        raise UsageError(f"the judge reads uint8 images [N,3,H,W]; got {x.dtype} {tuple(x.shape)}")
    if x.shape[2] != x.shape[3]:
        raise UsageError(f"the judge reads square images; got {x.shape[3]}x{x.shape[2]}")
    x = x.float() / 255.0
    if x.shape[2] != RESOLUTION:
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
    return x


def crop_boxes(images: torch.Tensor, box: es.Box) -> torch.Tensor:
    """float [N,3,32,32] -> the crops of `box` (64 px coordinates), float [N,3,CROP,CROP]."""
    x0, y0, x1, y1 = box_crop(box, images.shape[-1])
    return F.interpolate(images[:, :, y0:y1, x0:x1], size=(CROP, CROP), mode="bilinear", antialias=True,
                         align_corners=False)



def to_resolution(image) -> torch.Tensor:
    from vgen.data.transforms import center_crop_resize

    return torch.from_numpy(center_crop_resize(image, RESOLUTION))
