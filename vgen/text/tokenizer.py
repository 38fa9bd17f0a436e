"""Caption token counting with open_clip's tokenizer, the one every open_clip text tower uses.

Preprocessing counts tokens to report captions that the text encoder will truncate: a CLIP context
of 77 positions holds 75 BPE tokens between the start and end markers.
"""

from __future__ import annotations

from functools import cached_property

DEFAULT_CONTEXT_LENGTH = 77


class CaptionTokenizer:
    name = "open_clip.SimpleTokenizer (CLIP BPE, 49408 tokens)"

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH):
        self.context_length = context_length

    @cached_property
    def _bpe(self):
        # Imported lazily: open_clip pulls in torch, which `vgen --help` should not pay for.
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=self.context_length)

    def count(self, caption: str) -> int:
        """Positions the caption occupies in the context, start and end markers included."""
        return len(self._bpe.encode(caption)) + 2

    def truncates(self, caption: str) -> bool:
        return self.count(caption) > self.context_length
