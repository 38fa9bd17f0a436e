"""A codec (encode images to a latent grid, decode back) and the model space built on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PIXELS = "pixels"


class Codec:
    """encode(x [N, C, H, W] in [-1, 1]) -> z [N, channels, H / factor, W / factor]; decode(z) -> x.

    Deterministic: a latent codec encodes to its posterior's mean (what latent-diffusion's and
    SD's trainers cache), so a cached training set is the same on every read."""

    source: str  # what the config named, e.g. run:demo/vae
    sha256: str | None  # of the weights it loaded (None: pixels)
    channels: int
    factor: int  # image px per latent px
    quantizer = None  # a discrete codec's vgen.models.quantize.FSQ (token ids <-> latents), else None

    @property
    def is_pixels(self) -> bool:
        return self.factor == 1 and self.sha256 is None

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.factor:
            raise ValueError(f"{resolution} px is not a multiple of the codec's downsampling factor {self.factor}")
        return self.channels, resolution // self.factor, resolution // self.factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_to_latent(self, mask: torch.Tensor) -> torch.Tensor:
        """A regenerate-mask [..., 1, H, W] (1 = regenerate) on the latent grid: a latent cell is
        regenerated when any pixel it covers is (max pooling), since each cell decodes to all of them."""
        if self.factor == 1:
            return mask
        shape = mask.shape
        pooled = F.max_pool2d(mask.reshape(-1, 1, *shape[-2:]).float(), self.factor)
        return pooled.reshape(*shape[:-2], *pooled.shape[-2:])

    def describe(self) -> dict:
        out = {"source": self.source, "sha256": self.sha256, "channels": self.channels, "factor": self.factor}
        if self.quantizer is not None:
            out["codebook_size"] = self.quantizer.codebook_size
        return out


class PixelCodec(Codec):
    """`codec: pixels`: the images themselves."""

    def __init__(self, channels: int = 3):
        self.source, self.sha256, self.channels, self.factor = PIXELS, None, channels, 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


@dataclass
class ModelSpace:
    """What a generator is trained in: a codec's latents standardized as z' = (z - shift) * scale.

    The standardization puts the data at unit scale, where the noise schedules of diffusion and
    flow are designed to work: SD's scale 0.18215 is 1 / std of its VAE's latents, measured on a
    batch of training images (Rombach et al. 2022, sec. 4.3.2 and app. G); SD3 and FLUX add a
    shift. Here both are measured on the training set's latents (`measure`). Pixels pass through
    untouched (shift 0, scale 1, no arithmetic)."""

    codec: Codec
    shift: float = 0.0
    scale: float = 1.0

    @staticmethod
    def measure(latents: torch.Tensor) -> tuple[float, float]:
        """(shift, scale): the mean and 1 / std of every value of `latents`, in float64."""
        values = latents.double()
        return float(values.mean()), float(1.0 / values.std().clamp_min(1e-12))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardize(self.codec.encode(x))

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.codec.is_pixels else (z - self.shift) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(z if self.codec.is_pixels else z / self.scale + self.shift)

    def describe(self) -> dict:
        return {**self.codec.describe(), "shift": self.shift, "scale": self.scale}
