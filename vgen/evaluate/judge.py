"""The compositional-accuracy judge of the emoji-scenes benchmark (../shared/emoji-scenes.md).

A prompt such as "a cat above a dog" names objects and the boxes they belong in (the spec's TOP and
BOTTOM boxes). The judge crops each box of an image and asks a small object classifier (36 classes)
what is there. Verdicts per image:

- `correct`: every named object is present in the box the prompt gives it ("and": either way round;
  "two cats": a cat in both boxes; "a cat": the centre box), and for left/right/above/below the pair
  is the right way round (`order_correct`). "Present" is a presence test in the manner of GenEval's
  detector threshold (Ghosh et al. 2023): the object is among the classifier's PRESENCE_TOP_K most
  likely of the 36 for that box. A test on the top guess alone would mostly measure the art-style gap
  between the classifier's training images and the dataset's (below); calibration reports how often
  the test accepts the right object in real scenes and how often it accepts a wrong one.
- `order_correct` (left/right/above/below): of the two named objects, is each more likely in the box
  the prompt gives it than in the other one. This relative reading asks only which way round the
  pair is, so it stays reliable for objects the classifier cannot name outright.
- `predicted`: each box's most likely object, for people to read.

The classifier never saw the training images, nor any Noto artwork: it is trained on Twemoji
(`emoji-datasource-twitter`, CC BY 4.0, vgen.evaluate.twemoji), the 36 objects' own emoji plus a few
other Twemoji drawings of the same kinds of object (twemoji.VARIANTS), composed into scenes with the
spec's geometry (a little wider), and augmented towards "another artist": each flat colour region
repainted a little (sometimes in another colour), shading, small rotations and stretches, then hue,
tone, saturation, blur, noise and flips. It is then calibrated on fresh Noto scenes (the dataset's
style; seed 1000003, the dataset's default is 0), and the numbers are stored with it (`calibration`
in judge.yaml), because they say how far to trust it. Measured on Noto crops: the top guess right
in 0.69, the right object within the top 3 in 0.85, a random wrong object within the top 3 in 0.07;
the pair's order right in 0.998 of real scenes, and swapped prompts rejected in all. Twemoji and Noto
draw about ten objects differently enough (rabbit, frog, penguin, strawberry, pizza, horse, cow, cat,
snail, turtle) that even real images of them often fail: read a model's accuracy next to the judge's
accuracy on real scenes (`accepted` in the calibration), and per object (`crop_accuracy_by_object`).

Every image is read at 32 px (the demo model's resolution; other sizes are resized with antialiasing
first), boxes are scaled from the spec's 64 px coordinates, and each crop (box plus a 1 px margin) is
resized to 16x16. Training is deterministic on a given machine (fixed seeds, one thread; bf16 where
the CPU has it natively) and takes about a minute on a CPU; the weights (safetensors) and
`judge.yaml` (Twemoji version, settings, calibration) are cached under a key of this file's source,
the settings and the Twemoji files, so evaluation trains the judge once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vgen.atomic import atomic_directory
from vgen.data import emoji_scenes as es
from vgen.errors import ManifestError, MissingDependencyError, UsageError
from vgen.evaluate.twemoji import TwemojiSet, load_twemoji
from vgen.manifest import read_manifest, sha256_file, write_manifest

JUDGE_VERSION = 2  # bump when a change to this file changes the trained weights
NOUNS: tuple[str, ...] = tuple(o.noun for o in es.OBJECTS)
RESOLUTION = 32  # every image is judged at this size
CROP = 16  # each box is resized to CROP x CROP for the classifier
MARGIN = 1.0  # px at RESOLUTION around each box
PRESENCE_TOP_K = 3  # an object is present in a box when it is among the classifier's 3 likeliest there
CALIBRATION_SEED = 1000003  # Noto scenes for calibration; the dataset's default seed is 0
WEIGHTS_FILE = "judge.safetensors"
MANIFEST_FILE = "judge.yaml"


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


# ---------------------------------------------------------------------------------------------------------
# Crops


def _box_crop(box: es.Box, resolution: int = RESOLUTION) -> tuple[int, int, int, int]:
    """The integer crop (x0, y0, x1, y1) at `resolution` of a box in the spec's 64 px coordinates."""
    s = resolution / es.SIZE
    x0, y0, x1, y1 = box
    return (max(0, math.floor(x0 * s - MARGIN)), max(0, math.floor(y0 * s - MARGIN)),
            min(resolution, math.ceil(x1 * s + MARGIN)), min(resolution, math.ceil(y1 * s + MARGIN)))


