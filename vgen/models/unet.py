"""A small text-conditioned UNet denoiser, the other network a flow family can train.

The ADM/Imagen shape (Dhariwal & Nichol 2021, arXiv:2105.05233; Saharia et al. 2022,
arXiv:2205.11487): residual blocks at each resolution, down- and upsampling with skip connections,
and the conditioning entering twice, as in the DiT: the timestep embedding plus the pooled text
embedding scale and shift every residual block's normalised activations (adaptive GroupNorm), and
at the low resolutions (where a pixel sees the whole object) self-attention over the positions is
followed by cross-attention to the text tokens (Stable Diffusion's transformer block, without its
MLP). Same signature as the DiT: `v = UNet(x_t, t, text_features)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vgen.config import bounded, check_bounds
from vgen.models.layers import Attention, TextRefinement, timestep_embedding


@dataclass
class UNetConfig:
    type: Literal["unet"] = "unet"  # the NETWORKS key (vgen.models)
    image_size: int = bounded(32, ge=1)
    channels: int = bounded(3, ge=1)
    # the stem folds patch x patch pixels into channels (space-to-depth) and the head unfolds them,
    # so the first level runs at image_size / patch_size (as the DiT's patches, or the shifted
    # downsampling stem of simple diffusion, Hoogeboom et al. 2023, arXiv:2301.11093, sec. 3.3)
    patch_size: int = bounded(1, ge=1)
    width: int = bounded(64, ge=8)  # channels at the first level
    multipliers: list[int] = field(default_factory=lambda: [1, 2, 2])  # per level; each level after the first halves the size
    blocks_per_level: int = bounded(2, ge=1)
    attention_levels: list[int] = field(default_factory=lambda: [1, 2])  # levels (0 = the first) with attention
    heads: int = bounded(4, ge=1)
    groups: int = bounded(8, ge=1)  # GroupNorm groups
    text_refiner_layers: int = bounded(0, ge=0)  # as the DiT's (vgen.models.layers.TextRefinement)
    text_lexical: bool = False

    def __post_init__(self) -> None:
        check_bounds(self)
        levels = len(self.multipliers)
        if levels < 1 or any(m < 1 for m in self.multipliers):
            raise ValueError("multipliers must be a non-empty list of positive integers")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if (self.image_size // self.patch_size) % 2 ** (levels - 1):
            raise ValueError(f"image_size / patch_size = {self.image_size // self.patch_size} cannot be halved "
                             f"{levels - 1} times (multipliers)")
        if any(not 0 <= level < levels for level in self.attention_levels):
            raise ValueError(f"attention_levels must name levels 0..{levels - 1}")
        for m in self.multipliers:
            if (self.width * m) % self.groups or (self.width * m) % self.heads:
                raise ValueError(f"width x multiplier {self.width * m} is not a multiple of groups {self.groups} "
                                 f"and heads {self.heads}")


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice; the second norm scaled and shifted by the conditioning."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # every block starts as the identity (as adaLN-Zero)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the positions, then cross-attention to the text tokens."""

    def __init__(self, channels: int, heads: int, text_width: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = Attention(channels, heads)
        self.norm_cross = nn.LayerNorm(channels, eps=1e-6)
        self.cross = Attention(channels, heads, context_width=text_width)
        for module in (self.attn.out, self.cross.out):  # start as the identity
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = x + self.attn(self.norm(x).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)
        tokens = h.flatten(2).transpose(1, 2)
        tokens = tokens + self.cross(self.norm_cross(tokens), text, text_mask)
        return tokens.transpose(1, 2).reshape(B, C, H, W)


class UNet(TextRefinement, nn.Module):
    """v = UNet(x_t, t, text) with `text` a vgen.text.encoder.TextFeatures. Images [B, C, H, W]."""

    Config = UNetConfig

    def __init__(self, cfg: UNetConfig, text_width: int, pooled_width: int):
        super().__init__()
        self.cfg = cfg
        W, emb = cfg.width, 4 * cfg.width
        self.time_mlp = nn.Sequential(nn.Linear(W, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.pooled_proj = nn.Sequential(nn.LayerNorm(pooled_width), nn.Linear(pooled_width, emb))
        self.init_text_refinement(cfg.text_lexical, cfg.text_refiner_layers, text_width)
        self.inp = nn.Conv2d(cfg.channels * cfg.patch_size ** 2, W, 3, padding=1)

        def level_blocks(cin: int, cout: int, level: int) -> nn.ModuleDict:
            blocks = nn.ModuleDict({"res": ResBlock(cin, cout, emb, cfg.groups)})
            if level in cfg.attention_levels:
                blocks["attn"] = AttentionBlock(cout, cfg.heads, text_width, cfg.groups)
            return blocks

        self.down, self.downsample, skips, ch = nn.ModuleList(), nn.ModuleList(), [W], W
        for level, mult in enumerate(cfg.multipliers):
            for _ in range(cfg.blocks_per_level):
                self.down.append(level_blocks(ch, W * mult, level))
                ch = W * mult
                skips.append(ch)
            if level < len(cfg.multipliers) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        last = len(cfg.multipliers) - 1
        self.mid = nn.ModuleList([level_blocks(ch, ch, last), level_blocks(ch, ch, -1)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(cfg.multipliers))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(level_blocks(ch + skips.pop(), W * cfg.multipliers[level], level))
                ch = W * cfg.multipliers[level]
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.out = nn.Conv2d(ch, cfg.channels * cfg.patch_size ** 2, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # the untrained model predicts v = 0
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _run(blocks: nn.ModuleDict, h, emb, text, text_mask):
        h = blocks["res"](h, emb)
        return blocks["attn"](h, text, text_mask) if "attn" in blocks else h

    def forward(self, x, t, features):
        cfg = self.cfg
        text, text_mask = self.refine_text(features), features.mask
        emb = self.time_mlp(timestep_embedding(t, cfg.width).to(x.dtype)) + self.pooled_proj(features.pooled)
        h = self.inp(F.pixel_unshuffle(x, cfg.patch_size))
        skips, blocks = [h], iter(self.down)
        for level in range(len(cfg.multipliers)):
            for _ in range(cfg.blocks_per_level):
                h = self._run(next(blocks), h, emb, text, text_mask)
                skips.append(h)
            if level < len(cfg.multipliers) - 1:
                h = self.downsample[level](h)
                skips.append(h)
        for blocks_ in self.mid:
            h = self._run(blocks_, h, emb, text, text_mask)
        blocks, upsample = iter(self.up), iter(self.upsample)
        for level in reversed(range(len(cfg.multipliers))):
            for _ in range(cfg.blocks_per_level + 1):
                h = self._run(next(blocks), torch.cat([h, skips.pop()], dim=1), emb, text, text_mask)
            if level > 0:
                h = next(upsample)(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return F.pixel_shuffle(self.out(F.silu(self.norm_out(h))), cfg.patch_size)
