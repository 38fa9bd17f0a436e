"""The judge's object classifier: a small convnet over CROP x CROP crops, 36 classes."""

from __future__ import annotations

import torch
from torch import nn

from vgen.evaluate.judge.settings import NOUNS


def classifier() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2),  # 16 -> 8
                         *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 8 -> 4
                         *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, len(NOUNS)))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0

