"""A text-conditioned Diffusion Transformer (DiT) denoiser for pixel-space flow matching.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023, arXiv:2212.09748): patchify,
transformer blocks with adaLN-Zero conditioning on the timestep, unpatchify. Text enters twice, as
in PixArt-alpha (Chen et al. 2023, arXiv:2310.00426) and SD3: per-token features through
cross-attention (which words, in which order) and the pooled embedding added to the timestep
embedding that drives adaptive LayerNorm (a global summary).

The network predicts the flow velocity; it knows nothing about the objective or the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vgen.config import bounded, check_bounds
from vgen.models.layers import Attention, TextRefinement, modulate, sincos_2d, timestep_embedding


@dataclass
class DiTConfig:
    type: Literal["dit"] = "dit"  # the NETWORKS key (vgen.models)
    image_size: int = bounded(32, ge=1)
    channels: int = bounded(3, ge=1)
    patch_size: int = bounded(2, ge=1)
    width: int = bounded(256, ge=1)
    depth: int = bounded(6, ge=1)
    heads: int = bounded(4, ge=1)
    mlp_ratio: float = bounded(4.0, gt=0)
    text_refiner_layers: int = bounded(0, ge=0)  # bidirectional transformer layers over the text tokens (0: none)
    text_lexical: bool = False  # also read the text tower's input embeddings (see DiT.refine_text)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the text tokens, and an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, text_width: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm_cross = nn.LayerNorm(width, eps=1e-6)
        self.cross = Attention(width, heads, context_width=text_width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, cond, text, text_mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond)).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm_cross(x), text, text_mask)
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class DiT(TextRefinement, nn.Module):
    """v = DiT(x_t, t, text) with `text` a vgen.text.encoder.TextFeatures (tokens, mask, pooled,
    input embeddings). Images are [B, C, H, W] in [-1, 1]."""

    Config = DiTConfig

    def __init__(self, cfg: DiTConfig, text_width: int, pooled_width: int):
        super().__init__()
        self.cfg = cfg
        p, W = cfg.patch_size, cfg.width
        self.grid = cfg.image_size // p
        self.patch = nn.Linear(cfg.channels * p * p, W)
        self.register_buffer("pos", sincos_2d(W, self.grid)[None], persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
        self.pooled_proj = nn.Sequential(nn.LayerNorm(pooled_width), nn.Linear(pooled_width, W))
        self.init_text_refinement(cfg.text_lexical, cfg.text_refiner_layers, text_width)
        self.blocks = nn.ModuleList(DiTBlock(W, cfg.heads, cfg.mlp_ratio, text_width) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(W, 2 * W)
        self.out = nn.Linear(W, cfg.channels * p * p)
        for module in (self.ada_out, self.out):  # zero output: the untrained model predicts v = 0
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        p, g, C = self.cfg.patch_size, self.grid, self.cfg.channels
        x = x.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, C, g * p, g * p)

    def forward(self, x, t, features):
        h = self.patch(self.patchify(x)) + self.pos
        text_mask = features.mask
        text = self.refine_text(features)
        cond = self.time_mlp(timestep_embedding(t, self.cfg.width).to(h.dtype)) + self.pooled_proj(features.pooled)
        for block in self.blocks:
            h = block(h, cond, text, text_mask)
        shift, scale = self.ada_out(F.silu(cond)).chunk(2, dim=-1)
        return self.unpatchify(self.out(modulate(self.norm_out(h), shift, scale)))
