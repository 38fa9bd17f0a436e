"""The judge's training data: Twemoji drawings, repainted as another artist might, composed into
scenes with the spec's geometry (a little wider), and the crops of their boxes."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vgen.data import emoji_scenes as es
from vgen.evaluate.judge.geometry import crop_boxes, to_resolution
from vgen.evaluate.judge.settings import NOUNS, JudgeSettings


@dataclass(frozen=True)
class _Drawn:
    placement: es.Placement
    variant: int  # which drawing of the object (0: its own emoji; see twemoji.VARIANTS)
    angle: float  # degrees, applied to the glyph before it is fitted to its box
    aspect: float  # width stretch (> 1 wider), applied likewise
    tint_seed: int  # the random palette change and shading of the glyph (_repaint)


class Glyph:
    """A Twemoji drawing split into its flat colour regions, so each region can be repainted."""

    def __init__(self, image, regions: int = 12):
        from PIL import Image

        rgba = np.asarray(image, dtype=np.float32) / 255.0
        self.rgb, self.alpha = rgba[..., :3], rgba[..., 3:]
        quantized = image.convert("RGB").quantize(colors=regions, method=Image.Quantize.MEDIANCUT)
        _, labels = np.unique(np.asarray(quantized), return_inverse=True)  # only the palette entries in use
        self.labels = labels.reshape(quantized.size[::-1])
        self.regions = int(self.labels.max()) + 1


def _repaint(glyph: Glyph, settings: JudgeSettings, seed: int):
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


def training_layout(settings: JudgeSettings, index: int, variants: dict[str, int]) -> tuple[_Drawn, ...]:
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


def training_crops(glyphs: dict, settings: JudgeSettings, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of the boxes of fresh scenes for `epoch` (float [M,3,CROP,CROP]) and their class indices."""
    images, boxes, labels = [], [], []
    counts = {n: len(v) for n, v in glyphs.items()}
    for index in range(epoch * settings.scenes, (epoch + 1) * settings.scenes):
        drawn = training_layout(settings, index, counts)
        images.append(to_resolution(_render(glyphs, drawn, settings)))
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
