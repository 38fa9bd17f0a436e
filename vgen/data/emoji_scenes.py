"""The emoji-scenes benchmark: vgen's embedded default dataset and its compositional test set.

Implements ../shared/emoji-scenes.md exactly (objects, caption grammar, relation shares, boxes,
held-out pairs). Every scene is a pure function of (seed, index), so a dataset of any size can be
regenerated bit for bit, and the caption grammar is invertible so evaluation can read prompts back.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from vgen.atomic import atomic_directory, atomic_write_text
from vgen.errors import MissingDependencyError, UsageError
from vgen.manifest import write_manifest
from vgen.outputs import claim_output_dir

FONT_PACKAGE = "fonts-noto-color-emoji"
DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the only size of Noto Color Emoji's bitmap strike; other sizes fail to load
SIZE = 64


@dataclass(frozen=True)
class EmojiObject:
    noun: str
    emoji: str
    plural: str | None  # None: never appears in "two" (grapes is already plural)
    phrase: str  # the noun with its article: "a cat", "an apple", "some grapes"


def _obj(noun: str, emoji: str, plural: str | None = "", article: str = "a") -> EmojiObject:
    return EmojiObject(noun, emoji, noun + "s" if plural == "" else plural, f"{article} {noun}")


# In the spec's table order (column by column).
OBJECTS: tuple[EmojiObject, ...] = (
    _obj("cat", "\U0001f408"), _obj("dog", "\U0001f415"), _obj("rabbit", "\U0001f407"),
    _obj("pig", "\U0001f416"), _obj("cow", "\U0001f404"), _obj("horse", "\U0001f40e"),
    _obj("frog", "\U0001f438"), _obj("monkey", "\U0001f412"), _obj("chicken", "\U0001f414"),
    _obj("penguin", "\U0001f427"), _obj("pizza", "\U0001f355"),
    _obj("umbrella", "\u2602\ufe0f", article="an"),
    _obj("bird", "\U0001f426"), _obj("fish", "\U0001f41f", "fish"), _obj("turtle", "\U0001f422"),
    _obj("snail", "\U0001f40c"), _obj("butterfly", "\U0001f98b", "butterflies"),
    _obj("apple", "\U0001f34e", article="an"), _obj("banana", "\U0001f34c"),
    _obj("grapes", "\U0001f347", None, "some"), _obj("strawberry", "\U0001f353", "strawberries"),
    _obj("carrot", "\U0001f955"), _obj("house", "\U0001f3e0"), _obj("guitar", "\U0001f3b8"),
    _obj("tree", "\U0001f333"), _obj("sunflower", "\U0001f33b"), _obj("cactus", "\U0001f335", "cacti"),
    _obj("mushroom", "\U0001f344"), _obj("sun", "\u2600\ufe0f"), _obj("cloud", "\u2601\ufe0f"),
    _obj("car", "\U0001f697"), _obj("bicycle", "\U0001f6b2"), _obj("bus", "\U0001f68c", "buses"),
    _obj("airplane", "\u2708\ufe0f", article="an"), _obj("sailboat", "\u26f5"), _obj("soccer ball", "\u26bd"),
)
OBJECT_BY_NOUN: dict[str, EmojiObject] = {o.noun: o for o in OBJECTS}
# Objects outside the 36, for teaching a trained model something new (`vgen data emoji-scenes
# --objects`, bench/finetune.py): never in the default dataset nor in the benchmark.
NEW_OBJECTS: tuple[EmojiObject, ...] = (
    _obj("rocket", "\U0001f680"), _obj("star", "\u2b50"), _obj("robot", "\U0001f916"), _obj("ghost", "\U0001f47b"),
    _obj("lemon", "\U0001f34b"), _obj("tomato", "\U0001f345"),
)
NEW_OBJECT_BY_NOUN: dict[str, EmojiObject] = {o.noun: o for o in NEW_OBJECTS}

RELATIONS = MappingProxyType(
    {"single": 0.20, "and": 0.20, "left": 0.125, "right": 0.125, "above": 0.125, "below": 0.125, "two": 0.10}
)
PAIR_RELATIONS = ("and", "left", "right", "above", "below")
_SEPARATORS = {"and": " and ", "left": " to the left of ", "right": " to the right of ",
               "above": " above ", "below": " below "}

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
CENTER: Box = (12, 12, 52, 52)
LEFT: Box = (2, 17, 31, 46)
RIGHT: Box = (33, 17, 62, 46)
TOP: Box = (17, 2, 46, 31)
BOTTOM: Box = (17, 33, 46, 62)
# Boxes of the caption's first and second noun, per relation ("and" may swap them at random).
BOXES: dict[str, tuple[Box, ...]] = {"single": (CENTER,), "and": (LEFT, RIGHT), "left": (LEFT, RIGHT),
                                      "right": (RIGHT, LEFT), "above": (TOP, BOTTOM),
                                      "below": (BOTTOM, TOP), "two": (LEFT, RIGHT)}


def is_held_out(a: str, b: str) -> bool:
    """Whether the unordered pair {a, b} never appears together in training images (spec)."""
    key = f"{min(a, b)}|{max(a, b)}".encode()
    return int(hashlib.sha256(key).hexdigest(), 16) % 10 == 0


# Ordered pairs of different objects, split once so sampling never needs rejection.
TRAIN_PAIRS = tuple((a.noun, b.noun) for a in OBJECTS for b in OBJECTS
                     if a is not b and not is_held_out(a.noun, b.noun))
HELDOUT_PAIRS = tuple((a.noun, b.noun) for a in OBJECTS for b in OBJECTS
                       if a is not b and is_held_out(a.noun, b.noun))
COUNTABLE = tuple(o.noun for o in OBJECTS if o.plural is not None)


@dataclass(frozen=True)
class Placement:
    noun: str
    box: Box
    scale: float  # extra factor in [0.8, 1.0] on top of fitting the box
    dx: int
    dy: int


@dataclass(frozen=True)
class Scene:
    index: int
    relation: str
    nouns: tuple[str, ...]  # in caption order; ("cat",) for "two cats"
    caption: str
    placements: tuple[Placement, ...]


def caption_for(relation: str, nouns: Sequence[str]) -> str:
    """The caption of `relation` over `nouns` (caption order); ValueError outside the grammar."""
    try:
        objs = [OBJECT_BY_NOUN.get(n) or NEW_OBJECT_BY_NOUN[n] for n in nouns]
    except KeyError as e:
        raise ValueError(f"unknown noun {e.args[0]!r}") from None
    if relation in ("single", "two") and len(objs) == 1:
        if relation == "single":
            return objs[0].phrase
        if objs[0].plural is None:
            raise ValueError(f"{objs[0].noun!r} has no plural and never appears in 'two'")
        return f"two {objs[0].plural}"
    if relation in _SEPARATORS and len(objs) == 2 and objs[0] is not objs[1]:
        return objs[0].phrase + _SEPARATORS[relation] + objs[1].phrase
    raise ValueError(f"no caption for relation {relation!r} with nouns {tuple(nouns)!r}")


_BY_PHRASE = {o.phrase: o.noun for o in OBJECTS}
_BY_PLURAL = {o.plural: o.noun for o in OBJECTS if o.plural is not None}


def parse_caption(caption: str) -> tuple[str, tuple[str, ...]]:
    """Inverse of caption_for: "a cat above a dog" -> ("above", ("cat", "dog"))."""
    text = caption.strip()
    if text in _BY_PHRASE:
        return "single", (_BY_PHRASE[text],)
    if text.startswith("two ") and text[4:] in _BY_PLURAL:
        return "two", (_BY_PLURAL[text[4:]],)
    for relation, sep in _SEPARATORS.items():
        first, found, second = text.partition(sep)
        a, b = _BY_PHRASE.get(first), _BY_PHRASE.get(second)
        if found and a and b and a != b:
            return relation, (a, b)
    raise ValueError(f"not an emoji-scenes caption: {caption!r}")


def scene_spec(seed: int, index: int) -> Scene:
    """Scene number `index` of the dataset with `seed`: a pure function of both."""
    # A string seed is hashed with SHA-512 by `random`, so it does not depend on PYTHONHASHSEED.
    rng = random.Random(f"emoji-scenes/{seed}/{index}")
    u, relation = rng.random(), "two"
    for name, share in RELATIONS.items():
        if u < share:
            relation = name
            break
        u -= share
    if relation == "single":
        nouns: tuple[str, ...] = (rng.choice(OBJECTS).noun,)
    elif relation == "two":
        nouns = (rng.choice(COUNTABLE),)
    else:
        nouns = rng.choice(TRAIN_PAIRS)
    return _placed(rng, index, relation, nouns)


def _placed(rng: random.Random, index: int, relation: str, nouns: tuple[str, ...]) -> Scene:
    boxes = BOXES[relation]
    if relation == "and" and rng.random() < 0.5:
        boxes = boxes[::-1]
    drawn = nouns * 2 if relation == "two" else nouns
    placements = tuple(Placement(n, box, rng.uniform(0.8, 1.0), rng.randint(-3, 3), rng.randint(-3, 3))
                       for n, box in zip(drawn, boxes))
    return Scene(index, relation, nouns, caption_for(relation, nouns), placements)


def new_object_scene_spec(seed: int, index: int, new_nouns: Sequence[str], share: float = 1.0) -> Scene:
    """Scene `index` of a folder that teaches the NEW_OBJECTS `new_nouns`: with probability `share`
    one of them in the scene (alone, two of it, or with one of the 36 in a random relation and
    order), else the default dataset's scene `index` (replay of what the model knew: prior
    preservation, as DreamBooth's class images). Its own random stream, so the replayed scenes
    are exactly scene_spec's."""
    rng = random.Random(f"emoji-scenes-new/{seed}/{index}")
    if rng.random() >= share:
        return scene_spec(seed, index)
    new = rng.choice(list(new_nouns))
    relation = rng.choices(list(RELATIONS), weights=list(RELATIONS.values()))[0]
    if relation in ("single", "two"):
        nouns: tuple[str, ...] = (new,)
    else:
        old = rng.choice(OBJECTS).noun
        nouns = (new, old) if rng.random() < 0.5 else (old, new)
    return _placed(rng, index, relation, nouns)


