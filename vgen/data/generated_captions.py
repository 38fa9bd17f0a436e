"""`vgen preprocess --caption-with`: the images a raw folder has no caption for get the one a
captioner writes, in batches, without changing the order the outcomes are written in."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from vgen.data.captions import clean_captions

if TYPE_CHECKING:  # preprocess imports this module when it runs
    from vgen.data.preprocess import _Outcome

CAPTION_BATCH = 64  # images a captioner is given at once


def with_generated_captions(outcomes: Iterable[_Outcome], captioner, resolution: int,
                             max_bytes: int = 64 << 20) -> Iterator[_Outcome]:
    """The outcomes in their order, those that need a caption given the captioner's, written for
    CAPTION_BATCH of them at a time; the outcomes waiting for a batch hold at most about
    `max_bytes` of pixels (the decoding window's budget). A sampling captioner draws each image's
    caption from a seed of its content hash, whatever batch it is in."""
    pending: list[_Outcome] = []
    most = max(1, max_bytes // (3 * resolution * resolution))

    def flush() -> Iterator[_Outcome]:
        needing = [o for o in pending if o.generate_caption and o.reason is None]
        if needing:
            import torch

            images = torch.from_numpy(np.stack([np.frombuffer(o.pixels, np.uint8).reshape(3, resolution, resolution)
                                                for o in needing]))
            seeds = [int.from_bytes(o.digest[:4], "big") for o in needing]
            for o, text in zip(needing, captioner(images, seeds)):
                o.captions = clean_captions([text])
                if not o.captions:
                    o.reason, o.detail = "no_caption", "no caption of its own, and the captioner wrote an empty one"
        yield from pending
        pending.clear()

    for outcome in outcomes:
        pending.append(outcome)
        if sum(o.generate_caption for o in pending) >= CAPTION_BATCH or len(pending) >= most:
            yield from flush()
    yield from flush()
