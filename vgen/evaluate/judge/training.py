"""Training the classifier on synthesised Twemoji crops, with colour, blur, noise and flip augmentation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from vgen.evaluate.judge.network import classifier, normalize
from vgen.evaluate.judge.settings import JudgeSettings
from vgen.evaluate.judge.synthesis import Glyph, training_crops, training_layout
from vgen.evaluate.twemoji import TwemojiSet


_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
_BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).div(16).repeat(3, 1, 1, 1)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _augment(x: torch.Tensor, settings: JudgeSettings, g: torch.Generator) -> torch.Tensor:
    """Colour, blur, noise and flips on float [B,3,H,W] crops in [0, 1], drawn from generator `g`."""
    n = x.shape[0]
    # Hue: rotate colours about the grey axis (white and greys stay put).
    angle = torch.where(torch.rand(n, generator=g) < settings.hue_rotate_p,
                        _uniform(n, 0.0, 2 * math.pi, g),
                        _uniform(n, -2 * math.pi * settings.hue_jitter, 2 * math.pi * settings.hue_jitter, g))
    cos, sin = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3.0)
    rot = cos * torch.eye(3) + (1 - cos) * torch.full((3, 3), 1 / 3) + sin * cross
    x = torch.einsum("bij,bjhw->bihw", rot, x).clamp(0, 1)
    # Per-channel tone curves (gamma) and gains: the two styles' palettes differ in more than hue.
    gamma = torch.exp(settings.gamma_sigma * torch.randn(n, 3, 1, 1, generator=g))
    gain = 1 + settings.channel_gain * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    x = (x.clamp_min(1e-4) ** gamma * gain).clamp(0, 1)
    # Saturation (grayscale with some probability) and brightness.
    gray = (x * _GRAY).sum(1, keepdim=True)
    sat = torch.where(torch.rand(n, generator=g) < settings.grayscale_p, torch.zeros(n),
                      _uniform(n, *settings.saturation, g)).view(n, 1, 1, 1)
    x = gray + sat * (x - gray)
    x = x * _uniform(n, *settings.brightness, g).view(n, 1, 1, 1)
    # Blur (or sharpen, below 0): a random blend with a 3x3 binomial blur.
    amount = torch.where(torch.rand(n, generator=g) < settings.blur_p, _uniform(n, -0.5, 1.0, g),
                         torch.zeros(n))
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _BLUR, groups=3)
    x = torch.lerp(x, blurred, amount.view(n, 1, 1, 1))
    # Noise, and horizontal flips (the two art styles do not always face the same way).
    x = x + _uniform(n, 0.0, settings.noise_std, g).view(n, 1, 1, 1) * torch.randn(x.shape, generator=g)
    flip = torch.rand(n, generator=g) < settings.flip_p
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    return x.clamp(0, 1)


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16: about 3x faster for this network).

    Decided from the hardware, not by timing, so that the same machine always trains the same weights.
    """
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def train_network(twemoji: TwemojiSet, settings: JudgeSettings,
                   log: Callable[[str], None]) -> tuple[nn.Module, str]:
    """The trained classifier (eval mode) and the precision it was trained in."""
    start = time.perf_counter()
    glyphs = {noun: [Glyph(image) for image in images] for noun, images in twemoji.glyphs().items()}
    use_bf16 = _cpu_has_bf16()
    log(f"judge: training in {'bf16' if use_bf16 else 'fp32'} on CPU")
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    model = classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    # Each epoch draws fresh scenes (1 or 2 crops each): count the steps for the schedule first.
    counts = {n: len(v) for n, v in glyphs.items()}
    total_steps = sum(math.ceil(sum(len(training_layout(settings, i, counts))
                                    for i in range(e * settings.scenes, (e + 1) * settings.scenes))
                                / settings.batch_size) for e in range(settings.epochs))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=total_steps, pct_start=0.15)
    model.train()
    for epoch in range(settings.epochs):
        x, y = training_crops(glyphs, settings, epoch)
        perm = torch.randperm(len(x), generator=g)
        total = correct = 0
        loss_sum = 0.0
        for k in range(0, len(x), settings.batch_size):
            idx = perm[k:k + settings.batch_size]
            batch = normalize(_augment(x[idx], settings, g))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(batch)
            loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
            total += len(idx)
        log(f"judge: epoch {epoch + 1}/{settings.epochs} loss {loss_sum / total:.3f} "
            f"train acc {correct / total:.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval(), "bf16" if use_bf16 else "fp32"

