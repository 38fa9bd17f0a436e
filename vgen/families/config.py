"""A run's configuration: the sections every family shares, plus the family's own section.

    kind: flow              which family (vgen.families.FAMILIES)
    text_encoder: ...       the text tower the generator is conditioned on (families that use one)
    codec: pixels           the space the generator is trained in (vgen.codecs; families that use one)
    flow: ...               the family's own section (its `section` and `Config`)
    init: / adapter: / freeze:  start from a run, LoRA adapters, frozen parameters (vgen.adaptation)
    optim: / ema: / train:  the optimiser, the weight average and the loop, shared by all

The schema of a run is built from its family, so a config names only what its family reads and a
new family brings its section with it (no edit here). Read from YAML with `--set a.b=c` overrides
(vgen.config). See configs/*.yaml for annotated examples.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from vgen.config import apply_overrides, bounded, check_bounds, from_dict
from vgen.errors import ConfigError
from vgen.manifest import read_yaml
from vgen.text.sources import TextEncoderConfig

DEFAULT_KIND = "flow"
# Sections that runs of vgen before the family seam recorded for every kind (one schema held them
# all); a recorded config may carry them, and they are dropped when it is read back.
LEGACY_SECTIONS = ("flow", "clip", "text_encoder")


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
class EarlyStoppingConfig:
    """Stop when `metric` (one of the family's validation metrics, e.g. val_loss_ema) has not
    improved by more than `min_delta` for `patience` validations in a row; the best checkpoint is
    kept and marked in run.yaml (`vgen generate --checkpoint best`)."""

    metric: str = "val_loss_ema"
    mode: Literal["min", "max"] = "min"
    patience: int = bounded(3, ge=1)
    min_delta: float = bounded(0.0, ge=0)

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
    early_stopping: EarlyStoppingConfig | None = None  # off by default: the run trains train.steps

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.early_stopping is not None and self.val_images == 0:
            raise ValueError("early_stopping needs validation: train.val_images is 0")


@dataclass
class InitConfig:
    """Start from an earlier run's weights instead of a random initialisation (vgen.adaptation)."""

    # run:RUN_DIR or run:RUN_DIR@STEP, a run of the same kind and network; written `from:` in YAML
    source: str | None = field(default=None, metadata={"key": "from"})
    weights: Literal["ema", "raw"] = "ema"  # the source's averaged (what it samples with) or raw weights


# Globs over the generator's parameter names: every attention projection (self- and cross-attention,
# the text refiner's too) and MLP layer of the flow networks, the GAN generator and the AR transformer.
DEFAULT_ADAPTER_TARGETS = ("*attn.q.weight", "*attn.kv.weight", "*attn.qkv.weight", "*attn.out.weight",
                           "*cross.q.weight", "*cross.kv.weight", "*cross.out.weight", "*mlp.*.weight",
                           "*.gate_up.weight", "*.down.weight")


@dataclass
class AdapterConfig:
    """LoRA (Hu et al. 2021) on the generator's linear projections; the base is `init.from`."""

    type: Literal["lora"] = "lora"
    rank: int = bounded(8, ge=1)
    alpha: float = bounded(8.0, gt=0)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_ADAPTER_TARGETS))

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class FreezeConfig:
    """Parameters that do not train: globs over the model's parameter names, and/or every block of
    the generator's `blocks` but the last `train_last_blocks`."""

    params: list[str] = field(default_factory=list)
    train_last_blocks: int | None = bounded(None, ge=0)

    def __post_init__(self) -> None:
        check_bounds(self)


@functools.cache
def config_class(kind: str) -> type:
    """The dataclass of a `kind` run's config: kind, [text_encoder], [codec], [the family's section], init,
    adapter, freeze, optim, ema, train (in that order, which is the order run.yaml records them in)."""
    from vgen.families import family_class

    family = family_class(kind)
    fields: list[tuple[str, Any, Any]] = [("kind", str, field(default=kind))]
    if family.uses_text_encoder:
        fields.append(("text_encoder", TextEncoderConfig, field(default_factory=TextEncoderConfig)))
    if family.uses_codec:  # pixels | run:VAE_RUN | diffusers:DIR_OR_REPO (vgen.codecs)
        fields.append(("codec", str, field(default="pixels")))
    if family.section:
        fields.append((family.section, family.Config, field(default_factory=family.Config)))
    fields += [("init", InitConfig, field(default_factory=InitConfig)),  # where the weights start (vgen.adaptation)
               ("adapter", AdapterConfig | None, field(default=None)),
               ("freeze", FreezeConfig, field(default_factory=FreezeConfig)),
               ("optim", family.Optim, field(default_factory=family.Optim)),
               ("ema", EmaConfig, field(default_factory=EmaConfig)),
               ("train", LoopConfig, field(default_factory=LoopConfig))]
    return dataclasses.make_dataclass(f"{family.__name__.removesuffix('Family')}TrainConfig", fields)


def _kind(data: dict, source: str, overrides: Sequence[str]) -> str:
    from vgen.families import FAMILIES

    kind = data.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str) or kind not in FAMILIES:
        blamed = next((f"--set {o}" for o in reversed(overrides) if o.partition("=")[0].strip() == "kind"), source)
        raise ConfigError(f"{blamed}: kind: expected one of {', '.join(map(repr, FAMILIES))}, got {kind!r}")
    return kind


def train_config_from_dict(data: dict, *, source: str = "<config>", overrides: Sequence[str] = ()):
    """Build and check the config of a run of `data["kind"]` (default flow)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    kind = _kind(apply_overrides(data, overrides, source=source), source, overrides)
    return from_dict(config_class(kind), data, source=source, overrides=overrides)


def load_train_config(path: str | Path, overrides: Sequence[str] = ()):
    """Read a training config file, apply `--set` overrides and build the checked config."""
    data = read_yaml(path, "config file", ConfigError)
    return train_config_from_dict({} if data is None else data, source=str(Path(path)), overrides=overrides)


def recorded_train_config(data: dict, source: str):
    """The config a run recorded in its run.yaml, read back (sections that older vgen recorded for
    every family, and this family has no use for, are dropped)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: `config` must be a mapping")
    names = {f.name for f in dataclasses.fields(config_class(_kind(data, source, ())))}
    return train_config_from_dict({k: v for k, v in data.items() if k in names or k not in LEGACY_SECTIONS},
                                  source=source)
