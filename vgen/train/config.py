"""The training configuration: one typed tree, read from YAML with `--set a.b=c` overrides.

Every kind shares `optim`, `ema` and `train`; `flow` and `clip` hold the settings of their kind and
are ignored by the other. See configs/*.yaml for annotated examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vgen.models.dit import DiTConfig
from vgen.text.sources import TextEncoderConfig

DEFAULT_SAMPLE_PROMPTS = ["a cat and a dog", "a cat above a dog", "two fish", "an apple to the left of a car"]


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class EmaConfig:
    decay: float = 0.999
    warmup: bool = True


@dataclass
class LoopConfig:
    steps: int = 1000
    batch_size: int = 64  # the global batch, split evenly across torchrun processes
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA; on CPU if it measures faster
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 1000
    val_every: int = 500
    val_images: int = 256
    max_nonfinite: int = 20  # skipped steps with a non-finite loss before the run stops

    def __post_init__(self) -> None:
        if self.steps < 0:  # 0: the untrained network as checkpoint 0, a baseline for `vgen evaluate`
            raise ValueError(f"steps must be at least 0, got {self.steps}")
        for name in ("batch_size", "log_every", "checkpoint_every", "sample_every", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class FlowConfig:
    network: DiTConfig = field(default_factory=DiTConfig)
    cond_dropout: float = 0.1  # share of samples trained unconditionally, for classifier-free guidance
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sample_steps: int = 20
    sample_guidance: float = 3.0
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_seeds: int = 4  # images per prompt in the sample grids


@dataclass
class ClipConfig:
    """A small open_clip CLIP: ViT image tower, transformer text tower, the standard tokenizer."""

    embed_dim: int = 128
    patch_size: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 32
    # NegCLIP-style hard negatives (Yuksekgonul et al. 2023): each caption with two of its content
    # words swapped ("a dog above a cat" for "a cat above a dog") is an extra negative text for its
    # image, pushing the text tower to encode word order. Off by default until it pays for its 20%
    # longer steps: on emoji scenes (clip-tiny, 250 steps) it raised val_word_order_accuracy from
    # 0.67 to 0.79, but preferring "a cat above a dog" over "a dog above a cat" only from 0.48 to 0.54.
    hard_negatives: bool = False

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
