"""The GAN family's image and text terms, as functions of tensors: DiffAugment (Zhao et al. 2020,
arXiv:2006.10738), XMC-GAN's image-text contrastive loss (Zhang et al. 2021, arXiv:2101.04702) and
pix2pixHD's feature matching (Wang et al. 2018, arXiv:1711.11585)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vgen.distributed import all_reduce
from vgen.errors import ConfigError

AUGMENTS = ("translation", "cutout", "color")


def diff_augment(x: torch.Tensor, params: torch.Tensor, policy: list[str]) -> torch.Tensor:
    """DiffAugment of images x [B, C, H, W] in [-1, 1] with per-sample uniforms `params` [B, 7]
    (brightness, saturation, contrast, translate y, x, cutout centre y, x), all differentiable in x."""
    B, _, H, W = x.shape
    # Positions from the fp32 uniforms (not rounded to a bf16 image's dtype), colour in x's dtype.
    u, c = params.to(x.device, torch.float32), params.to(x.device, x.dtype)
    if "color" in policy:
        x = x + (c[:, 0] - 0.5).view(B, 1, 1, 1)  # brightness in [-0.5, 0.5]
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (2 * c[:, 1]).view(B, 1, 1, 1) + mean  # saturation in [0, 2]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (c[:, 2] + 0.5).view(B, 1, 1, 1) + mean  # contrast in [0.5, 1.5]
    if "translation" in policy:  # shift by up to 1/8 of the size, zero-padded
        pad_y, pad_x = H // 8, W // 8
        dy = (u[:, 3] * (2 * pad_y + 1)).long().clamp(max=2 * pad_y) - pad_y
        dx = (u[:, 4] * (2 * pad_x + 1)).long().clamp(max=2 * pad_x) - pad_x
        padded = F.pad(x, (pad_x, pad_x, pad_y, pad_y))
        rows = (torch.arange(H, device=x.device)[None] + pad_y - dy[:, None])  # [B, H]
        cols = (torch.arange(W, device=x.device)[None] + pad_x - dx[:, None])  # [B, W]
        batch = torch.arange(B, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if "cutout" in policy:  # zero a square of half the size (rows cy - H/4 .. cy + H/4 - 1), clipped at the edges
        cy = (u[:, 5] * (H + H % 2)).long()
        cx = (u[:, 6] * (W + W % 2)).long()
        dy = torch.arange(H, device=x.device)[None, :, None] - cy.view(B, 1, 1)
        dx = torch.arange(W, device=x.device)[None, None, :] - cx.view(B, 1, 1)
        inside = (dy >= -(H // 4)) & (dy < H // 4) & (dx >= -(W // 4)) & (dx < W // 4)
        x = x * (~inside).unsqueeze(1).to(x.dtype)
    return x


def contrastive_loss(scores: torch.Tensor, captions: list[str], wrong: list[str],
                     group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each image's own caption among its group's candidates, and how often it
    scores highest. `scores` [B, 2B]: image i against captions[j] (columns 0..B-1) and against the
    wrong caption drawn for sample j (columns B..2B-1; one word away with gan.mismatch_hard), both
    of group j // group. A candidate that is the same text as the image's own caption is no
    negative and is left out (emoji captions repeat)."""
    B = scores.shape[0]
    if B % group:
        raise ConfigError(f"gan.contrastive_group {group} does not divide the batch of {B} each process trains on")
    index = torch.arange(B, device=scores.device)
    column = torch.cat([index, index])  # the sample each candidate belongs to
    same_group = (index[:, None] // group) == (column[None, :] // group)
    ids = {caption: n for n, caption in enumerate(dict.fromkeys(captions + wrong))}
    own = torch.tensor([ids[c] for c in captions], device=scores.device)
    candidate = torch.tensor([ids[c] for c in captions + wrong], device=scores.device)
    same_text = (own[:, None] == candidate[None, :]) & (torch.arange(2 * B, device=scores.device)[None] != index[:, None])
    scores = scores.float().masked_fill(~same_group | same_text, float("-inf"))
    return F.cross_entropy(scores, index), (scores.argmax(dim=1) == index).float().mean()


def feature_matching(fake_map: torch.Tensor, real_map: torch.Tensor) -> torch.Tensor:
    """mean |fake_map - real_map| / mean |real_map|: D's feature maps of G's images and of the real
    images of the same captions (pix2pixHD, eq. 4, on D's last map), relative to the real map's
    scale, which is the whole batch's (all-reduced) so that torchrun's processes divide by what one
    process would."""
    real_map = real_map.detach().float()
    scale = all_reduce(real_map.abs().mean(), "mean").clamp_min(1e-6)
    return (fake_map.float() - real_map).abs().mean() / scale
