"""A captioner run as a function from images to captions: what `vgen caption` and
`vgen preprocess --caption-with` call."""

from __future__ import annotations

from pathlib import Path

import torch


class RunCaptioner:
    """`captioner(images)`: captions of uint8 images [N, 3, H, W] of any one size, written by the
    EMA weights of a captioner run (fp32, so a caption does not depend on the batch)."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "latest", device: str = "auto",
                 decoder: str | None = None, beams: int | None = None, temperature: float | None = None):
        from vgen.families.captioner import DECODERS
        from vgen.errors import UsageError
        from vgen.runs import load_run

        if decoder is not None and decoder not in DECODERS:
            raise UsageError(f"--decoder: expected one of {', '.join(DECODERS)}, got {decoder!r}")
        self.run_dir = Path(run_dir)
        self.loaded = load_run(run_dir, checkpoint, device, "fp32", purpose="captions")
        self.settings = self.loaded.family.settings()
        self.settings.decoder = decoder or self.settings.decoder
        self.settings.beams = beams or self.settings.beams
        self.settings.temperature = temperature or self.settings.temperature

    @property
    def input_size(self) -> int:
        """The size it was trained on (the dataset's resolution): other images are brought to it
        first, then through the tower's own resize, as in training."""
        return self.loaded.family.resolution or self.loaded.model.image_tower.input_size

    def __call__(self, images: torch.Tensor, seeds: list[int]) -> list[str]:
        """Captions of `images`; image i's randomness (when sampling) from seeds[i], so that a caption
        never depends on the batch the image came in."""
        from vgen.evaluate.features import resize_float

        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = resize_float(images, self.input_size, "bicubic", center_crop=True).round().to(torch.uint8)
        return self.loaded.family.caption(self.loaded.model, images, self.settings, seeds)

    def describe(self) -> dict:
        """What a dataset records of the captioner that wrote some of its captions."""
        return {"run": str(self.run_dir.resolve()), "step": self.loaded.step, "ema_sha256": self.loaded.sha256,
                "run_manifest_sha256": self.loaded.run_manifest_sha256, "decoder": self.settings.decoder}
