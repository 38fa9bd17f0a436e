"""Latents of a dataset split, encoded once and cached on disk, so a latent generator's training
steps never run the encoder (what SD trainers call caching latents).

The cache is keyed by the codec's sha256 and the dataset's content hash (vgen.data.dataset): a
retrained VAE or a re-preprocessed dataset never reuses old latents. Files live in
$XDG_CACHE_HOME/vgen/latents (default ~/.cache/vgen/latents), one safetensors file per
(codec, dataset, split), written atomically; an unreadable one is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vgen.atomic import atomic_path
from vgen.codecs.base import Codec
from vgen.grid import images_to_float
from vgen.ui import progress_bar, warn

CACHE_VERSION = 1  # bump when what is cached changes (e.g. the posterior's mean becomes something else)
ENCODE_BATCH = 64


def latent_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vgen" / "latents"


def cache_file(codec: Codec, dataset_sha256: str, split: str, cache_dir: Path | None = None) -> Path:
    key = json.dumps({"version": CACHE_VERSION, "codec_sha256": codec.sha256, "dataset_sha256": dataset_sha256,
                      "split": split})
    return (cache_dir or latent_cache_dir()) / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def _read(path: Path, expected: tuple[int, ...]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        latents = load_file(str(path))["latents"]
    except Exception as e:  # noqa: BLE001 - SafetensorError, KeyError: a damaged file is encoded again
        warn(f"{path}: unreadable latent cache ({type(e).__name__}); encoding again")
        return None
    if tuple(latents.shape) != expected:
        warn(f"{path}: cached latents of shape {tuple(latents.shape)}, expected {expected}; encoding again")
        return None
    return latents


@torch.no_grad()
def encode_split(codec: Codec, dataset, dataset_sha256: str, device, cache_dir: Path | None = None,
                 write: bool = True) -> torch.Tensor:
    """The codec's raw latents [N, C, h, w] (float32, on CPU) of every image of `dataset`, in
    order; read from the cache, or encoded (and, with `write`, cached)."""
    split = getattr(dataset, "split", "train")
    expected = (len(dataset), *codec.latent_shape(dataset.resolution))
    path = cache_file(codec, dataset_sha256, split, cache_dir)
    cached = _read(path, expected)
    if cached is not None:
        return cached
    latents = torch.empty(expected)
    with progress_bar(f"encoding the {split} images with {codec.source}", len(dataset)) as advance:
        for start in range(0, len(dataset), ENCODE_BATCH):
            stop = min(len(dataset), start + ENCODE_BATCH)
            images = torch.stack([dataset.image(i) for i in range(start, stop)])
            latents[start:stop] = codec.encode(images_to_float(images).to(device)).float().cpu()
            advance(stop - start)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"latents": latents}, str(tmp), metadata={
                "codec": codec.source, "codec_sha256": str(codec.sha256), "dataset_sha256": dataset_sha256,
                "split": split})
    return latents
