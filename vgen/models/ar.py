"""A decoder-only transformer that writes an image's tokens after its caption: the autoregressive
family's network (DALL-E, Ramesh et al. 2021, arXiv:2102.12092; LlamaGen, Sun et al. 2024,
arXiv:2406.06525).

The sequence is [caption tokens | start-of-image | image tokens 0 .. N-2], and the output at the
start-of-image token and at image token k predicts image token 0 and k + 1 (raster order over the
tokenizer's grid). Llama's blocks (Touvron et al. 2023): pre-RMSNorm, causal self-attention with
rotary positions, a SwiGLU MLP, no biases. Positions are LlamaGen's 2-D rotary ones: half of each
head's rotary pairs turn with the token's row, half with its column, so attention depends on the
relative place of two tokens on the grid; the caption tokens and the start-of-image token are not
rotated (the text tower's features already carry their order).

The caption conditions the tokens as a prefix (`conditioning: prefix`, LlamaGen's text-to-image
setting: the projected text tokens are the first positions of the sequence) or through a
cross-attention in every block (`conditioning: cross`, as the DiT's). Sampling runs with a key/value
cache: the prefix once, then one position per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vgen.config import bounded, check_bounds
from vgen.models.layers import Attention, TextRefinement, attention


@torch.compiler.disable
def _embed_eagerly(embed: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    """The token lookup outside torch.compile: compiled, its backward is a scatter-add that
    inductor's CPU kernels parallelise with atomic adds, and two runs with 2 threads differed in
    the last bits of the loss by step 15; eager PyTorch accumulates in a fixed order."""
    return embed(tokens)


@dataclass
class ArNetworkConfig:
    width: int = bounded(256, ge=8)
    depth: int = bounded(6, ge=1)
    heads: int = bounded(4, ge=1)
    mlp_width: int = bounded(0, ge=0)  # the SwiGLU's hidden width; 0: 8/3 of width, up to a multiple of 32 (Llama's)
    conditioning: Literal["prefix", "cross"] = "prefix"
    text_refiner_layers: int = bounded(0, ge=0)  # as the DiT's (vgen.models.layers.TextRefinement)
    text_lexical: bool = False
    rope_base: float = bounded(10000.0, gt=1)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if (self.width // self.heads) % 4:
            raise ValueError(f"each head's width, width {self.width} / heads {self.heads} = {self.width // self.heads}, "
                             "must be a multiple of 4 (2-D rotary positions turn pairs of channels, half of them by "
                             "row and half by column)")

    @property
    def hidden(self) -> int:
        return self.mlp_width or 32 * -(-(8 * self.width // 3) // 32)


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019), in fp32."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_2d(head_dim: int, grid: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [grid * grid, head_dim / 2] of the raster-order grid positions: the first half of
    the pairs rotate by the row, the second by the column (RoFormer, Su et al. 2021, per axis)."""
    pairs = head_dim // 2
    axis = pairs // 2
    freqs = 1.0 / base ** (torch.arange(axis, dtype=torch.float64) / axis)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1)
    return angles.cos().float(), angles.sin().float()


def rotary_1d(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim / 2] of sequence positions 0 .. length - 1 (RoFormer's rotary)."""
    freqs = 1.0 / base ** (torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2))
    angles = torch.arange(length)[:, None] * freqs
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i + 1) of x [B, heads, T, d] by the angles of cos, sin [T, d / 2]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with rotary positions and a key/value cache."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, cos, sin, mask: torch.Tensor, cache: dict | None) -> torch.Tensor:
        """x [B, T, W] the new positions; mask [B, 1, T, T_all] True where a query may look; with
        `cache`, keys and values of earlier positions are read from it and these appended."""
        B, T, W = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = attention(q, k, v, mask)  # every query sees the caption's start marker: no row is all masked
        return self.out(y.transpose(1, 2).reshape(B, T, W))


class Block(nn.Module):
    def __init__(self, cfg: ArNetworkConfig, text_width: int):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.width), SelfAttention(cfg.width, cfg.heads)
        if cfg.conditioning == "cross":
            self.norm_cross = RMSNorm(cfg.width)
            self.cross = Attention(cfg.width, cfg.heads, context_width=text_width)
        self.norm2 = RMSNorm(cfg.width)
        self.gate_up = nn.Linear(cfg.width, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.width, bias=False)

    def forward(self, x, cos, sin, mask, text, text_mask, cache):
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache)
        if hasattr(self, "cross"):
            x = x + self.cross(self.norm_cross(x), text, text_mask)
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)  # SwiGLU (Shazeer 2020)


