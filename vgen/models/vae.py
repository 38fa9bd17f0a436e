"""A convolutional KL autoencoder (encoder q(z|x), decoder p(x|z)) and a patch discriminator.

The shape of latent-diffusion's AutoencoderKL (Rombach et al. 2022, arXiv:2112.10752, app. G), in
miniature: residual blocks (GroupNorm, SiLU, 3x3 conv) at each level, a stride-2 convolution
between levels, so `len(multipliers) - 1` halvings give the downsampling factor (4 or 8); the
encoder ends in the mean and log-variance of a diagonal Gaussian over `z_channels` latent channels,
the decoder mirrors it with nearest-neighbour upsampling. With `text_conditioned`, the decoder's
normalised activations are also scaled and shifted by the pooled caption embedding (adaptive
GroupNorm, as the UNet's), so that it is a conditional VAE's p(x | z, caption): sampled from the
prior N(0, I) it draws what the caption says (Sohn et al. 2015, "Learning Structured Output
Representation using Deep Conditional Generative Models").

The patch discriminator is pix2pix's PatchGAN (Isola et al. 2017, arXiv:1611.07004), as
latent-diffusion's `NLayerDiscriminator`: one logit per overlapping patch, no normalisation
(its GAN phase is optional and starts late, vgen.families.vae).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vgen.config import bounded, check_bounds
from vgen.models.quantize import FSQ


@dataclass
class AutoencoderConfig:
    channels: int = bounded(3, ge=1)
    z_channels: int = bounded(4, ge=1)
    width: int = bounded(32, ge=8)  # channels at the first level
    multipliers: list[int] = field(default_factory=lambda: [1, 2, 2])  # per level; 3 levels: factor 4
    blocks_per_level: int = bounded(1, ge=1)
    groups: int = bounded(8, ge=1)
    # the bottleneck: none, a diagonal Gaussian q(z|x) (a KL autoencoder, the codec of latent
    # generation); fsq, finite scalar quantization to the grid of `levels` (an image tokenizer, whose
    # tokens an autoregressive transformer writes), one level count per z channel
    quantizer: Literal["none", "fsq"] = "none"
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.quantizer == "fsq":
            if any(not isinstance(level, int) or level < 3 for level in self.levels):
                raise ValueError(f"levels must be integers >= 3 (one per z channel; 2 levels cannot learn through "
                                 f"FSQ's bound), got {self.levels}")
            if math.prod(self.levels) > 65536:
                raise ValueError(f"levels {self.levels} make a codebook of {math.prod(self.levels):,} codes, the size "
                                 "of a token model's embedding and output layers; at most 65,536")
            if len(self.levels) != self.z_channels:
                raise ValueError(f"quantizer fsq quantizes each z channel to its own number of levels: "
                                 f"z_channels is {self.z_channels} but levels {self.levels} has "
                                 f"{len(self.levels)}; set z_channels to {len(self.levels)}")
        if not self.multipliers or any(m < 1 for m in self.multipliers):
            raise ValueError("multipliers must be a non-empty list of positive integers")
        if any((self.width * m) % self.groups for m in self.multipliers):
            raise ValueError(f"width x every multiplier must be a multiple of groups {self.groups}")

    @property
    def factor(self) -> int:
        """The downsampling factor: image px per latent px."""
        return 2 ** (len(self.multipliers) - 1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice; with `emb`, the norms' scale and shift come from it."""

    def __init__(self, cin: int, cout: int, groups: int, emb: int = 0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cin + 2 * cout) if emb else None
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h1, h2 = self.norm1(x), None
        if self.emb is not None:
            s1, b1, s2, b2 = self.emb(F.silu(emb))[:, :, None, None].split(
                [x.shape[1], x.shape[1], self.conv1.out_channels, self.conv1.out_channels], dim=1)
            h1 = h1 * (1 + s1) + b1
        h = self.conv1(F.silu(h1))
        h2 = self.norm2(h)
        if self.emb is not None:
            h2 = h2 * (1 + s2) + b2
        return self.skip(x) + self.conv2(F.silu(h2))


class Encoder(nn.Module):
    """x [B, C, H, W] in [-1, 1] -> (mean, logvar) [B, z_channels, H / factor, W / factor]; with
    quantizer fsq, (codes, None): the latent is the quantized code itself, and there is no variance."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.width * m for m in cfg.multipliers]
        self.inp = nn.Conv2d(cfg.channels, widths[0], 3, padding=1)
        layers, ch = [], widths[0]
        for level, w in enumerate(widths):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(ch, w, cfg.groups))
                ch = w
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        layers.append(ResBlock(ch, ch, cfg.groups))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(cfg.groups, ch)
        self.quantizer = FSQ(cfg.levels) if cfg.quantizer == "fsq" else None
        self.out = nn.Conv2d(ch, cfg.z_channels * (1 if self.quantizer else 2), 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.out(F.silu(self.norm(self.layers(self.inp(x)))))
        if self.quantizer is not None:
            return self.quantizer(h), None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # latent-diffusion's DiagonalGaussianDistribution bounds

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x -> token ids [B, H / factor, W / factor] (quantizer fsq)."""
        if self.quantizer is None:
            raise ValueError("tokens need a discrete bottleneck (autoencoder.quantizer: fsq)")
        return self.quantizer.indices(self(x)[0])


class Decoder(nn.Module):
    """z [B, z_channels, h, w] (and the pooled caption embedding, if text-conditioned) -> x."""

    def __init__(self, cfg: AutoencoderConfig, pooled_width: int = 0):
        super().__init__()
        widths = [cfg.width * m for m in cfg.multipliers][::-1]
        emb = 4 * cfg.width if pooled_width else 0
        self.text = nn.Sequential(nn.LayerNorm(pooled_width), nn.Linear(pooled_width, emb)) if emb else None
        self.inp = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.blocks, self.upsample, ch = nn.ModuleList([ResBlock(widths[0], widths[0], cfg.groups, emb)]), nn.ModuleList(), widths[0]
        for level, w in enumerate(widths):
            for _ in range(cfg.blocks_per_level):
                self.blocks.append(ResBlock(ch, w, cfg.groups, emb))
                ch = w
            if level < len(widths) - 1:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.levels, self.per_level = len(widths), cfg.blocks_per_level
        self.norm = nn.GroupNorm(cfg.groups, ch)
        self.out = nn.Conv2d(ch, cfg.channels, 3, padding=1)

    def forward(self, z: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.text(pooled.to(z.dtype)) if self.text is not None else None
        h = self.blocks[0](self.inp(z), emb)
        blocks = iter(self.blocks[1:])
        for level in range(self.levels):
            for _ in range(self.per_level):
                h = next(blocks)(h, emb)
            if level < self.levels - 1:
                h = self.upsample[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.norm(h)))


class PatchDiscriminator(nn.Module):
    """PatchGAN: stride-2 4x4 convolutions with LeakyReLU, then one logit per patch [B, 1, h, w]."""

    def __init__(self, channels: int, width: int = 32, layers: int = 2):
        super().__init__()
        modules, ch = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)], width
        for n in range(1, layers):
            out = width * min(2 ** n, 8)
            modules += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch = out
        modules += [nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(ch, 1, 3, padding=1)]
        self.net = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