def _find_font(font_path: str | None) -> str:
    candidates = ((font_path, "the font path given"), (os.environ.get("VGEN_EMOJI_FONT"), "VGEN_EMOJI_FONT"))
    for path, origin in candidates:
        if path:
            if not Path(path).is_file():
                raise MissingDependencyError(
                    f"emoji font not found: {path} (from {origin}); install the Debian package "
                    f"{FONT_PACKAGE} (sudo apt-get install -y {FONT_PACKAGE}) or point VGEN_EMOJI_FONT at "
                    "NotoColorEmoji.ttf")
            return path
    if Path(DEFAULT_FONT).is_file():
        return DEFAULT_FONT
    if shutil.which("fc-match"):
        try:
            found = subprocess.run(["fc-match", "-f", "%{file}", "Noto Color Emoji"], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = ""
        # fc-match always answers with some font; only an emoji font will do.
        if found and "emoji" in Path(found).name.lower() and Path(found).is_file():
            return found
    raise MissingDependencyError(
        f"the Noto Color Emoji font is not installed (looked for {DEFAULT_FONT} and asked fc-match); "
        f"install it with: sudo apt-get install -y {FONT_PACKAGE}  (or set VGEN_EMOJI_FONT to its path)")


class SceneRenderer:
    """Draws Scenes at 64x64 from the emoji font; each glyph is rasterised once and cached."""

    def __init__(self, font_path: str | None = None, new_nouns: Sequence[str] = ()):
        from PIL import Image, ImageDraw, ImageFont, features

        path = _find_font(font_path)
        if not features.check("raqm"):
            raise MissingDependencyError(
                "Pillow's raqm text layout is unavailable, so emoji such as U+2600 U+FE0F would render as "
                "two glyphs; install the Debian packages: sudo apt-get install -y libraqm0 libfribidi0")
        try:
            font = ImageFont.truetype(path, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
        except OSError as e:
            raise MissingDependencyError(
                f"cannot load emoji font {path}: {e}; install the Debian package {FONT_PACKAGE}") from e
        self.font_path = path
        self._glyphs: dict[str, Image.Image] = {}
        self._sized: dict[tuple[str, int, int], Image.Image] = {}
        advance = font.getlength(OBJECT_BY_NOUN["cat"].emoji)  # one glyph, whatever the layout engine
        for obj in (*OBJECTS, *(NEW_OBJECT_BY_NOUN[n] for n in new_nouns)):
            # Without shaping, VS16 (U+FE0F) sequences come out as the glyph plus a second advance.
            if font.getlength(obj.emoji) > 1.25 * advance:
                raise MissingDependencyError(
                    f"the emoji for {obj.noun!r} renders as more than one glyph: Pillow's raqm layout "
                    "(libraqm0 libfribidi0) is needed to shape emoji variation sequences")
            x0, y0, x1, y1 = font.getbbox(obj.emoji)
            canvas = Image.new("RGBA", (x1 + 4, y1 + 4), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), obj.emoji, font=font, embedded_color=True)
            bbox = canvas.getchannel("A").getbbox()
            if bbox is None:
                raise MissingDependencyError(f"the font {path} has no glyph for {obj.noun!r}; "
                                             f"install the Debian package {FONT_PACKAGE}")
            self._glyphs[obj.noun] = canvas.crop(bbox)

    def glyph(self, noun: str):
        """The cropped full-size RGBA glyph of `noun`."""
        return self._glyphs[noun]

    def _sized_glyph(self, noun: str, w: int, h: int):
        key = (noun, w, h)
        if key not in self._sized:
            from PIL import Image

            # Pillow resizes RGBA in premultiplied alpha, so edges do not pick up dark fringes.
            self._sized[key] = self._glyphs[noun].resize((w, h), Image.Resampling.LANCZOS)
        return self._sized[key]

    def render(self, scene: Scene):
        """The RGB 64x64 image of `scene` on a white background."""
        from PIL import Image

        image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
        for p in scene.placements:
            gw, gh = self._glyphs[p.noun].size
            x0, y0, x1, y1 = p.box
            fit = min((x1 - x0) / gw, (y1 - y0) / gh) * p.scale
            w, h = max(1, round(gw * fit)), max(1, round(gh * fit))
            glyph = self._sized_glyph(p.noun, w, h)
            at = (x0 + (x1 - x0 - w) // 2 + p.dx, y0 + (y1 - y0 - h) // 2 + p.dy)
            image.paste(glyph, at, glyph)  # the glyph's own alpha as the mask
        return image


SCENES_MANIFEST = ".emoji-scenes.yaml"  # hidden: preprocess skips it, so a raw folder stays images + captions


def write_emoji_scenes(out_dir: str | os.PathLike, count: int, seed: int = 0, overwrite: bool = False,
                       progress: Callable[[int], None] | None = None,
                       warn: Callable[[str], None] | None = None, new_objects: Sequence[str] = (),
                       new_share: float = 1.0) -> dict:
    """Write scenes 0..count-1 as `NNNNNN.png` + `NNNNNN.txt` (caption) into `out_dir`, atomically,
    with a small manifest (.emoji-scenes.yaml) so that `overwrite` replaces only such a folder.
    `new_objects` (NEW_OBJECTS nouns): scenes that teach them (new_object_scene_spec)."""
    out_dir = Path(out_dir)
    if count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    unknown = [n for n in new_objects if n not in NEW_OBJECT_BY_NOUN]
    if unknown:
        raise UsageError(f"--objects: {', '.join(map(repr, unknown))} is not one of the new objects "
                         f"({', '.join(NEW_OBJECT_BY_NOUN)}); the 36 of the default dataset are in every folder")
    if not 0 < new_share <= 1:
        raise UsageError(f"--objects-share: expected 0 < share <= 1, got {new_share}")

    def spec(index: int) -> Scene:
        return new_object_scene_spec(seed, index, new_objects, new_share) if new_objects else scene_spec(seed, index)

    with claim_output_dir(out_dir, SCENES_MANIFEST, "emoji-scenes", overwrite, option="OUT_DIR", warn=warn):
        # before creating anything, so a missing font leaves no partial folder
        renderer = SceneRenderer(new_nouns=new_objects)
        width = max(6, len(str(count - 1)))
        counts = dict.fromkeys(RELATIONS, 0)
        pending = 0
        with atomic_directory(out_dir, overwrite=True) as tmp:
            for index in range(count):
                scene = spec(index)
                counts[scene.relation] += 1
                stem = tmp / f"{index:0{width}d}"
                # Level 1: these tiny flat images barely shrink at higher levels, which cost 3-5x the time.
                renderer.render(scene).save(stem.with_suffix(".png"), optimize=False, compress_level=1)
                with open(stem.with_suffix(".txt"), "w", encoding="utf-8") as f:
                    f.write(scene.caption + "\n")
                pending += 1
                if progress is not None and pending == 100:
                    progress(pending)
                    pending = 0
            if progress is not None and pending:
                progress(pending)
            extra = {"new_objects": list(new_objects), "new_share": new_share} if new_objects else {}
            write_manifest(tmp / SCENES_MANIFEST, "emoji-scenes", {"count": count, "seed": seed, "relations": counts,
                                                                   **extra})
    return {"count": count, "seed": seed, "relations": counts, **extra, "out_dir": str(out_dir.resolve())}


def benchmark_prompts(split: str, per_relation: int, seed: int = 0) -> list[str]:
    """Up to `per_relation` distinct prompts per relation, grouped by relation in RELATIONS order.

    "train": every relation over pairs seen in training; "heldout": the two-object relations over
    held-out pairs only (compositional generalisation).
    """
    if split not in ("train", "heldout"):
        raise UsageError(f"unknown benchmark split {split!r}; expected 'train' or 'heldout'")
    if per_relation < 1:
        raise UsageError(f"prompts per relation must be at least 1, got {per_relation}")
    rng = random.Random(f"emoji-scenes/benchmark/{split}/{seed}")
    prompts: list[str] = []
    for relation in RELATIONS:
        if split == "heldout" and relation not in PAIR_RELATIONS:
            continue
        if relation == "single":
            pool: list[str] = [o.phrase for o in OBJECTS]
        elif relation == "two":
            pool = [caption_for("two", (n,)) for n in COUNTABLE]
        else:
            pairs = TRAIN_PAIRS if split == "train" else HELDOUT_PAIRS
            pool = [caption_for(relation, pair) for pair in pairs]
        prompts += rng.sample(pool, min(per_relation, len(pool)))
    return prompts


def write_prompts(path: str | os.PathLike, prompts: Iterable[str]) -> None:
    """Write one prompt per line, atomically."""
    lines = list(prompts)
    if any("\n" in p for p in lines):
        raise UsageError(f"a prompt for {path} contains a newline")
    atomic_write_text(path, "".join(p + "\n" for p in lines))
