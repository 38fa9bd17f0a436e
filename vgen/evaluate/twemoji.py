"""Twemoji artwork of the 36 emoji-scenes objects: the judge's training style (not the dataset's).

The images come from the npm package `emoji-datasource-twitter` (Twemoji, graphics CC BY 4.0;
https://github.com/jdecked/twemoji), which `make setup` installs into `.vendor/twemoji`. Its layout:

    emoji.json                  one row per emoji: "unified" code points ("2600-FE0F"), "non_qualified"
                                ("2600", without the variation selector), "image" ("2600-fe0f.png")
    img/twitter/64/<image>      a 64x64 RGBA PNG per emoji
    img/twitter/sheets*/        the same images as sprite sheets (unused here)
    package.json                the package version

Nothing is downloaded at run time: a missing package is a MissingDependencyError saying how to
install it, so evaluation can report the judge as `unavailable: <reason>`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vgen.data.emoji_scenes import OBJECTS
from vgen.errors import MissingDependencyError

PACKAGE = "emoji-datasource-twitter"
VERSION = "16.0.0"  # the version `make setup` installs
ENV_VAR = "VGEN_TWEMOJI_DIR"
# Relative to the repository root (the parent of the `vgen` package in a source checkout).
VENDOR_SUBDIR = Path(".vendor/twemoji/node_modules") / PACKAGE
INSTALL_HINT = (f"run `make setup`, or: npm install --prefix .vendor/twemoji --no-save --no-audit --no-fund "
                f"{PACKAGE}@{VERSION}  (or set {ENV_VAR} to the package folder)")
IMAGE_SUBDIR = Path("img/twitter/64")


# Other Twemoji drawings of the same kinds of object (a face, a breed, a close relative), code points
# as in emoji.json: one drawing per class teaches a classifier that drawing, not the object, so the
# judge also sees these. Only Twemoji; the benchmark's Noto artwork is never used for training.
VARIANTS: dict[str, tuple[str, ...]] = {
    "cat": ("1F408-200D-2B1B", "1F431"),  # black cat, cat face
    "dog": ("1F436", "1F429", "1F9AE", "1F415-200D-1F9BA"),  # dog face, poodle, guide dog, service dog
    "rabbit": ("1F430",),  # rabbit face
    "pig": ("1F437", "1F417"),  # pig face, boar
    "cow": ("1F42E", "1F402", "1F403"),  # cow face, ox, water buffalo
    "horse": ("1F434",),  # horse face
    "monkey": ("1F435", "1F9A7"),  # monkey face, orangutan
    "chicken": ("1F413",),  # rooster
    "umbrella": ("2614", "26F1-FE0F"),  # umbrella with rain drops, umbrella on ground
    "bird": ("1F54A-FE0F", "1F426-200D-2B1B", "1F99C", "1F985"),  # dove, black bird, parrot, eagle
    "fish": ("1F420", "1F421"),  # tropical fish, blowfish
    "apple": ("1F34F",),  # green apple
    "house": ("1F3E1",),  # house with garden
    "tree": ("1F332",),  # evergreen tree
    "sunflower": ("1F33C",),  # blossom
    "mushroom": ("1F344-200D-1F7EB",),  # brown mushroom
    "sun": ("1F31E",),  # sun with face
    "car": ("1F699", "1F695", "1F3CE-FE0F"),  # sport utility vehicle, taxi, racing car
    "bus": ("1F68E", "1F68D", "1F690"),  # trolleybus, oncoming bus, minibus
    "airplane": ("1F6E9-FE0F",),  # small airplane
}


def default_dir() -> Path:
    return Path(__file__).resolve().parents[2] / VENDOR_SUBDIR


def find_twemoji_dir(path: str | os.PathLike | None = None) -> Path:
    """The package folder: `path`, else $VGEN_TWEMOJI_DIR, else the repository's `.vendor/twemoji`."""
    for candidate, origin in ((path, "the path given"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if candidate:
            folder = Path(candidate)
            if not (folder / "emoji.json").is_file():
                raise MissingDependencyError(
                    f"Twemoji images not found: {folder} (from {origin}) has no emoji.json; {INSTALL_HINT}")
            return folder
    folder = default_dir()
    if not (folder / "emoji.json").is_file():
        raise MissingDependencyError(f"Twemoji images ({PACKAGE}) are not installed at {folder}; "
                                     f"{INSTALL_HINT}")
    return folder


def _unified(emoji: str) -> str:
    return "-".join(f"{ord(c):04X}" for c in emoji)


@dataclass(frozen=True)
class TwemojiSet:
    folder: Path
    version: str
    files: dict[str, Path]  # noun -> the PNG of the object's own emoji
    variants: dict[str, tuple[Path, ...]]  # noun -> PNGs of VARIANTS (those the package has)
    sha256: str  # of all these PNGs' bytes, in OBJECTS order

    def glyphs(self) -> dict[str, list]:
        """noun -> RGBA PIL images cropped to their alpha bounding box: the object's emoji, then variants."""
        from PIL import Image

        out: dict[str, list] = {}
        for noun, path in self.files.items():
            out[noun] = []
            for file in (path, *self.variants[noun]):
                with Image.open(file) as im:
                    rgba = im.convert("RGBA")
                bbox = rgba.getchannel("A").getbbox()
                if bbox is None:
                    raise MissingDependencyError(f"the Twemoji image {file} for {noun!r} is empty; "
                                                 f"{INSTALL_HINT}")
                out[noun].append(rgba.crop(bbox))
        return out


def load_twemoji(path: str | os.PathLike | None = None) -> TwemojiSet:
    """Find the package and the PNG of each of the 36 objects (with or without U+FE0F in its name)."""
    folder = find_twemoji_dir(path)
    try:
        rows = json.loads((folder / "emoji.json").read_text(encoding="utf-8"))
        package = json.loads((folder / "package.json").read_text(encoding="utf-8"))
        version = str(package.get("version", "unknown"))
    except (OSError, ValueError) as e:
        raise MissingDependencyError(
            f"cannot read the Twemoji package in {folder}: {e}; {INSTALL_HINT}") from e
    by_code: dict[str, str] = {}
    for row in rows:
        for key in ("unified", "non_qualified"):
            if row.get(key) and row.get("image"):
                by_code.setdefault(str(row[key]).upper(), row["image"])

    def find(code: str) -> Path | None:
        bare = code.replace("-FE0F", "")
        names = [by_code.get(code), by_code.get(bare), code.lower() + ".png", bare.lower() + ".png",
                 bare.lower() + "-fe0f.png"]
        images = folder / IMAGE_SUBDIR
        return next((images / n for n in names if n and (images / n).is_file()), None)

    files: dict[str, Path] = {}
    variants: dict[str, tuple[Path, ...]] = {}
    digest = hashlib.sha256()
    for obj in OBJECTS:
        code = _unified(obj.emoji)
        found = find(code)
        if found is None:
            raise MissingDependencyError(
                f"no Twemoji image for {obj.noun!r} (U+{code.replace('-', ' U+')}) under "
                f"{folder / IMAGE_SUBDIR}; {INSTALL_HINT}")
        files[obj.noun] = found
        # A variant missing from another package version is left out (the cache key sees the difference).
        variants[obj.noun] = tuple(p for p in map(find, VARIANTS.get(obj.noun, ())) if p is not None)
        for path in (found, *variants[obj.noun]):
            digest.update(obj.noun.encode() + b"\0" + path.name.encode() + b"\0" + path.read_bytes())
    return TwemojiSet(folder, version, files, variants, digest.hexdigest())
