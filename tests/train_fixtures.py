"""Small datasets and text encoders that training tests build for themselves (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vgen.data.preprocess import PreprocessOptions, preprocess

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 220, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 220, 220),
}
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_colour_squares(root: Path, per_colour: int = 24, size: int = 16) -> Path:
    """A raw folder: a square of the named colour (with jittered position) on white, caption = colour."""
    raw = root / "raw-colours"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            image = np.full((size, size, 3), 255, np.uint8)
            y, x = rng.integers(2, 5, size=2)
            image[y : y + 10, x : x + 10] = rgb
            Image.fromarray(image).save(raw / f"{name}-{i:03d}.png")
            (raw / f"{name}-{i:03d}.txt").write_text(f"{name}\n")
    return raw


def colour_dataset(root: Path) -> Path:
    out = root / "ds-colours"
    preprocess(make_colour_squares(root), out, PreprocessOptions(resolution=16, workers=1, val_fraction=0.1))
    return out


def tiny_text_encoder(root: Path) -> Path:
    """A small randomly initialised open_clip model saved in local-dir format."""
    import open_clip

    from vgen.text.sources import save_open_clip_local_dir

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    return save_open_clip_local_dir(model, TINY_CLIP_CFG, root / "tiny-clip")
