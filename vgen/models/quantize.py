"""Finite scalar quantization (FSQ; Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
Simple", arXiv:2309.15505): the discrete bottleneck of an image tokenizer without a codebook.

Each of the d = len(levels) latent channels is bounded to L_i values by a shifted tanh and rounded
(straight-through gradient); the codebook is the implicit grid of prod(levels) points, and a token is
the mixed-radix number of its digits. With nothing learned in the bottleneck there is no codebook
collapse to fight (no commitment loss, no EMA, no dead-code restarts), which is the paper's point.
"""

from __future__ import annotations

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, the identity backward (the straight-through estimator)."""
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    """z [B, d, H, W] (any real values) -> codes [B, d, H, W] on the grid, each channel in [-1, 1]."""

    def __init__(self, levels: list[int]):
        super().__init__()
        if not levels or any(int(level) < 3 for level in levels):
            raise ValueError(f"FSQ levels must be integers >= 3, got {levels}")
        levels_t = torch.tensor([int(level) for level in levels], dtype=torch.int64)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.cat([levels_t.new_ones(1), levels_t[:-1]]), 0),
                             persistent=False)
        self.codebook_size = int(torch.prod(levels_t))

    def _half_width(self) -> torch.Tensor:
        return (self.levels // 2).float()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Channel i to the open interval that rounds to exactly L_i integers: (-L/2, L/2) for odd
        L; for even L shifted by a half so that it rounds to -L/2 .. L/2 - 1 (the paper's app. A.1).
        (For L = 2 that shift, atanh(0.5 / 0.5005), puts the tanh in saturation at z = 0: such a
        channel cannot learn, so levels start at 3.)"""
        levels = self.levels.float()
        half_l = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float().movedim(1, -1)
        return (round_ste(self.bound(z)) / self._half_width()).movedim(-1, 1)

    def indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, d, H, W] (from forward) -> token ids [B, H, W] in [0, codebook_size)."""
        digits = (codes.float().movedim(1, -1) * self._half_width() + self._half_width()).round().long()
        return (digits * self.basis).sum(dim=-1)

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids [B, H, W] -> codes [B, d, H, W]: the inverse of `indices`."""
        digits = (indices.long()[..., None] // self.basis) % self.levels
        return ((digits.float() - self._half_width()) / self._half_width()).movedim(-1, 1)


def codebook_statistics(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (the share of the codebook's codes that occur) and perplexity (exp of the entropy of
    the code distribution; codebook_size when uniform) of a set of token ids."""
    counts = torch.bincount(indices.flatten().long(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).double().mean()), "codebook_perplexity": float(entropy.exp())}