def to_judge_resolution(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [N,3,H,W] (square) -> float [N,3,32,32] in [0, 1]."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
        raise UsageError(f"the judge reads uint8 images [N,3,H,W]; got {x.dtype} {tuple(x.shape)}")
    if x.shape[2] != x.shape[3]:
        raise UsageError(f"the judge reads square images; got {x.shape[3]}x{x.shape[2]}")
    x = x.float() / 255.0
    if x.shape[2] != RESOLUTION:
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
    return x


def crop_boxes(images: torch.Tensor, box: es.Box) -> torch.Tensor:
    """float [N,3,32,32] -> the crops of `box` (64 px coordinates), float [N,3,CROP,CROP]."""
    x0, y0, x1, y1 = _box_crop(box, images.shape[-1])
    return F.interpolate(images[:, :, y0:y1, x0:x1], size=(CROP, CROP), mode="bilinear", antialias=True,
                         align_corners=False)


# ---------------------------------------------------------------------------------------------------------
# Network


def _network() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2),  # 16 -> 8
                         *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 8 -> 4
                         *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, len(NOUNS)))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0


# ---------------------------------------------------------------------------------------------------------
# Training data: Twemoji scenes with the spec's geometry


@dataclass(frozen=True)
class _Drawn:
    placement: es.Placement
    variant: int  # which drawing of the object (0: its own emoji; see twemoji.VARIANTS)
    angle: float  # degrees, applied to the glyph before it is fitted to its box
    aspect: float  # width stretch (> 1 wider), applied likewise
    tint_seed: int  # the random palette change and shading of the glyph (_repaint)


class _Glyph:
    """A Twemoji drawing split into its flat colour regions, so each region can be repainted."""

    def __init__(self, image, regions: int = 12):
        from PIL import Image

        rgba = np.asarray(image, dtype=np.float32) / 255.0
        self.rgb, self.alpha = rgba[..., :3], rgba[..., 3:]
        quantized = image.convert("RGB").quantize(colors=regions, method=Image.Quantize.MEDIANCUT)
        _, labels = np.unique(np.asarray(quantized), return_inverse=True)  # only the palette entries in use
        self.labels = labels.reshape(quantized.size[::-1])
        self.regions = int(self.labels.max()) + 1


