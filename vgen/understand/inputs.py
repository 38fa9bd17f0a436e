"""The images `vgen classify` and `vgen search --image` read: image files, folders of them, or the
rows of a split of a vgen dataset (which also carry their captions, so accuracy can be measured)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vgen.data.discovery import IMAGE_EXTENSIONS
from vgen.data.images import ImageRejected, decode_image
from vgen.errors import UsageError


@dataclass(frozen=True)
class InputImage:
    """One image to read: `name` is what the user recognises (the path as given, or `split/row` of a
    dataset); `caption` is a dataset row's caption (None for files)."""

    name: str
    load: Callable[[], torch.Tensor]  # -> uint8 3 x H x W; raises ImageRejected or OSError
    captions: tuple[str, ...] = ()
    folder: Path | None = None  # the folder argument it was found in (None: named itself, or a dataset row)


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and (path / "dataset.yaml").is_file()


def _read_file(path: Path) -> torch.Tensor:
    image = decode_image(path.read_bytes())
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _folder_images(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively in sorted order; hidden entries skipped, each
    directory walked once (symlink loops)."""
    found, seen = [], set()

    def walk(directory: Path) -> None:
        st = directory.stat()
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                walk(Path(entry.path))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file(follow_symlinks=True):
                found.append(Path(entry.path))

    walk(folder)
    return found


def collect_images(paths: Sequence[Path], split: str = "val") -> list[InputImage]:
    """Every image the arguments name, in order: a file as itself, a folder's image files
    recursively, a vgen dataset dir's `split`. A missing path or an empty result is a usage error."""
    from vgen.data.dataset import ImageCaptionDataset

    images: list[InputImage] = []
    for path in paths:
        if is_dataset_dir(path):
            dataset = ImageCaptionDataset(path, split)
            for row in range(len(dataset)):
                images.append(InputImage(f"{split}/{row}", (lambda d=dataset, r=row: d.image(r)),
                                         tuple(dataset.captions[row])))
        elif path.is_dir():
            images += [InputImage(str(file), (lambda f=file: _read_file(f)), folder=path)
                       for file in _folder_images(path)]
        elif path.is_file():
            images.append(InputImage(str(path), (lambda f=path: _read_file(f))))
        else:
            raise UsageError(f"{path}: no such file or folder (expected images, a folder of them or a dataset dir)")
    if not images:
        raise UsageError(f"no images in {', '.join(map(str, paths))} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def _readable(images: Sequence[InputImage], failed: list[tuple[str, str]],
              advance: Callable[[int], None] | None) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, uint8 pixels) of each image that can be read; (name, reason) of the others into `failed`."""
    for i, item in enumerate(images):
        try:
            pixels = item.load()
        except ImageRejected as e:
            failed.append((item.name, f"{e.reason}: {e.detail}"))
        except OSError as e:
            failed.append((item.name, e.strerror or str(e)))
        else:
            yield i, pixels
        if advance is not None:
            advance(1)


def sidecar_refusal(item: InputImage, sidecar: Path, claimed: set[Path]) -> str | None:
    """Why `sidecar` must not be written as `item`'s caption file, or None: it is the image itself
    (an image named x.txt), another image of this run already wrote it (a.png and a.jpg), or it
    lies outside the folder the image was found in (reached through a symlinked folder)."""
    if sidecar.resolve() == Path(item.name).resolve():
        return "it is the image itself"
    if sidecar in claimed:
        return "another image of the same name already has it"
    if item.folder is not None and item.folder.resolve() not in sidecar.resolve().parents:
        return f"it lies outside {item.folder} (a symlinked folder)"
    return None


def embed_images(clip, images: Sequence[InputImage], batch_size: int = 64,
                 advance: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """CLIP embeddings of the images that can be read: (features [n, D], the indices of `images`
    they belong to, (name, reason) of each one that cannot). Images of any size: each is resized
    and centre-cropped alone, then encoded in batches."""
    features, kept, failed, batch = [], [], [], []

    def flush() -> None:
        if batch:
            features.append(clip.encode_prepared(torch.cat(batch)).cpu())
            batch.clear()

    for i, pixels in _readable(images, failed, advance):
        batch.append(clip.prepare(pixels[None]))
        kept.append(i)
        if len(batch) == batch_size:
            flush()
    flush()
    return (torch.cat(features) if features else torch.empty(0, clip.num_features)), kept, failed


def load_images(images: Sequence[InputImage], size: int,
                advance: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """The images that can be read, as uint8 [n, 3, size, size] (others centre-cropped and resized,
    PIL bicubic with antialiasing, as open_clip prepares them), the indices of `images` they belong
    to, and (name, reason) of each one that cannot be read."""
    from vgen.evaluate.features import resize_float

    pixels, kept, failed = [], [], []
    for i, image in _readable(images, failed, advance):
        if tuple(image.shape[1:]) != (size, size):
            image = resize_float(image[None], size, "bicubic", center_crop=True).round().to(torch.uint8)[0]
        pixels.append(image)
        kept.append(i)
    empty = torch.empty(0, 3, size, size, dtype=torch.uint8)
    return (torch.stack(pixels) if pixels else empty), kept, failed
