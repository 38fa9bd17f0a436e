"""A text-to-image flow model: a denoiser network plus the text encoder it is conditioned on."""

from __future__ import annotations

import torch
from torch import nn


class TextToImageFlow(nn.Module):
    """`velocity(x_t, t, text)` with `text = encode_text(captions)`.

    A frozen text encoder is kept outside the module tree (not a submodule), so it is not trained,
    not averaged by EMA, not wrapped by DDP and not saved with the network; a LoRA or fully
    fine-tuned one is a submodule and travels with the weights.
    """

    def __init__(self, network: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.network = network
        self.trains_text = text_encoder.mode != "frozen"
        if self.trains_text:
            self.text = text_encoder
        else:
            object.__setattr__(self, "_frozen_text", text_encoder)

    @property
    def text_encoder(self) -> nn.Module:
        return self.text if self.trains_text else self._frozen_text

    def encode_text(self, captions: list[str]):
        return self.text_encoder.encode(captions)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        return self.network(x, t, text.tokens, text.mask, text.pooled, text.embeddings)

    def forward(self, x: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return self.velocity(x, t, self.encode_text(captions))
