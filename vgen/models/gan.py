"""The text-conditioned GAN's two networks: a generator and a projection discriminator.

Generator: StyleGAN-like (Karras et al. 2019/2020) in miniature. A style vector from the noise z and
the pooled text embedding scales and shifts every normalised activation (adaptive instance/group
norm), starting from a learned 4x4 tensor and doubling the size per block; at the low resolutions
the pixels cross-attend to the text tokens, as GigaGAN (Kang et al. 2023, arXiv:2303.05511) does,
so that which object goes where can depend on the words and their order.

Discriminator (`backbone: conv`): residual downsampling convolutions to a feature vector h, then
the projection of Miyato & Koyama ("cGANs with Projection Discriminator", 2018, arXiv:1802.05637):
logit = w . h + <c(text), h>, with c from the pooled text embedding plus an attention pooling of the
text tokens (queried by h), so the discriminator can tell a mismatched caption from the right one.

Discriminator (`backbone: clip`): the frozen image tower of the run's own CLIP as the feature
network, as Projected GAN (Sauer et al. 2021, arXiv:2111.01007) and StyleGAN-T (Sauer et al. 2023,
arXiv:2301.09515) use pretrained features: small trainable convolutional heads on the token grids
of several of its blocks, each with the same projection per token (c per token from the pooled text
plus the token's own attention over the text tokens). A pretrained feature space gives G useful
gradients from the first steps, where a discriminator learned from scratch first has to learn to see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vgen.config import bounded, check_bounds
from vgen.models.layers import Attention, TextRefinement, sincos_2d


@dataclass
class GeneratorConfig:
    z_dim: int = bounded(64, ge=1)
    width: int = bounded(128, ge=8)  # channels at 4x4; halved (to at least 32) at each doubling past 16x16
    attention_max_size: int = bounded(16, ge=0)  # cross-attention to the text tokens up to this size (0: none)
    # the pixels' queries to the text carry a fixed 2-D sine-cosine position (as the DiT's tokens),
    # so that which words a place attends to can depend on where it is ("X to the left of Y")
    position_queries: bool = False
    heads: int = bounded(4, ge=1)
    groups: int = bounded(8, ge=1)
    text_refiner_layers: int = bounded(0, ge=0)  # as the DiT's (vgen.models.layers.TextRefinement)
    text_lexical: bool = False

    def __post_init__(self) -> None:
        check_bounds(self)
        attended = {_channels(self.width, 4 << n) for n in range(8) if 4 << n <= self.attention_max_size}
        odd = sorted(c for c in attended if c % 4)
        if self.position_queries and odd:
            raise ValueError(f"position_queries needs channels divisible by 4 (a sine and a cosine per axis) at "
                             f"every attention size; width {self.width} gives {', '.join(map(str, odd))}")


@dataclass
class DiscriminatorConfig:
    # conv: learned from scratch on the pixels; clip: heads on the frozen CLIP image tower's tokens;
    # conv+clip: both, their logits added (shapes from the pixels, meaning from the CLIP features)
    backbone: Literal["conv", "clip", "conv+clip"] = "conv"
    width: int = bounded(64, ge=8)  # conv: channels at full size, doubled (to at most 4x) at each halving
    head_width: int = bounded(64, ge=8)  # clip: channels of each head on the CLIP tokens
    clip_blocks: list[int] = field(default_factory=list)  # clip: which tower blocks feed a head ([]: every block)
    token_pooling: bool = True  # c also attends over the text tokens (else: the pooled embedding alone)
    text_lexical: bool = False  # the tokens it attends over include the tower's input embeddings
    # conv: a second projection term per place of the final 4 x 4 feature map, whose text query
    # carries the place's 2-D sine-cosine position, so that D can check what the caption puts
    # *there* ("X above Y": X in the top half) rather than only what the image holds as a whole
    spatial_projection: bool = False

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.backbone not in ("conv", "clip", "conv+clip"):
            raise ValueError(f"backbone: expected conv, clip or conv+clip, got {self.backbone!r}")
        if self.clip_blocks and "clip" not in self.backbone:
            raise ValueError(f"clip_blocks is for backbone clip or conv+clip; backbone is {self.backbone}")
        if self.spatial_projection and (self.backbone == "clip" or not self.token_pooling):
            raise ValueError("spatial_projection is a term of the conv backbone's token pooling: it needs backbone "
                             "conv or conv+clip and token_pooling true")


def _channels(width: int, size: int) -> int:
    """Generator channels at `size` px: `width` up to 16 px, then halved per doubling (to >= 32)."""
    return max(32, width // max(1, size // 16))


class ModulatedBlock(nn.Module):
    """Two 3x3 convolutions, each followed by a GroupNorm whose scale and shift come from the style."""

    def __init__(self, cin: int, cout: int, style: int, groups: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(groups, cout, affine=False), nn.GroupNorm(groups, cout, affine=False)
        self.style = nn.Linear(style, 4 * cout)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s1, b1, s2, b2 = self.style(w)[:, :, None, None].chunk(4, dim=1)
        h = F.leaky_relu(self.norm1(self.conv1(x)) * (1 + s1) + b1, 0.2)
        h = F.leaky_relu(self.norm2(self.conv2(h)) * (1 + s2) + b2, 0.2)
        return (self.skip(x) + h) / math.sqrt(2)


class TextCrossAttention(nn.Module):
    """Pixels attend to the text tokens (pre-norm, residual, zero-initialised output); with
    `positions` (a size x size grid), each pixel's query also says where the pixel is."""

    def __init__(self, channels: int, heads: int, text_width: int, positions: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.attn = Attention(channels, heads, context_width=text_width)
        nn.init.zeros_(self.attn.out.weight)
        nn.init.zeros_(self.attn.out.bias)
        self.register_buffer("pos", sincos_2d(channels, positions)[None] if positions else None, persistent=False)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        queries = self.norm(tokens) if self.pos is None else self.norm(tokens) + self.pos.to(tokens.dtype)
        tokens = tokens + self.attn(queries, text, mask)
        return tokens.transpose(1, 2).reshape(B, C, H, W)


class Generator(TextRefinement, nn.Module):
    """image = G(z, text), about [-1, 1], `text` a vgen.text.encoder.TextFeatures."""

    def __init__(self, cfg: GeneratorConfig, image_size: int, channels: int, text_width: int, pooled_width: int):
        super().__init__()
        if image_size < 4 or image_size & (image_size - 1):
            raise ValueError(f"the GAN generator needs a power-of-two image size >= 4, got {image_size}")
        self.cfg, self.image_size = cfg, image_size
        style = cfg.width
        self.mapping = nn.Sequential(nn.Linear(cfg.z_dim + pooled_width, style), nn.LeakyReLU(0.2),
                                     nn.Linear(style, style), nn.LeakyReLU(0.2), nn.Linear(style, style))
        self.init_text_refinement(cfg.text_lexical, cfg.text_refiner_layers, text_width)
        self.const = nn.Parameter(torch.randn(1, cfg.width, 4, 4))
        self.blocks, self.attention = nn.ModuleList(), nn.ModuleDict()
        size, ch = 4, cfg.width
        self.blocks.append(ModulatedBlock(ch, ch, style, cfg.groups))
        while True:
            if size <= cfg.attention_max_size:
                self.attention[str(size)] = TextCrossAttention(ch, cfg.heads, text_width,
                                                               size if cfg.position_queries else 0)
            if size == image_size:
                break
            size *= 2
            self.blocks.append(ModulatedBlock(ch, _channels(cfg.width, size), style, cfg.groups))
            ch = _channels(cfg.width, size)
        self.to_rgb = nn.Conv2d(ch, channels, 1)

    def forward(self, z: torch.Tensor, features) -> torch.Tensor:
        w = self.mapping(torch.cat([z, features.pooled.to(z.dtype)], dim=1))
        text, mask = self.refine_text(features), features.mask
        x = self.const.expand(z.shape[0], -1, -1, -1)
        for i, block in enumerate(self.blocks):
            if i:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = block(x, w)
            if str(x.shape[-1]) in self.attention:
                x = self.attention[str(x.shape[-1])](x, text, mask)
        # A linear output, as StyleGAN's (clamped to [-1, 1] only when saved): a tanh saturates on
        # the white backgrounds of emoji scenes, and a saturated generator gets no gradient
        # (bench/RESULTS.md: every image white by step 250-500, with either discriminator).
        return self.to_rgb(x)


class DownBlock(nn.Module):
    """Residual: two 3x3 convolutions with LeakyReLU, then 2x average pooling (no normalisation, as
    StyleGAN's discriminator: R1 regularises it instead)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2)
        return (F.avg_pool2d(self.skip(x), 2) + F.avg_pool2d(h, 2)) / math.sqrt(2)


def _moved_projection_keys(state_dict, prefix, *args) -> None:
    """Checkpoints of vgen before TextProjection held the conv D's text layers at its top level."""
    for name in ("pooled_proj.", "text_lexical.", "token_norm.", "token_pool."):
        for key in [k for k in state_dict if k.startswith(prefix + name)]:
            state_dict[prefix + "projection." + key[len(prefix):]] = state_dict.pop(key)


class Discriminator(nn.Module):
    """logit = D(image, text): w . h + <c(text, h), h>, h the image's feature vector."""

    def __init__(self, cfg: DiscriminatorConfig, image_size: int, channels: int, text_width: int, pooled_width: int):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Conv2d(channels, cfg.width, 1)
        self.blocks, size, ch = nn.ModuleList(), image_size, cfg.width
        while size > 4:
            out = min(4 * cfg.width, 2 * ch)
            self.blocks.append(DownBlock(ch, out))
            size, ch = size // 2, out
        self.final = nn.Conv2d(ch, ch, 3, padding=1)
        self.features = nn.Linear(ch * 4 * 4, ch)
        self.unconditional = nn.Linear(ch, 1)
        self.projection = TextProjection(cfg, ch, text_width, pooled_width)
        if cfg.spatial_projection:
            if ch % 4:
                raise ValueError(f"spatial_projection needs D's final width divisible by 4 (a sine and a cosine per "
                                 f"axis); discriminator.width {cfg.width} gives {ch}")
            self.spatial = TextProjection(cfg, ch, text_width, pooled_width)
            self.register_buffer("places", sincos_2d(ch, 4)[None], persistent=False)  # [1, 16, ch]
        self._register_load_state_dict_pre_hook(_moved_projection_keys)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.inp(images), 0.2)
        for block in self.blocks:
            h = block(h)
        return F.leaky_relu(self.final(h), 0.2)  # [B, ch, 4, 4]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._embed(self.feature_map(images))

    def _embed(self, grid: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.features(grid.flatten(1)), 0.2)

    def _spatial_term(self, grid: torch.Tensor, features) -> torch.Tensor:
        """Mean over the 16 places p of <c(text, h_p + pos_p), h_p> / sqrt(width)."""
        h = grid.flatten(2).transpose(1, 2)  # [B, 16, ch]
        c = self.spatial(h + self.places.to(h.dtype), features)
        return ((c * h).sum(dim=-1) / math.sqrt(h.shape[-1])).mean(dim=1).float()

    def forward(self, images: torch.Tensor, features, pairs: int = 0,
                candidates=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The logits [B]; with `pairs` = P > 0, also the matching scores [P, M] of the first P
        images against M candidate captions (TextFeatures; default: the first P captions of
        `features`): scores[i, j] = <c(text_j, h_i), h_i> / sqrt(width), the conditional part of the
        logit image i would get with caption j (for gan.contrastive_weight), returned as (logits,
        scores). One call for both, so that DDP sees one forward of D."""
        return self.judge(self.feature_map(images), features, pairs, candidates)

    def judge(self, grid: torch.Tensor, features, pairs: int = 0,
              candidates=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """forward() from the images' feature map [B, ch, 4, 4] (feature_map), for a caller that
        also uses the map itself (gan.feature_matching_weight)."""
        h = self._embed(grid)
        c = self.projection(h[:, None], features)[:, 0]
        logit = (self.unconditional(h)[:, 0] + (c * h).sum(dim=1) / math.sqrt(h.shape[1])).float()
        if self.cfg.spatial_projection:
            logit = logit + self._spatial_term(grid, features)
        if not pairs:
            return logit
        h = h[:pairs]
        if candidates is None:
            candidates = type(features)(*(part[:pairs] for part in features))
        c = self.projection.pairwise(h, candidates)
        return logit, ((c * h[:, None]).sum(dim=-1) / math.sqrt(h.shape[1])).float()


class TextProjection(nn.Module):
    """c(text, h) for the projection term <c, h>: the pooled text embedding projected to h's width,
    plus (token_pooling) an attention of each h over the text tokens."""

    def __init__(self, cfg: DiscriminatorConfig, width: int, text_width: int, pooled_width: int):
        super().__init__()
        self.cfg = cfg
        self.pooled_proj = nn.Sequential(nn.LayerNorm(pooled_width), nn.Linear(pooled_width, width))
        if cfg.token_pooling:
            if cfg.text_lexical:
                self.text_lexical = nn.Sequential(nn.LayerNorm(text_width, eps=1e-6), nn.Linear(text_width, text_width))
            self.token_norm = nn.LayerNorm(text_width, eps=1e-6)
            self.token_pool = Attention(width, 1, context_width=text_width)

    def _tokens(self, features, dtype: torch.dtype) -> torch.Tensor:
        tokens = features.tokens
        if self.cfg.text_lexical:
            tokens = tokens + self.text_lexical(features.embeddings.to(tokens.dtype))
        return self.token_norm(tokens.to(dtype))

    def forward(self, h: torch.Tensor, features) -> torch.Tensor:
        """h [B, N, width] -> c [B, N, width]."""
        c = self.pooled_proj(features.pooled.to(h.dtype))[:, None]
        if self.cfg.token_pooling:
            c = c + self.token_pool(h, self._tokens(features, h.dtype), features.mask)
        return c

    def pairwise(self, h: torch.Tensor, features) -> torch.Tensor:
        """c(text_j, h_i) for every image i and caption j: h [P, width], M captions -> c [P, M, width];
        where M = P, the diagonal is forward(h[:, None], features)[:, 0]. Keys and values are
        computed once per caption, not once per pair."""
        c = self.pooled_proj(features.pooled.to(h.dtype))[None].expand(h.shape[0], -1, -1)
        if self.cfg.token_pooling:
            attn, tokens = self.token_pool, self._tokens(features, h.dtype)
            P, (M, L), heads = h.shape[0], tokens.shape[:2], attn.heads
            q = attn.q(h).view(P, heads, -1)  # [image, head, d]
            k, v = attn.kv(tokens).view(M, L, 2, heads, -1).unbind(2)  # [caption, token, head, d]
            scores = torch.einsum("ihd,jlhd->ijhl", q, k) * q.shape[-1] ** -0.5
            scores = scores.masked_fill(~features.mask[None, :, None, :], float("-inf"))
            y = torch.einsum("ijhl,jlhd->ijhd", scores.softmax(dim=-1), v).reshape(P, M, -1)
            c = c + attn.out(y)
        return c


def _dropped_tower_keys(state_dict, prefix, *args) -> None:
    """The first checkpoints with this discriminator also saved the frozen tower (`visual.*`)."""
    for key in [k for k in state_dict if k.startswith(prefix + "visual.")]:
        del state_dict[key]


class ClipFeatureDiscriminator(nn.Module):
    """logit = D(image, text) on the frozen CLIP image tower `visual` (an open_clip VisionTransformer):
    per chosen block, a head of two 3x3 convolutions over the block's token grid, and per token
    w . h + <c(text, h), h>; the logit is the sum over heads of the mean over tokens."""

    def __init__(self, cfg: DiscriminatorConfig, visual: nn.Module, mean, std, text_width: int, pooled_width: int):
        super().__init__()
        self.cfg = cfg
        # Held outside the module tree, as a frozen text encoder is (vgen.models.conditioned): not
        # trained, not saved with D's weights (it is the run's CLIP, recorded by its source), not
        # wrapped by DDP; always in eval mode, on the device it was given on.
        object.__setattr__(self, "visual", visual.requires_grad_(False).eval())
        self.input_size = int(visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        n_blocks = len(visual.transformer.resblocks)
        self.blocks = list(cfg.clip_blocks) or list(range(n_blocks))
        # open_clip returns the grids in block order, one per block: a head per grid, in that order.
        if any(not 0 <= b < n_blocks for b in self.blocks) or self.blocks != sorted(set(self.blocks)):
            raise ValueError(f"discriminator.clip_blocks: {cfg.clip_blocks} must be distinct, increasing block indices "
                             f"in 0..{n_blocks - 1} (the CLIP image tower has {n_blocks} blocks)")
        tower_width, w = int(visual.transformer.width), cfg.head_width
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(tower_width, w, 3, padding=1), nn.LeakyReLU(0.2),
                          nn.Conv2d(w, w, 3, padding=1), nn.LeakyReLU(0.2)) for _ in self.blocks)
        self.unconditional = nn.ModuleList(nn.Linear(w, 1) for _ in self.blocks)
        self.projection = nn.ModuleList(TextProjection(cfg, w, text_width, pooled_width) for _ in self.blocks)
        self._register_load_state_dict_pre_hook(_dropped_tower_keys)

    def forward(self, images: torch.Tensor, features, image_embedding: bool = False):
        """The logits [B]; with image_embedding, also the CLIP image embedding [B, embed_dim] of the
        same forward pass (for CLIP guidance, vgen.families.gan)."""
        x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1] (fp32, not a bf16 image's), then CLIP's normalisation
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        out = self.visual.forward_intermediates(x, indices=self.blocks, intermediates_only=not image_embedding,
                                                stop_early=not image_embedding, output_fmt="NCHW")
        grids = out["image_intermediates"]
        logit = 0.0
        for grid, head, unconditional, projection in zip(grids, self.heads, self.unconditional, self.projection):
            h = head(grid).flatten(2).transpose(1, 2)  # [B, tokens, width]
            c = projection(h, features)
            per_token = unconditional(h)[..., 0] + (c * h).sum(dim=-1) / math.sqrt(h.shape[-1])
            logit = logit + per_token.mean(dim=1)
        return (logit.float(), out["image_features"].float()) if image_embedding else logit.float()


class SumDiscriminator(nn.Module):
    """`backbone: conv+clip`: logit = conv(image, text) + clip(image, text)."""

    def __init__(self, conv: Discriminator, clip: ClipFeatureDiscriminator):
        super().__init__()
        self.conv, self.clip = conv, clip

    def forward(self, images: torch.Tensor, features, image_embedding: bool = False):
        out = self.clip(images, features, image_embedding)
        if image_embedding:
            return self.conv(images, features) + out[0], out[1]
        return self.conv(images, features) + out