def _repaint(glyph: _Glyph, settings: JudgeSettings, seed: int):
    """Another artist's palette: every colour region lighter/darker and shifted a little, plus a shading
    gradient across the glyph (flat Twemoji colours vs. other styles' shaded ones)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    gain = np.exp(rng.normal(0.0, settings.region_light, (glyph.regions, 1))).astype(np.float32)
    shift = rng.normal(0.0, settings.region_jitter, (glyph.regions, 3)).astype(np.float32)
    # Sometimes a region or two in another colour altogether (a part another artist paints differently).
    for region in rng.choice(glyph.regions, size=rng.binomial(2, settings.region_swap_p), replace=False):
        gain[region] = 1.0
        shift[region] = rng.uniform(0, 1, 3) - glyph.rgb[glyph.labels == region].mean(0)
    rgb = glyph.rgb * gain[glyph.labels] + shift[glyph.labels]
    h, w = glyph.labels.shape
    theta = rng.uniform(0, 2 * np.pi)
    xs, ys = np.linspace(-0.5, 0.5, w)[None, :], np.linspace(-0.5, 0.5, h)[:, None]
    ramp = np.cos(theta) * xs + np.sin(theta) * ys
    rgb = rgb * (1 + rng.uniform(0, settings.shading) * ramp[..., None]).astype(np.float32)
    out = np.concatenate([np.clip(rgb, 0, 1), glyph.alpha], axis=-1)
    return Image.fromarray(np.round(out * 255).astype(np.uint8), "RGBA")


def _distorted(glyphs: dict, d: _Drawn, settings: JudgeSettings):
    from PIL import Image

    glyph = _repaint(glyphs[d.placement.noun][d.variant], settings, d.tint_seed)
    if d.aspect != 1.0:
        glyph = glyph.resize((max(1, round(glyph.width * d.aspect)), glyph.height), Image.Resampling.BICUBIC)
    if d.angle != 0.0:
        glyph = glyph.rotate(d.angle, Image.Resampling.BICUBIC, expand=True)
        bbox = glyph.getchannel("A").getbbox()
        glyph = glyph.crop(bbox) if bbox else glyph
    return glyph


def _render(glyphs: dict, drawn: Sequence[_Drawn], settings: JudgeSettings):
    """A 64x64 RGB scene on white; each (distorted) glyph placed as emoji_scenes.SceneRenderer.render does."""
    from PIL import Image

    image = Image.new("RGB", (es.SIZE, es.SIZE), (255, 255, 255))
    for d in drawn:
        p = d.placement
        source = _distorted(glyphs, d, settings)
        gw, gh = source.size
        x0, y0, x1, y1 = p.box
        fit = min((x1 - x0) / gw, (y1 - y0) / gh) * p.scale
        w, h = max(1, round(gw * fit)), max(1, round(gh * fit))
        glyph = source.resize((w, h), Image.Resampling.LANCZOS)
        image.paste(glyph, (x0 + (x1 - x0 - w) // 2 + p.dx, y0 + (y1 - y0 - h) // 2 + p.dy), glyph)
    return image


def _training_layout(settings: JudgeSettings, index: int, variants: dict[str, int]) -> tuple[_Drawn, ...]:
    rng = random.Random(f"vgen-judge/{settings.seed}/{index}")
    if rng.random() < settings.single_share:
        nouns, boxes = [rng.choice(NOUNS)], [es.CENTER]
    else:
        nouns = [rng.choice(NOUNS), rng.choice(NOUNS)]  # the same object twice as in "two cats"
        boxes = [es.LEFT, es.RIGHT] if rng.random() < 0.5 else [es.TOP, es.BOTTOM]
    s = settings.max_shift
    return tuple(_Drawn(es.Placement(n, b, rng.uniform(*settings.scale), rng.randint(-s, s),
                                     rng.randint(-s, s)),
                        0 if rng.random() < settings.own_emoji_p else rng.randrange(variants[n]),
                        rng.uniform(-settings.max_angle, settings.max_angle),
                        math.exp(rng.uniform(-settings.max_log_aspect, settings.max_log_aspect)),
                        rng.getrandbits(32))
                 for n, b in zip(nouns, boxes))


def _to32(image) -> torch.Tensor:
    from vgen.data.transforms import center_crop_resize

    return torch.from_numpy(center_crop_resize(image, RESOLUTION))


def _training_crops(glyphs: dict, settings: JudgeSettings, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of the boxes of fresh scenes for `epoch` (float [M,3,CROP,CROP]) and their class indices."""
    images, boxes, labels = [], [], []
    counts = {n: len(v) for n, v in glyphs.items()}
    for index in range(epoch * settings.scenes, (epoch + 1) * settings.scenes):
        drawn = _training_layout(settings, index, counts)
        images.append(_to32(_render(glyphs, drawn, settings)))
        boxes.append([d.placement.box for d in drawn])
        labels.append([NOUNS.index(d.placement.noun) for d in drawn])
    x = torch.stack(images).float() / 255.0
    crops, ys = [], []
    for box in (es.CENTER, es.LEFT, es.RIGHT, es.TOP, es.BOTTOM):
        rows = [(i, lab[k]) for i, (bs, lab) in enumerate(zip(boxes, labels))
                for k, b in enumerate(bs) if b == box]
        if rows:
            crops.append(crop_boxes(x[[i for i, _ in rows]], box))
            ys += [y for _, y in rows]
    return torch.cat(crops), torch.tensor(ys)


