"""The family seam: what differs between kinds of model, and nothing else.

A family (one file in vgen/families/, one line in FAMILIES) builds its modules, names its
optimisation phases, makes a batch from global sample indices, validates, draws sample grids,
exports, and samples for `vgen generate`. The loop (vgen.train.loop) runs any family's phases and
owns everything they share: precision, compile, DDP, EMA, checkpoints of every module and
optimizer, resume, signals, non-finite steps, metrics and run.yaml. vgen.runs rebuilds any family
for inference from run.yaml; generate and evaluate call `sample` and know no family by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vgen.families.config import OptimConfig

DEFAULT_SAMPLE_PROMPTS = ["a cat and a dog", "a cat above a dog", "two fish", "an apple to the left of a car"]

# What a sampler may support; `vgen generate` refuses a flag whose capability the family lacks.
SAMPLER_OPTIONS = {"steps": "--steps", "sampler": "--sampler", "guidance": "--guidance",
                   "negative_prompt": "--negative", "init_image": "--init-image", "mask": "--mask",
                   "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


def index_chunks(n: int, size: int = 64) -> list[list[int]]:
    """Indices 0 .. n - 1 in chunks of `size`: the batches a family validates its first n images in."""
    return [list(range(start, min(n, start + size))) for start in range(0, n, size)]


# The batch shape at which samplers run their networks and decoders (see in_fixed_batches).
FIXED_BATCH = 16


def in_fixed_batches(fn: Callable[[torch.Tensor], torch.Tensor], n: int, size: int = FIXED_BATCH) -> torch.Tensor:
    """fn(rows) -> the outputs for `rows` (indices into the caller's n inputs), called on exactly
    `size` rows at a time: the last call's rows padded with repeats of its last one, whose outputs
    are dropped. CPU convolutions (oneDNN) choose their algorithm by batch size, so an image decoded
    with 15 others differs from the same image decoded alone (by up to one level of 255); at one
    batch shape a row's output depends on that row alone, so the same seed gives the same pixels
    whatever `--batch-size` the user asked for."""
    outputs = []
    for rows in index_chunks(n, size):
        padded = torch.tensor(rows + rows[-1:] * (size - len(rows)))
        outputs.append(fn(padded)[:len(rows)])
    return torch.cat(outputs)


@dataclass
class Phase:
    """One optimisation phase of a training step: `loss(trained, batch, step) -> (loss, logs)`.

    `module` holds the parameters the phase trains (those that require grad when the family is
    built); the loop gives `loss` that module (DDP-wrapped under torchrun) as `trained`, and turns
    the other phases' parameters off while this one runs. Every phase of a step gets the same batch
    object (make_batch's), in the order of Family.phases(). `logs`: extra scalars (tensors) for
    metrics.jsonl and the progress line, each averaged over the steps of the log window that
    logged it."""

    name: str
    module: nn.Module
    loss: Callable[[nn.Module, dict, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    optim: Any  # vgen.families.config.OptimConfig


@dataclass
class SampleSettings:
    """What `vgen generate` asks of a family's sampler (None: not asked)."""

    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    negative_prompts: list[str] | None = None
    edit: Any = None  # vgen.generate.EditInputs (SDEdit / inpainting), for families that support them
    temperature: float | None = None  # token samplers: the logits' temperature, top-k and top-p filters
    top_k: int | None = None
    top_p: float | None = None


class Family:
    """Base class of the families: defaults for what most of them share."""

    kind: ClassVar[str]
    section: ClassVar[str | None] = None  # the family's config section (e.g. "flow"), or None
    Config: ClassVar[type | None] = None  # its dataclass
    Optim: ClassVar[type] = OptimConfig  # the `optim:` section's dataclass: its defaults are the family's
    uses_text_encoder: ClassVar[bool] = True  # whether the config has a `text_encoder` section
    uses_codec: ClassVar[bool] = False  # whether the config has a `codec` (vgen.codecs): pixels or latents
    supports: ClassVar[frozenset[str]] = frozenset()  # keys of SAMPLER_OPTIONS the sampler takes
    samplers: ClassVar[tuple[str, ...]] = ()  # the values --sampler takes, if it takes one

    model: nn.Module  # the root of every trained module (what model.safetensors holds)

    def __init__(self, cfg, resolution: int, device: torch.device):
        self.cfg, self.device = cfg, device

    # --- training ---
    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def ema_target(self) -> nn.Module:
        """The module whose weights are averaged (ema.safetensors) and sampled from."""
        return self.model

    def shared_modules(self) -> list:
        """Objects the EMA copy must share rather than copy (a frozen text encoder)."""
        shared = getattr(self.ema_target(), "shared_modules", None)
        return shared() if shared else []

    def compile(self) -> None:
        self.model.compile()

    @property
    def matmul_width(self) -> int:
        """A typical matmul width, for the precision fallback that times one (vgen.train.precision)."""
        return 256

    def prepare(self, train_set, val_set, on_main: Callable) -> dict:
        """Work done once before training, on the data (e.g. encoding it to a codec's latents;
        `on_main(work)` runs `work` on the main process only, the others waiting). Returns what it
        measured, recorded at the top level of run.yaml and given back to `restore` at inference."""
        return {}

    def restore(self, recorded: dict, where: str) -> None:
        """Inference: take back what `prepare` recorded (`recorded`: run.yaml; `where`: its path,
        for errors)."""

    def make_batch(self, dataset, order, step: int, indices: list[int]) -> dict:
        raise NotImplementedError

    def validate(self, model, ema, dataset, count: int, autocast) -> dict:
        return {}

    def write_samples(self, ema, path: Path, autocast) -> None:
        pass

    def export(self, run_dir: Path, ema) -> dict:
        return {"format": f"vgen-{self.kind}"}

    # --- inference (vgen.runs, vgen generate) ---
    @classmethod
    def why_no_images(cls, cfg, run_dir: Path) -> str | None:
        """None when a run of this config draws images from prompts (`vgen generate`), else why it
        does not and what to do instead."""
        return None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError(f"{self.kind} runs draw no images")

    def sample_defaults(self) -> dict:
        """Defaults of the SampleSettings it supports, from the run's config (e.g. steps: 20)."""
        return {}

    def sample(self, model, prompts: list[str], seeds: list[int], settings: SampleSettings, autocast,
               device) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] for prompt i with seed i: image i depends on
        (prompt i, seed i, settings) alone, never on the batch it is drawn in."""
        raise NotImplementedError(f"{self.kind} runs draw no images")


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]

