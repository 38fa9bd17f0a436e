"""The codec seam: the boundary between pixels and the space a generator is trained in (edm2's
`Encoder`; latent diffusion, Rombach et al. 2022, arXiv:2112.10752), chosen by `codec:` in a config.

    codec: pixels                   images in [-1, 1] as they are (the default)
    codec: run:VAE_RUN[@STEP]       a vgen `vae` run's encoder (posterior mean) and decoder, EMA weights
    codec: diffusers:DIR_OR_REPO    a pretrained AutoencoderKL (e.g. SD's VAE) loaded with diffusers
                                    from a local directory or the Hugging Face cache, never downloaded

A generator never sees a codec's raw latents but `ModelSpace`'s standardized ones, (z - shift) *
scale, with shift and scale measured on the training set (vgen.codecs.cache) and recorded in
run.yaml.
"""

from __future__ import annotations

import torch

from vgen.codecs.base import PIXELS, Codec, ModelSpace, PixelCodec
from vgen.errors import ConfigError

RUN_PREFIX = "run:"
DIFFUSERS_PREFIX = "diffusers:"
SOURCE_PREFIXES = (RUN_PREFIX, DIFFUSERS_PREFIX)
REPO_ID_PREFIXES = (DIFFUSERS_PREFIX,)  # what may follow these is a hub repo id when no such path exists


def load_codec(source: str, channels: int, device: str | torch.device = "cpu") -> Codec:
    """The codec `source` names (`codec:` of a config), on `device`, in eval mode and frozen.
    `channels`: the images' channels (what `pixels` passes through)."""
    if source == PIXELS:
        return PixelCodec(channels)
    if source.startswith(RUN_PREFIX):
        from vgen.codecs.vae_run import VaeRunCodec

        return VaeRunCodec.load(source, device)
    if source.startswith(DIFFUSERS_PREFIX):
        from vgen.codecs.diffusers import DiffusersCodec

        return DiffusersCodec.load(source, device)
    raise ConfigError(f"codec: expected {PIXELS!r}, '{RUN_PREFIX}VAE_RUN_DIR' (a vgen vae run) or "
                      f"'{DIFFUSERS_PREFIX}DIR_OR_REPO' (a pretrained AutoencoderKL), got {source!r}")


__all__ = ["Codec", "ModelSpace", "PixelCodec", "PIXELS", "SOURCE_PREFIXES", "load_codec"]
