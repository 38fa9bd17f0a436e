"""Find the images of a raw caption folder and where their captions come from.

Walks the folder recursively in sorted order (so every run sees the same sequence), follows symlinks
but never the same directory twice (no symlink loops), and pairs each image with its sidecar caption
files (`photo.png` + `photo.txt` / `photo.caption`) and with rows of imagefolder `metadata.jsonl` /
`metadata.csv` files in it or its parent folders. Files that cannot become training images are
yielded too, with the reason, so that every file seen is accounted for in the dataset manifest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vgen.data.captions import MetadataFile, read_metadata
from vgen.errors import UsageError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
DEFAULT_CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass(slots=True)
class Candidate:
    """One entry of the raw folder: an image with its caption sources, or a file skipped up front."""

    path: str  # relative to the raw folder, POSIX separators; the id a user recognises
    sidecars: list[str] = field(default_factory=list)  # absolute paths of caption files
    metadata_captions: list[str] = field(default_factory=list)
    skip: tuple[str, str] | None = None  # (reason code, detail) when known without reading the image


def normalize_caption_extensions(extensions: Sequence[str] | None) -> tuple[str, ...]:
    if not extensions:
        return DEFAULT_CAPTION_EXTENSIONS
    normalized = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    clash = IMAGE_EXTENSIONS.intersection(normalized)
    if clash:
        raise UsageError(f"--caption-ext {sorted(clash)[0]} is an image extension")
    return normalized


def discover(
    root: str | os.PathLike,
    caption_extensions: Sequence[str] | None = None,
    caption_column: str = "text",
) -> Iterator[Candidate]:
    """Yield every file under `root` as a Candidate, images in sorted walk order."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory (expected a raw folder of images and captions)")
    caption_exts = normalize_caption_extensions(caption_extensions)
    # Captions from metadata files, keyed by path relative to root; consumed as images claim them.
    metadata: dict[str, list[str]] = {}
    visited_dirs: set[tuple[int, int]] = set()

    def walk(directory: Path, rel: str) -> Iterator[Candidate]:
        st = directory.stat()
        if (st.st_dev, st.st_ino) in visited_dirs:
            return  # a symlink back to a directory already walked
        visited_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            yield Candidate(rel or ".", skip=("read_error", f"cannot list directory: {e.strerror}"))
            return
        prefix = f"{rel}/" if rel else ""
        for name in METADATA_FILES:
            meta_entry = next((e for e in entries if e.name == name), None)
            if meta_entry is not None:
                yield from _load_metadata(Path(meta_entry.path), prefix, caption_column, metadata)
        files, subdirs = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files and folders (.git, .DS_Store, our own .partial dirs)
            if entry.is_dir(follow_symlinks=True):
                subdirs.append(entry)
            elif entry.name not in METADATA_FILES:
                files.append(entry)
        sidecars: dict[str, list[str]] = {}
        for entry in files:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in caption_exts:
                sidecars.setdefault(stem, []).append(entry.path)
        claimed: set[str] = set()
        for entry in files:
            stem, ext = os.path.splitext(entry.name)
            ext = ext.lower()
            path = prefix + entry.name
            if ext in caption_exts:
                continue
            if not entry.is_file(follow_symlinks=True):
                metadata.pop(path, None)  # reported here, not again as missing_file
                reason = "broken_symlink" if entry.is_symlink() else "not_a_file"
                yield Candidate(path, skip=(reason, "not a regular file"))
            elif ext not in IMAGE_EXTENSIONS:
                yield Candidate(path, skip=("unsupported_file", f"extension '{ext or '(none)'}' is not an image type"))
            else:
                claimed.add(stem)
                yield Candidate(path, sidecars=sidecars.get(stem, []), metadata_captions=metadata.pop(path, []))
        for stem in sorted(set(sidecars) - claimed):
            for sidecar in sidecars[stem]:
                yield Candidate(prefix + os.path.basename(sidecar), skip=("orphan_caption", "no image with this name"))
        for entry in subdirs:
            yield from walk(Path(entry.path), prefix + entry.name)

    yield from walk(root, "")
    for path in sorted(metadata):  # metadata rows whose image never turned up
        yield Candidate(path, skip=("missing_file", "listed in a metadata file but not found"))


def _load_metadata(
    path: Path, prefix: str, caption_column: str, metadata: dict[str, list[str]]
) -> Iterator[Candidate]:
    meta: MetadataFile = read_metadata(path, caption_column)
    for line, problem in meta.problems:
        yield Candidate(f"{prefix}{path.name}:{line}", skip=("metadata_error", problem))
    for name, texts in meta.captions.items():
        metadata.setdefault(prefix + name, []).extend(texts)
