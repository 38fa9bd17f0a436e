"""A model conditioned on a text encoder: how every text-to-image family holds its text tower."""

from __future__ import annotations

from torch import nn


class TextConditioned(nn.Module):
    """Holds the text encoder a model is conditioned on, and `encode_text(captions)`.

    A frozen text encoder is kept outside the module tree (not a submodule), so it is not trained,
    not averaged by EMA, not wrapped by DDP and not saved with the network; a LoRA or fully
    fine-tuned one is the submodule `text` and travels with the weights.

    Subclasses register their networks first and then call `hold_text_encoder`: the order of the
    submodules is the order of the parameters, which the optimizer's state in a checkpoint follows.
    """

    def hold_text_encoder(self, text_encoder: nn.Module) -> None:
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

    def shared_modules(self) -> list[nn.Module]:
        """What a copy of this model (its EMA) must share rather than copy: the frozen encoder."""
        return [] if self.trains_text else [self.text_encoder]
