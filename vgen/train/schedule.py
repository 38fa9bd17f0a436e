"""Learning-rate schedule: linear warm-up, then cosine decay to `min_lr_ratio * lr`
(Loshchilov & Hutter, SGDR, 2017, without restarts)."""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
