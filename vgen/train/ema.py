"""Exponential moving average of the weights (Polyak averaging), the weights we sample from.

With warm-up the decay starts small, d_k = min(decay, (1 + k) / (10 + k)), so early EMA weights are
not dominated by the random initialisation (the schedule used by many diffusion codebases).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def make_ema(model: nn.Module, share: list | tuple = ()) -> nn.Module:
    """A frozen copy of `model`; objects in `share` (e.g. a frozen text encoder held by the model
    outside its module tree) are referenced, not copied."""
    ema = copy.deepcopy(model, memo={id(obj): obj for obj in share}).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].lerp_(param.detach(), 1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, buf in model.named_buffers():
        ema_buffers[name].copy_(buf)
