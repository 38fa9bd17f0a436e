"""Image -> caption: a CLIP image tower reads the image and a small decoder writes the caption.

The decoder is the autoregressive family's Llama-style transformer (vgen.models.ar.TokenTransformer)
with the roles of text and image swapped: it writes the caption one token after another and
cross-attends in every block to the patch tokens of one block of an open_clip image tower, as the
captioning half of CoCa (Yu et al. 2022, arXiv:2205.01917) cross-attends to its image encoder's
tokens. The caption's tokens are its UTF-8 bytes (256 values and an end marker, as ByT5, Xue et al.
2021): a vocabulary that needs nothing from the data, so a run's network is fixed by its config,
and any caption can be written; emoji-scenes captions are 5 - 30 bytes.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vgen.models.ar import TokenTransformer
from vgen.models.layers import sincos_2d

END = 256  # the end-of-caption token; 0 .. 255 are bytes
VOCAB = 257
IGNORE = -100  # targets past the end marker (padding), skipped by the loss


def normalize_caption(text: str) -> str:
    """Whitespace collapsed and trimmed: what a caption is compared as and trained on."""
    return re.sub(r"\s+", " ", text).strip()


def caption_tokens(text: str, max_bytes: int) -> list[int]:
    """The caption's UTF-8 bytes, cut to at most `max_bytes` at a character boundary, then END."""
    data = normalize_caption(text).encode("utf-8")
    if len(data) > max_bytes:
        data = data[:max_bytes].decode("utf-8", errors="ignore").encode("utf-8")
    return [*data, END]


def tokens_caption(tokens: list[int]) -> str:
    """Bytes up to the first END back to text (a byte sequence that is not UTF-8 shows U+FFFD)."""
    data = bytes(t for t in tokens[:tokens.index(END)] if t < 256) if END in tokens else bytes(t for t in tokens if t < 256)
    return data.decode("utf-8", errors="replace")


def batch_tokens(captions: list[str], max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [B, L]: targets the bytes and END padded with IGNORE, inputs the same with
    the padding as END (never seen by a real position: attention is causal)."""
    rows = [caption_tokens(c, max_bytes) for c in captions]
    length = max(len(r) for r in rows)
    targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        targets[i, :len(row)] = torch.tensor(row)
    return targets.clamp(min=0).masked_fill(targets == IGNORE, END), targets


class ImageContext(NamedTuple):
    """What the decoder cross-attends to, in the shape of vgen.text.encoder.TextFeatures."""

    tokens: torch.Tensor  # [B, T, width] the tower's patch tokens
    mask: torch.Tensor  # [B, T] all True
    pooled: torch.Tensor  # [B, width] their mean
    embeddings: None = None


class ImageTower(nn.Module):
    """An open_clip VisionTransformer read at one block: uint8 images -> patch tokens [B, T, width]."""

    def __init__(self, visual: nn.Module, mean, std, block: int):
        super().__init__()
        self.visual = visual
        size = visual.image_size
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.width = int(visual.transformer.width)
        blocks = len(visual.transformer.resblocks)
        if not -blocks <= block < blocks:
            raise ValueError(f"image_encoder.block {block}: the image tower has {blocks} blocks")
        self.block = block % blocks
        patch = visual.patch_size if isinstance(visual.patch_size, int) else visual.patch_size[0]
        self.tokens = (self.input_size // int(patch)) ** 2
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                              antialias=True)
        x = (x - self.mean) / self.std
        out = self.visual.forward_intermediates(x, indices=[self.block], intermediates_only=True, stop_early=True,
                                                output_fmt="NLC")
        return out["image_intermediates"][0]


class Captioner(nn.Module):
    """logits = model(images, tokens): next-byte logits [B, L, VOCAB] of a caption for uint8 images.

    A frozen tower is held outside the module tree (as vgen.models.conditioned holds a frozen text
    encoder): not trained, not averaged, not saved; a fine-tuned one is the submodule `tower`."""

    def __init__(self, network: TokenTransformer, tower: ImageTower, train_tower: bool, positions: bool = False):
        super().__init__()
        self.network = network
        if positions:
            # Each patch token gets its place on the grid once more (a fixed 2-D sine-cosine through
            # a zero-initialised projection): the tower's own position embeddings were added at its
            # input and its contrastive training had no use for keeping them; a caption that says
            # "left of" needs them.
            grid = int(round(tower.tokens ** 0.5))
            if grid * grid != tower.tokens or tower.width % 4:
                raise ValueError(f"context_positions needs a square token grid and a width divisible by 4 "
                                 f"(the tower gives {tower.tokens} tokens of width {tower.width})")
            self.context_positions = nn.Linear(tower.width, tower.width)
            nn.init.zeros_(self.context_positions.weight)
            nn.init.zeros_(self.context_positions.bias)
            self.register_buffer("places", sincos_2d(tower.width, grid)[None], persistent=False)
        self.trains_tower = train_tower
        if train_tower:
            self.tower = tower
        else:
            object.__setattr__(self, "_frozen_tower", tower.requires_grad_(False).eval())

    @property
    def image_tower(self) -> ImageTower:
        return self.tower if self.trains_tower else self._frozen_tower

    def shared_modules(self) -> list[nn.Module]:
        return [] if self.trains_tower else [self._frozen_tower]

    def context(self, images: torch.Tensor) -> ImageContext:
        if self.trains_tower:
            tokens = self.tower(images)
        else:
            with torch.no_grad():
                tokens = self._frozen_tower(images)
        if hasattr(self, "context_positions"):
            tokens = tokens + self.context_positions(self.places.to(tokens.dtype))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ImageContext(tokens, mask, tokens.mean(dim=1))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.network(tokens, self.context(images))