_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
_BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).div(16).repeat(3, 1, 1, 1)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _augment(x: torch.Tensor, settings: JudgeSettings, g: torch.Generator) -> torch.Tensor:
    """Colour, blur, noise and flips on float [B,3,H,W] crops in [0, 1], drawn from generator `g`."""
    n = x.shape[0]
    # Hue: rotate colours about the grey axis (white and greys stay put).
    angle = torch.where(torch.rand(n, generator=g) < settings.hue_rotate_p,
                        _uniform(n, 0.0, 2 * math.pi, g),
                        _uniform(n, -2 * math.pi * settings.hue_jitter, 2 * math.pi * settings.hue_jitter, g))
    cos, sin = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3.0)
    rot = cos * torch.eye(3) + (1 - cos) * torch.full((3, 3), 1 / 3) + sin * cross
    x = torch.einsum("bij,bjhw->bihw", rot, x).clamp(0, 1)
    # Per-channel tone curves (gamma) and gains: the two styles' palettes differ in more than hue.
    gamma = torch.exp(settings.gamma_sigma * torch.randn(n, 3, 1, 1, generator=g))
    gain = 1 + settings.channel_gain * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    x = (x.clamp_min(1e-4) ** gamma * gain).clamp(0, 1)
    # Saturation (grayscale with some probability) and brightness.
    gray = (x * _GRAY).sum(1, keepdim=True)
    sat = torch.where(torch.rand(n, generator=g) < settings.grayscale_p, torch.zeros(n),
                      _uniform(n, *settings.saturation, g)).view(n, 1, 1, 1)
    x = gray + sat * (x - gray)
    x = x * _uniform(n, *settings.brightness, g).view(n, 1, 1, 1)
    # Blur (or sharpen, below 0): a random blend with a 3x3 binomial blur.
    amount = torch.where(torch.rand(n, generator=g) < settings.blur_p, _uniform(n, -0.5, 1.0, g),
                         torch.zeros(n))
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _BLUR, groups=3)
    x = torch.lerp(x, blurred, amount.view(n, 1, 1, 1))
    # Noise, and horizontal flips (the two art styles do not always face the same way).
    x = x + _uniform(n, 0.0, settings.noise_std, g).view(n, 1, 1, 1) * torch.randn(x.shape, generator=g)
    flip = torch.rand(n, generator=g) < settings.flip_p
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    return x.clamp(0, 1)


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16: about 3x faster for this network).

    Decided from the hardware, not by timing, so that the same machine always trains the same weights.
    """
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _train_network(twemoji: TwemojiSet, settings: JudgeSettings,
                   log: Callable[[str], None]) -> tuple[nn.Module, str]:
    """The trained classifier (eval mode) and the precision it was trained in."""
    start = time.perf_counter()
    glyphs = {noun: [_Glyph(image) for image in images] for noun, images in twemoji.glyphs().items()}
    use_bf16 = _cpu_has_bf16()
    log(f"judge: training in {'bf16' if use_bf16 else 'fp32'} on CPU")
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    model = _network()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    # Each epoch draws fresh scenes (1 or 2 crops each): count the steps for the schedule first.
    counts = {n: len(v) for n, v in glyphs.items()}
    total_steps = sum(math.ceil(sum(len(_training_layout(settings, i, counts))
                                    for i in range(e * settings.scenes, (e + 1) * settings.scenes))
                                / settings.batch_size) for e in range(settings.epochs))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=total_steps, pct_start=0.15)
    model.train()
    for epoch in range(settings.epochs):
        x, y = _training_crops(glyphs, settings, epoch)
        perm = torch.randperm(len(x), generator=g)
        total = correct = 0
        loss_sum = 0.0
        for k in range(0, len(x), settings.batch_size):
            idx = perm[k:k + settings.batch_size]
            batch = _normalize(_augment(x[idx], settings, g))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(batch)
            loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
            total += len(idx)
        log(f"judge: epoch {epoch + 1}/{settings.epochs} loss {loss_sum / total:.3f} "
            f"train acc {correct / total:.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval(), "bf16" if use_bf16 else "fp32"


# ---------------------------------------------------------------------------------------------------------
# Verdicts


@dataclass(frozen=True)
class Verdict:
    prompt: str
    relation: str
    expected: tuple[str, ...]  # per box, in caption order ("two cats": ("cat", "cat"))
    boxes: tuple[es.Box, ...]  # where the caption puts them ("and": LEFT, RIGHT), 64 px coordinates
    predicted: tuple[str, ...]  # what the judge sees in each box (the most likely of the 36 objects)
    confidence: tuple[float, ...]  # the classifier's probability of each prediction
    present: tuple[bool, ...]  # each box's expected object passes the presence test ("and": the better way round)
    correct: bool  # every object present where the prompt puts it ("and": either way), in order
    # left/right/above/below only: of the two named objects, is each more likely where the prompt puts
    # it than swapped (a relative reading, far more reliable than recognising each object outright)
    order_correct: bool | None
    held_out: bool  # a pair never seen together in training images (pair relations only)


ORDERED_RELATIONS = ("left", "right", "above", "below")


class Judge:
    """The trained classifier and what it is (`info`: id, weights sha256, Twemoji version, calibration)."""

    def __init__(self, model: nn.Module, info: dict[str, Any]):
        self.model = model.eval()
        self.info = info

    @property
    def id(self) -> str:
        return str(self.info["id"])

    @torch.no_grad()
    def probabilities(self, crops: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """float crops [N,3,CROP,CROP] in [0, 1] -> class probabilities [N,36] (NOUNS order)."""
        parts = []
        for k in range(0, len(crops), batch_size):
            x = _normalize(crops[k:k + batch_size])
            # The classifier was trained with horizontal flips: average both views.
            parts.append((F.softmax(self.model(x), 1) + F.softmax(self.model(x.flip(-1)), 1)) / 2)
        return torch.cat(parts) if parts else torch.zeros(0, len(NOUNS))

    def judge(self, images: torch.Tensor | np.ndarray, prompts: Sequence[str]) -> list[Verdict]:
        """Verdicts for uint8 images [N,3,H,W] against their emoji-scenes prompts."""
        if len(images) != len(prompts):
            raise UsageError(f"{len(images)} images but {len(prompts)} prompts")
        parsed = []
        for prompt in prompts:
            try:
                parsed.append(es.parse_caption(prompt))
            except ValueError:
                raise UsageError(f"the emoji-scenes judge cannot read the prompt {prompt!r}: not in the "
                                 "benchmark's caption grammar (../shared/emoji-scenes.md)") from None
        x = to_judge_resolution(images)
        wanted: dict[es.Box, list[int]] = {}
        for i, (relation, _) in enumerate(parsed):
            for box in es._BOXES[relation]:
                wanted.setdefault(box, []).append(i)
        probs: dict[tuple[int, es.Box], torch.Tensor] = {}
        for box, rows in wanted.items():
            for i, p in zip(rows, self.probabilities(crop_boxes(x[rows], box))):
                probs[(i, box)] = p
        verdicts = []
        for i, (prompt, (relation, nouns)) in enumerate(zip(prompts, parsed)):
            boxes = es._BOXES[relation]
            expected = tuple(nouns) * 2 if relation == "two" else tuple(nouns)
            box_probs = [probs[(i, b)] for b in boxes]
            predicted = tuple(NOUNS[int(p.argmax())] for p in box_probs)
            present = _present(box_probs, expected)
            if relation == "and":
                present = max(present, _present(box_probs, expected[::-1]), key=sum)
            order = None
            if relation in ORDERED_RELATIONS:
                a, b = (NOUNS.index(n) for n in nouns)
                p1, p2 = box_probs
                order = bool(p1[a] * p2[b] > p1[b] * p2[a])
            ok = all(present) and order is not False
            held = relation in es.PAIR_RELATIONS and es.is_held_out(*nouns)
            verdicts.append(Verdict(prompt, relation, expected, boxes, predicted,
                                    tuple(round(float(p.max()), 4) for p in box_probs), present, ok, order, held))
        return verdicts


def _present(box_probs: Sequence[torch.Tensor], expected: Sequence[str]) -> tuple[bool, ...]:
    """Is each expected object among the PRESENCE_TOP_K likeliest classes of its box."""
    return tuple(bool((p > p[NOUNS.index(noun)]).sum() < PRESENCE_TOP_K) for p, noun in zip(box_probs, expected))


def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    n = len(flags)
    return {"accuracy": round(sum(flags) / n, 4) if n else None, "correct": int(sum(flags)), "n": n}


def compositional_accuracy(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Accuracy (with counts) per relation, for single objects, for the two-object (pair) relations
    overall, and separately over pairs seen together in training and held-out pairs; and the order
    accuracy of left/right/above/below (Verdict.order_correct), overall and over held-out pairs."""
    by_relation = {r: _rate([v.correct for v in verdicts if v.relation == r])
                   for r in es.RELATIONS if any(v.relation == r for v in verdicts)}
    pairs = [v for v in verdicts if v.relation in es.PAIR_RELATIONS]
    held = [v for v in pairs if v.held_out]
    ordered = [v for v in verdicts if v.order_correct is not None]
    return {
        "by_relation": by_relation,
        "single_object": _rate([v.correct for v in verdicts if v.relation == "single"]),
        "two_object": _rate([v.correct for v in pairs]),
        "two_object_seen_pairs": _rate([v.correct for v in pairs if not v.held_out]),
        "two_object_held_out_pairs": _rate([v.correct for v in held]),
        "held_out_by_relation": {r: _rate([v.correct for v in held if v.relation == r])
                                 for r in es.PAIR_RELATIONS if any(v.relation == r for v in held)},
        "order": _rate([bool(v.order_correct) for v in ordered]),
        "order_held_out_pairs": _rate([bool(v.order_correct) for v in ordered if v.held_out]),
        "order_by_relation": {r: _rate([bool(v.order_correct) for v in ordered if v.relation == r])
                              for r in ORDERED_RELATIONS if any(v.relation == r for v in ordered)},
    }