class TokenTransformer(TextRefinement, nn.Module):
    """logits = net(tokens, text): next-token logits [B, N, codebook] for every image token, the
    caption a vgen.text.encoder.TextFeatures.

    With `sequence` = L > 0 the tokens are a 1-D sequence of at most L positions with 1-D rotary
    positions instead of a grid x grid image (the captioner: bytes of a caption written after an
    image, the image's tokens as the cross-attended context)."""

    def __init__(self, cfg: ArNetworkConfig, codebook_size: int, grid: int, text_width: int, sequence: int = 0):
        super().__init__()
        self.cfg, self.grid, self.codebook_size = cfg, grid, codebook_size
        self.init_text_refinement(cfg.text_lexical, cfg.text_refiner_layers, text_width)
        if cfg.conditioning == "prefix":
            self.text_in = nn.Sequential(nn.LayerNorm(text_width, eps=1e-6), nn.Linear(text_width, cfg.width))
        self.start = nn.Parameter(torch.randn(cfg.width) * 0.02)
        self.embed = nn.Embedding(codebook_size, cfg.width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, text_width) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width)
        self.head = nn.Linear(cfg.width, codebook_size, bias=False)
        head_dim = cfg.width // cfg.heads
        cos, sin = rotary_1d(head_dim, sequence, cfg.rope_base) if sequence else rotary_2d(head_dim, grid, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _prefix(self, features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positions before image token 0 (the caption with `prefix`, and the start token) and
        their key mask, and the text the blocks cross-attend to (with `cross`) and its mask."""
        text, text_mask = self.refine_text(features), features.mask
        B = text.shape[0]
        start = self.start.to(text.dtype).expand(B, 1, -1)
        ones = torch.ones(B, 1, dtype=torch.bool, device=text.device)
        if self.cfg.conditioning == "prefix":
            return torch.cat([self.text_in(text), start], dim=1), torch.cat([text_mask, ones], dim=1), None, None
        return start, ones, text, text_mask

    def _angles(self, prefix: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of sequence positions start .. start + count - 1: the `prefix` first ones not
        rotated, position prefix + k (image token k) at grid position k."""
        identity = (torch.ones_like(self.cos[:1]), torch.zeros_like(self.sin[:1]))
        cos = torch.cat([identity[0].expand(prefix, -1), self.cos])[start:start + count]
        sin = torch.cat([identity[1].expand(prefix, -1), self.sin])[start:start + count]
        return cos, sin

    def _run(self, x, keys, start, prefix, text, text_mask, caches):
        """The blocks over new positions x [B, T, W] at sequence positions start .. start + T - 1,
        keys [B, start + T]: which positions so far are real (not caption padding)."""
        T, total = x.shape[1], keys.shape[1]
        causal = torch.ones(T, total, dtype=torch.bool, device=x.device).tril(total - T)
        mask = causal[None, None] & keys[:, None, None, :]
        cos, sin = self._angles(prefix, start, T)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cos, sin, mask, text, text_mask, cache)
        return self.head(self.norm(x))

    def forward(self, tokens: torch.Tensor, features) -> torch.Tensor:
        """Teacher forcing: tokens [B, N] (raster order) -> logits [B, N, codebook], row k from the
        caption and tokens 0 .. k - 1."""
        prefix, keys, text, text_mask = self._prefix(features)
        x = torch.cat([prefix, _embed_eagerly(self.embed, tokens[:, :-1]).to(prefix.dtype)], dim=1)
        keys = torch.cat([keys, torch.ones_like(tokens[:, :-1], dtype=torch.bool)], dim=1)
        P = prefix.shape[1]
        return self._run(x, keys, 0, P, text, text_mask, [None] * len(self.blocks))[:, P - 1:]

    # --- decoding, one token at a time ---
    def start_decoding(self, features, use_cache: bool = True) -> tuple[torch.Tensor, dict]:
        """Logits [B, codebook] of image token 0, and the decoding state `next_logits` continues."""
        prefix, keys, text, text_mask = self._prefix(features)
        state = {"P": prefix.shape[1], "keys": keys, "text": text, "text_mask": text_mask,
                 "caches": [{} for _ in self.blocks] if use_cache else None, "x": prefix}
        logits = self._run(prefix, keys, 0, state["P"], text, text_mask,
                           state["caches"] or [None] * len(self.blocks))
        return logits[:, -1], state

    def next_logits(self, token: torch.Tensor, state: dict) -> torch.Tensor:
        """Append image token [B] (the next in raster order) and return the logits of the one after;
        with the cache one position is computed, without it the whole sequence again."""
        x = self.embed(token)[:, None].to(state["x"].dtype)
        state["keys"] = torch.cat([state["keys"], torch.ones_like(token, dtype=torch.bool)[:, None]], dim=1)
        if state["caches"] is not None:
            start = state["keys"].shape[1] - 1
            logits = self._run(x, state["keys"], start, state["P"], state["text"], state["text_mask"], state["caches"])
        else:
            state["x"] = torch.cat([state["x"], x], dim=1)
            logits = self._run(state["x"], state["keys"], 0, state["P"], state["text"], state["text_mask"],
                               [None] * len(self.blocks))
        return logits[:, -1]

    @staticmethod
    def reorder(state: dict, rows: torch.Tensor) -> None:
        """Keep rows `rows` of a decoding state, in that order (beam search: the surviving beams)."""
        for key in ("keys", "text", "text_mask", "x"):
            if state[key] is not None:
                state[key] = state[key][rows]
        for cache in state["caches"] or []:
            for key in cache:
                cache[key] = cache[key][rows]
