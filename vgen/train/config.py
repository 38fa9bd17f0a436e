"""The training configuration: one typed tree, read from YAML with `--set a.b=c` overrides.

Every kind shares `optim`, `ema` and `train`; `flow` and `clip` hold the settings of their kind and
are ignored by the other. See configs/*.yaml for annotated examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vgen.config import bounded, check_bounds
from vgen.models.dit import DiTConfig
from vgen.text.sources import TextEncoderConfig

DEFAULT_SAMPLE_PROMPTS = ["a cat and a dog", "a cat above a dog", "two fish", "an apple to the left of a car"]


@dataclass
class OptimConfig:
    lr: float = bounded(3e-4, gt=0)
    betas: tuple[float, float] = bounded((0.9, 0.99), ge=0, lt=1)
    weight_decay: float = bounded(0.0, ge=0)
    eps: float = bounded(1e-8, gt=0)
    warmup_steps: int = bounded(100, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    grad_clip: float = bounded(1.0, gt=0)

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class EmaConfig:
    decay: float = bounded(0.999, ge=0, lt=1)
    warmup: bool = True

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class LoopConfig:
    steps: int = bounded(1000, ge=0)  # 0: the untrained network as checkpoint 0, a baseline for `vgen evaluate`
    batch_size: int = bounded(64, ge=1)  # the global batch, split evenly across torchrun processes
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 on CUDA when supported, and on CPUs with AMX or AVX512-BF16 (vgen.train.precision)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    log_every: int = bounded(10, ge=1)
    checkpoint_every: int = bounded(500, ge=1)
    keep_checkpoints: int = bounded(3, ge=0)  # 0: keep every checkpoint
    sample_every: int = bounded(1000, ge=1)
    val_every: int = bounded(500, ge=1)
    val_images: int = bounded(256, ge=0)
    max_nonfinite: int = bounded(20, ge=0)  # skipped steps with a non-finite loss before the run stops

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class FlowConfig:
    network: DiTConfig = field(default_factory=DiTConfig)
    # share of samples trained unconditionally, for classifier-free guidance
    cond_dropout: float = bounded(0.1, ge=0, lt=1)
    logit_mean: float = 0.0
    logit_std: float = bounded(1.0, gt=0)
    sample_steps: int = bounded(20, ge=1)
    sample_guidance: float = bounded(3.0, ge=0)  # 1: no guidance
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_seeds: int = bounded(4, ge=1)  # images per prompt in the sample grids

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class ClipConfig:
    """A small open_clip CLIP: ViT image tower, transformer text tower, the standard tokenizer."""

    embed_dim: int = bounded(128, ge=1)
    patch_size: int = bounded(4, ge=1)
    vision_width: int = bounded(128, ge=1)
    vision_layers: int = bounded(4, ge=1)
    vision_head_width: int = bounded(32, ge=1)
    text_width: int = bounded(128, ge=1)
    text_layers: int = bounded(4, ge=1)
    text_heads: int = bounded(4, ge=1)
    context_length: int = bounded(32, ge=2)
    # NegCLIP-style hard negatives (Yuksekgonul et al. 2023): each caption with two of its content
    # words swapped ("a dog above a cat" for "a cat above a dog") is an extra negative text for its
    # image, pushing the text tower to encode word order. Off by default until it pays for its 20%
    # longer steps: on emoji scenes (clip-tiny, 250 steps) it raised val_word_order_accuracy from
    # 0.67 to 0.79, but preferring "a cat above a dog" over "a dog above a cat" only from 0.48 to 0.54.
    hard_negatives: bool = False

    def __post_init__(self) -> None:
        check_bounds(self)

    def model_cfg(self, image_size: int) -> dict:
        """The open_clip model config (the `model_cfg` of open_clip_config.json)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": image_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "patch_size": self.patch_size,
                "head_width": self.vision_head_width,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


@dataclass
class TrainConfig:
    kind: Literal["flow", "clip"] = "flow"
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
