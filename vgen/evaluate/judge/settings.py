"""What the judge reads and how it is trained: the input geometry and JudgeSettings."""

from __future__ import annotations

from dataclasses import dataclass

from vgen.data import emoji_scenes as es

NOUNS: tuple[str, ...] = tuple(o.noun for o in es.OBJECTS)
RESOLUTION = 32  # every image is judged at this size
CROP = 16  # each box is resized to CROP x CROP for the classifier
MARGIN = 1.0  # px at RESOLUTION around each box


@dataclass(frozen=True)
class JudgeSettings:
    """What the judge is trained on and how; part of the cache key."""

    scenes: int = 2500  # Twemoji training scenes per epoch (about 1.7 crops each)
    single_share: float = 0.3  # the rest are two-object scenes (side by side or stacked)
    scale: tuple[float, float] = (0.75, 1.0)  # the spec's is [0.8, 1]; a little wider for generated images
    max_shift: int = 4  # px at 64; the spec's is 3
    own_emoji_p: float = 0.5  # otherwise any Twemoji drawing of the object (twemoji.VARIANTS)
    region_jitter: float = 0.08  # each colour region's RGB shifted by N(0, this)
    region_light: float = 0.12  # and scaled by exp(N(0, this))
    region_swap_p: float = 0.25  # each of two regions of a glyph in a random colour
    shading: float = 0.3  # a linear shading gradient of at most this strength
    max_angle: float = 12.0  # degrees: each glyph is rotated, and stretched, a little (other artists draw
    max_log_aspect: float = 0.15  # each object a little differently)
    epochs: int = 8  # each of `scenes` fresh scenes
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    hue_rotate_p: float = 0.3  # a random hue (colours differ between art styles)
    hue_jitter: float = 0.08  # otherwise a hue shift of at most this many turns
    gamma_sigma: float = 0.3  # per-channel gamma exp(N(0, sigma))
    channel_gain: float = 0.1  # per-channel gain 1 +- this
    grayscale_p: float = 0.1
    saturation: tuple[float, float] = (0.6, 1.3)
    brightness: tuple[float, float] = (0.85, 1.1)
    blur_p: float = 0.5
    noise_std: float = 0.08  # at most, on [0, 1] pixels
    flip_p: float = 0.5
    seed: int = 0
    calibration_scenes: int = 1000