# ---------------------------------------------------------------------------------------------------------
# Calibration on real Noto scenes


def _held_out_scene(seed: int, index: int) -> es.Scene:
    """A scene of a held-out pair with the spec's geometry (the dataset never draws these)."""
    rng = random.Random(f"vgen-judge/held-out/{seed}/{index}")
    relation = rng.choice(es.PAIR_RELATIONS)
    nouns = rng.choice(es._HELDOUT_PAIRS)
    boxes = es._BOXES[relation]
    if relation == "and" and rng.random() < 0.5:
        boxes = boxes[::-1]
    placements = tuple(es.Placement(n, box, rng.uniform(0.8, 1.0), rng.randint(-3, 3), rng.randint(-3, 3))
                       for n, box in zip(nouns, boxes))
    return es.Scene(index, relation, nouns, es.caption_for(relation, nouns), placements)


def _share(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _with_wrong_object(scene: es.Scene, rng: random.Random) -> str:
    """The scene's caption with one of its objects replaced by a random other object."""
    nouns = list(scene.nouns)
    k = rng.randrange(len(nouns))
    choices = [n for n in NOUNS if n not in nouns and (scene.relation != "two" or n in es._COUNTABLE)]
    nouns[k] = rng.choice(choices)
    return es.caption_for(scene.relation, tuple(nouns))


def _swapped(scene: es.Scene) -> str | None:
    if scene.relation not in ORDERED_RELATIONS:
        return None
    return es.caption_for(scene.relation, scene.nouns[::-1])


def calibrate(judge: Judge, scenes: int = 1000, seed: int = CALIBRATION_SEED,
              renderer: es.SceneRenderer | None = None, held_out_scenes: int | None = None) -> dict[str, Any]:
    """Judge `scenes` fresh Noto scenes (the dataset's own style and geometry, seed `seed`; the dataset's
    default seed is 0) at 32 px against their captions, and against swapped captions: how often the
    judge accepts real, correct images, and rejects them when the prompt has the order reversed."""
    renderer = renderer or es.SceneRenderer()
    specs = [es.scene_spec(seed, i) for i in range(scenes)]
    held_n = max(1, scenes // 3) if held_out_scenes is None else held_out_scenes
    held_specs = [_held_out_scene(seed, i) for i in range(held_n)]
    images = torch.stack([_to32(renderer.render(s)) for s in specs + held_specs])
    verdicts = judge.judge(images, [s.caption for s in specs + held_specs])
    crops_ok: dict[str, list[bool]] = {n: [] for n in NOUNS}
    confusions: Counter = Counter()
    for scene, v in zip(specs + held_specs, verdicts):
        seen = dict(zip(v.boxes, v.predicted))
        for p in scene.placements:
            crops_ok[p.noun].append(seen[p.box] == p.noun)
            if seen[p.box] != p.noun:
                confusions[f"{p.noun} -> {seen[p.box]}"] += 1
    # The presence test on single crops: the right object, and a random wrong one, within the top k.
    rng = random.Random(f"vgen-judge/wrong/{seed}")
    by_box: dict[es.Box, list[tuple[int, str]]] = {}
    for i, scene in enumerate(specs + held_specs):
        for p in scene.placements:
            by_box.setdefault(p.box, []).append((i, p.noun))
    right_in, wrong_in = [], []
    x = to_judge_resolution(images)
    for box, rows in by_box.items():
        probs = judge.probabilities(crop_boxes(x[[i for i, _ in rows]], box))
        for (_, noun), p in zip(rows, probs):
            other = rng.choice([n for n in NOUNS if n != noun])
            right_in.append(_present([p], [noun])[0])
            wrong_in.append(_present([p], [other])[0])
    # Whole prompts with one object replaced by another: how often a wrong prompt is accepted.
    wrong_prompts = [_with_wrong_object(s, rng) for s in specs]
    wrong = judge.judge(images[:scenes], wrong_prompts)
    swap_rows = [i for i, s in enumerate(specs) if _swapped(s) is not None]
    swapped = judge.judge(images[swap_rows], [_swapped(specs[i]) for i in swap_rows])
    acc = compositional_accuracy(verdicts[:scenes])
    held_acc = compositional_accuracy(verdicts[scenes:])
    all_crops = [ok for oks in crops_ok.values() for ok in oks]
    return {
        "style": "Noto Color Emoji (the dataset's style), scenes of the spec's geometry",
        "font": renderer.font_path,
        "seed": seed,
        "scenes": scenes,
        "held_out_pair_scenes": held_n,
        "resolution": RESOLUTION,
        "crop_accuracy": _share(all_crops),  # the top guess is the object
        "crops": len(all_crops),
        "presence_top_k": PRESENCE_TOP_K,
        "crop_present": _share(right_in),  # the object passes the presence test
        "crop_wrong_object_present": _share(wrong_in),  # a random other object passes it
        "scene_accuracy": _share([v.correct for v in verdicts[:scenes]]),
        "by_relation": {r: a["accuracy"] for r, a in acc["by_relation"].items()},
        "two_object": acc["two_object"]["accuracy"],
        "two_object_held_out_pairs": held_acc["two_object"]["accuracy"],
        "order": acc["order"]["accuracy"],
        "order_held_out_pairs": held_acc["order"]["accuracy"],
        "swapped_prompt_rejected": _share([not v.correct for v in swapped]),
        "wrong_object_prompt_rejected": _share([not v.correct for v in wrong]),
        "swapped_prompt_order_rejected": _share([not v.order_correct for v in swapped]),
        "crop_accuracy_by_object": {n: _share(oks) for n, oks in crops_ok.items() if oks},
        "common_confusions": dict(confusions.most_common(8)),
    }


# ---------------------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vgen" / "judge"


def cache_key(settings: JudgeSettings, twemoji: TwemojiSet) -> str:
    # The code is part of the key too: a change to how the judge is trained never reuses old weights.
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    blob = json.dumps({"judge_version": JUDGE_VERSION, "source_sha256": source,
                       "settings": dataclasses.asdict(settings), "twemoji_sha256": twemoji.sha256},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """Tuples as lists, for yaml.safe_dump."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _load_cached(folder: Path) -> Judge:
    from safetensors.torch import load_file

    info = read_manifest(folder / MANIFEST_FILE, "judge", required=("id", "weights.sha256"))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() or sha256_file(weights) != info["weights"]["sha256"]:
        raise ManifestError(f"{weights}: missing or does not match the sha256 in {folder / MANIFEST_FILE}")
    model = _network()
    model.load_state_dict(load_file(weights))
    info["source"] = "cache"
    info["path"] = str(folder)
    return Judge(model, info)


def _calibration_or_reason(judge: Judge, settings: JudgeSettings) -> dict[str, Any]:
    try:
        return calibrate(judge, settings.calibration_scenes)
    except MissingDependencyError as e:  # no Noto font: the judge still works, its trust is unknown
        return {"unavailable": str(e)}


def load_judge(cache_dir: str | os.PathLike | None = None, twemoji_dir: str | os.PathLike | None = None,
               settings: JudgeSettings | None = None, log: Callable[[str], None] | None = None) -> Judge:
    """The judge from the cache, or trained (about a minute on CPU), calibrated and cached first.

    Raises MissingDependencyError when the Twemoji package is not installed.
    """
    from safetensors.torch import save_file

    log = log or (lambda message: None)
    settings = settings or JudgeSettings()
    twemoji = load_twemoji(twemoji_dir)
    key = cache_key(settings, twemoji)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / f"judge-{key[:16]}"
    stale = False
    if (folder / MANIFEST_FILE).is_file():
        try:
            return _load_cached(folder)
        except (ManifestError, OSError, RuntimeError, ValueError) as e:
            log(f"judge: ignoring the cached judge in {folder} ({e}); training again")
            stale = True
    start = time.perf_counter()
    # One thread: this network is too small to gain much from more, and on a shared, busy 2-core
    # machine training with two threads once took 10 min instead of 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, precision = _train_network(twemoji, settings, log)
    finally:
        torch.set_num_threads(threads)
    train_seconds = round(time.perf_counter() - start, 1)
    info: dict[str, Any] = {
        "id": f"emoji-scenes-judge:twemoji-{twemoji.version}:{key[:12]}",
        "judge_version": JUDGE_VERSION,
        "classes": list(NOUNS),
        "trained_on": {"package": "emoji-datasource-twitter", "version": twemoji.version,
                       "license": "CC BY 4.0 (Twemoji graphics)", "files_sha256": twemoji.sha256,
                       "folder": str(twemoji.folder)},
        "input": {"resolution": RESOLUTION, "crop": CROP, "margin_px": MARGIN},
        "settings": _plain(dataclasses.asdict(settings)),
        "train_seconds": train_seconds,
        "torch": {"version": str(torch.__version__), "threads": 1, "precision": precision},
        "cache_key": key,
    }
    judge = Judge(model, info)
    log("judge: calibrating on Noto scenes")
    info["calibration"] = _calibration_or_reason(judge, settings)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    try:
        with atomic_directory(folder, overwrite=stale) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE))
            info["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_file(tmp / WEIGHTS_FILE)}
            write_manifest(tmp / MANIFEST_FILE, "judge", info)
    except FileExistsError:  # another process cached the same judge meanwhile: use that one
        return _load_cached(folder)
    info["source"] = "trained"
    info["path"] = str(folder)
    return judge


def judge_images(images: torch.Tensor | np.ndarray, prompts: Sequence[str], judge: Judge | None = None,
                 cache_dir: str | os.PathLike | None = None) -> list[Verdict]:
    """Verdicts for uint8 images [N,3,H,W] against their prompts (loading or training the judge)."""
    return (judge or load_judge(cache_dir)).judge(images, prompts)
