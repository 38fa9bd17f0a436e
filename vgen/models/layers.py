"""Building blocks shared by the text-conditioned networks (DiT, UNet, the GAN's generator)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_TEXT_TOKENS = 77  # CLIP's context length, the longest text a network may be conditioned on


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, the DDPM convention DiT inherits)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention to it."""

    def __init__(self, width: int, heads: int, context_width: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width or width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        B, N, W = x.shape
        context = x if context is None else context
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        # mask: [B, L] True for real tokens -> broadcast over heads and queries.
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = attention(q, k, v, attn_mask)
        return self.out(y.transpose(1, 2).reshape(B, N, W))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v. On CUDA, PyTorch's fused kernels (flash / memory-efficient); on CPU
    the plain matmul form, which trains faster at these sizes (the fused CPU kernel's backward pass
    is slow; bench/RESULTS.md, "Attention on CPU")."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class TextRefinerBlock(nn.Module):
    """Pre-norm bidirectional self-attention + MLP over the text tokens, trained with the generator."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), None, mask)
        return x + self.mlp(self.norm2(x))


class TextRefinement:
    """Mixin for an nn.Module: the text tokens a network cross-attends to (see `refine_text`)."""

    def init_text_refinement(self, lexical: bool, refiner_layers: int, text_width: int) -> None:
        self.lexical, self.refiner_layers = lexical, refiner_layers
        if lexical:
            self.text_lexical = nn.Sequential(nn.LayerNorm(text_width, eps=1e-6), nn.Linear(text_width, text_width))
        if refiner_layers:
            self.text_pos = nn.Parameter(torch.randn(MAX_TEXT_TOKENS, text_width) * 0.02)
            heads = max(1, text_width // 64)
            self.text_refiner = nn.ModuleList(TextRefinerBlock(text_width, heads) for _ in range(refiner_layers))

    def refine_text(self, features) -> torch.Tensor:
        """The text tokens the blocks cross-attend to: unchanged, or rewritten by the refiner.

        With `text_lexical`, the text tower's input embeddings (`features.embeddings`: which word,
        where), normalised and projected, are added first. A contrastive text tower keeps little of
        the words that barely change its image match: in the demo CLIP the output features of
        "a cat above a dog" and "a cat below a dog" are nearly the same (bench/RESULTS.md), so word
        order was a faint signal the generator learnt late and unreliably; the input embeddings of
        the two words are unrelated vectors. (Reading lower layers of the text
        tower, like SDXL's penultimate-layer features, for the same reason.)

        A causal text tower (CLIP's) gives the first noun of "a cat above a dog" no view of
        "above": only later tokens know the relation, so which object goes on top must be routed
        through two cross-attention hops. A few bidirectional layers with learned positions,
        trained with the generator, let every token see the whole caption first (the "context
        refiner" of Lumina-Image 2.0, Qin et al. 2025). On emoji scenes it is what let the
        generator learn the named order of "above"/"below" (bench/RESULTS.md).
        """
        text, text_mask = features.tokens, features.mask
        if self.lexical:
            if features.embeddings is None:
                raise ValueError("this network reads the text tower's input embeddings (text_lexical); "
                                 "the text features have none")
            text = text + self.text_lexical(features.embeddings.to(text.dtype))
        if not self.refiner_layers:
            return text
        text = text + self.text_pos[: text.shape[1]].to(text.dtype)
        for block in self.text_refiner:
            text = block(text, text_mask)
        return text


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE / DiT), shape [grid*grid, width]."""
    def one_axis(dim: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        out = pos.flatten()[:, None].double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(width // 2, ys), one_axis(width // 2, xs)], dim=1).float()
