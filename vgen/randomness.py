"""Randomness derived from (seed, step, global sample index), never from a running RNG state.

Every random choice of one training sample (which image, which caption, its noise, its timestep,
whether its condition is dropped) comes from a generator seeded by a hash of (seed, purpose, step,
global index). So the same run gives the same numbers however the global batch is split across
processes and however often it was interrupted and resumed (cf. edm2, which reseeds from the image
count on resume).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al. 2014): a cheap, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers into a seed in [0, 2**63) (torch generators take a signed 64-bit seed)."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK64))
    return h >> 1


# Distinct streams so that, e.g., noise and caption choice never share random numbers.
STREAM_ORDER, STREAM_SAMPLE, STREAM_CAPTION, STREAM_VALIDATION = 1, 2, 3, 4
STREAM_TOKENS = 5  # a token sampler's draws at generation (vgen.families.ar_sampling)


def generator(*parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(*parts))
    return g


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """[N, *shape] standard normal noise, row i from a generator seeded by seeds[i] alone (on the
    CPU, so the same seed gives the same noise on every device, whatever the batch)."""
    return torch.stack([torch.randn(shape, generator=generator(seed)) for seed in seeds])


class SampleOrder:
    """Global sample index -> dataset index: a fresh permutation of the dataset each epoch."""

    def __init__(self, seed: int, size: int):
        if size < 1:
            raise ValueError("cannot draw samples from an empty dataset")
        self.seed, self.size = seed, size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, global_index: int) -> int:
        epoch, position = divmod(global_index, self.size)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.size, generator=generator(self.seed, STREAM_ORDER, epoch))
        return int(self._perm[position])
