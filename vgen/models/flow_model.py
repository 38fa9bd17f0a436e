"""A text-to-image flow model: a denoiser network plus the text encoder it is conditioned on."""

from __future__ import annotations

import torch
from torch import nn

from vgen.models.conditioned import TextConditioned


class TextToImageFlow(TextConditioned):
    """`velocity(x_t, t, text)` with `text = encode_text(captions)`; the network is any of
    vgen.models.NETWORKS (they share the signature `network(x, t, text_features)`)."""

    def __init__(self, network: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.network = network
        self.hold_text_encoder(text_encoder)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        return self.network(x, t, text)

    def forward(self, x: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return self.velocity(x, t, self.encode_text(captions))
