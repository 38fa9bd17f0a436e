"""Pixels between model space and uint8, and contact sheets: images in a grid, a caption under each row."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8, rounding to nearest."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


MIN_CELL = 128  # pixels: a 32 px sample shown at 32 px is unreadable


def make_grid(images: torch.Tensor, columns: int, row_labels: list[str] | None = None,
              min_cell: int = MIN_CELL, pad: int = 2, cell_labels: list[str] | None = None) -> Image.Image:
    """uint8 images [N, 3, H, W] -> one RGB picture, `columns` per row, each label under its row
    (or, with `cell_labels`, one under each image, cut to the cell's width); small images are
    enlarged by an integer factor (nearest neighbour: every pixel stays a crisp square) to at least
    `min_cell` pixels a side."""
    n, _, h, w = images.shape
    scale = max(1, -(-min_cell // min(h, w)))
    rows = -(-n // columns)
    cell_w, cell_h = w * scale + pad, h * scale + pad
    label_h = 14 if row_labels or cell_labels else 0
    sheet = Image.new("RGB", (columns * cell_w + pad, rows * (cell_h + label_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, columns)
        tile = Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy()).resize((w * scale, h * scale), Image.NEAREST)
        sheet.paste(tile, (pad + c * cell_w, pad + r * (cell_h + label_h)))
    for r, label in enumerate(row_labels or []):
        draw.text((pad, pad + r * (cell_h + label_h) + cell_h - 1), label, fill=(0, 0, 0), font=font)
    for i, label in enumerate(cell_labels or []):
        r, c = divmod(i, columns)
        while label and draw.textlength(label, font=font) > cell_w - pad:
            label = label[:-2] + "…" if len(label) > 1 else ""
        draw.text((pad + c * cell_w, pad + r * (cell_h + label_h) + cell_h - 1), label, fill=(0, 0, 0), font=font)
    return sheet
