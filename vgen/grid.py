"""Contact sheets: images in a grid, optionally with a caption under each row."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8, rounding to nearest."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: torch.Tensor, columns: int, row_labels: list[str] | None = None,
              scale: int = 2, pad: int = 2) -> Image.Image:
    """uint8 images [N, 3, H, W] -> one RGB picture, `columns` per row, each label under its row."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    cell_w, cell_h = w * scale + pad, h * scale + pad
    label_h = 14 if row_labels else 0
    sheet = Image.new("RGB", (columns * cell_w + pad, rows * (cell_h + label_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, columns)
        tile = Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy()).resize((w * scale, h * scale), Image.NEAREST)
        sheet.paste(tile, (pad + c * cell_w, pad + r * (cell_h + label_h)))
    for r, label in enumerate(row_labels or []):
        draw.text((pad, pad + r * (cell_h + label_h) + cell_h - 1), label, fill=(0, 0, 0), font=font)
    return sheet
