"""The families of models vgen trains, samples and evaluates (see base.py for the seam).

A new family is one file here and one line in FAMILIES ("module:Class", imported when first used,
so `vgen --help` loads no model code).
"""

from __future__ import annotations

import importlib

from vgen.errors import ConfigError

FAMILIES = {
    "flow": "vgen.families.flow:FlowFamily",  # rectified flow (text-to-image)
    "gan": "vgen.families.gan:GanFamily",  # a text-conditioned GAN, one-step generation
    "vae": "vgen.families.vae:VaeFamily",  # a KL autoencoder: the latent codec, or a conditional VAE generator
    "ar": "vgen.families.ar:ArFamily",  # an autoregressive transformer over a tokenizer's image tokens
    "clip": "vgen.families.clip:ClipFamily",  # contrastive image-text training (a text encoder)
    "captioner": "vgen.families.captioner:CaptionerFamily",  # image -> caption (vgen caption)
}


def family_class(kind: str) -> type:
    if not isinstance(kind, str) or kind not in FAMILIES:
        raise ConfigError(f"kind: expected one of {', '.join(map(repr, FAMILIES))}, got {kind!r}")
    module, _, name = FAMILIES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def build_family(cfg, resolution: int, device):
    """The family of `cfg.kind`, its modules built on `device` (from the current torch seed)."""
    return family_class(cfg.kind)(cfg, resolution, device)
