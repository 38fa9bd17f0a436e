"""The training view of a preprocessed dataset: a torch Dataset over memory-mapped shards.

Only the index (captions and shard locations) is read into memory; pixels stay in the shard files
and are paged in by the OS as rows are read, so a dataset larger than RAM works and DataLoader
workers share the page cache instead of copying tensors.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vgen.atomic import atomic_write_text
from vgen.data.preprocess import DATASET_MANIFEST, INDEX_FILE, SPLITS
from vgen.data.shards import open_shard
from vgen.errors import IntegrityError, ManifestError, UsageError, VgenError
from vgen.manifest import read_manifest, resolve_inside, sha256_file, verify_files

REQUIRED_KEYS = ("resolution", "shards", "index.file", "index.sha256", "counts.kept")
# Files already hashed and found intact, by (size, mtime, inode): a dataset is hashed once, not at
# every load. A file changed in place gets a new mtime and is hashed again.
CACHE_DIR = ".vgen-cache"  # what later stages cache about a dataset (verdicts, reference features)
VERIFIED_CACHE = f"{CACHE_DIR}/verified.json"
_VERIFIED_HERE: dict[str, dict] = {}  # the same verdicts in this process, for a dataset we cannot write


def load_dataset_manifest(dataset_dir: str | Path) -> dict:
    return read_manifest(Path(dataset_dir) / DATASET_MANIFEST, "dataset", REQUIRED_KEYS)


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def verify_dataset(dataset_dir: str | Path, manifest: dict | None = None) -> None:
    """Check the index and every shard against the sha256 that dataset.yaml recorded (IntegrityError
    naming the file if one differs). Files whose size, mtime and inode are those of an earlier
    successful check are not hashed again (DATASET/.vgen-cache/verified.json); when that cache
    cannot be written (a read-only dataset), the next load simply hashes again."""
    root = Path(dataset_dir)
    manifest = manifest or load_dataset_manifest(root)
    manifest_path = str(root / DATASET_MANIFEST)
    cache_path = root / VERIFIED_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    cache = {**cache, **_VERIFIED_HERE.get(str(root.resolve()), {})}
    entries = [*manifest["shards"], manifest["index"]]
    verified, changed = {}, False
    for entry in entries:
        if not isinstance(entry, dict):
            raise ManifestError(f"{manifest_path}: a shard entry is {entry!r}, expected a mapping with file and sha256")
        file = resolve_inside(root, entry.get("file"), manifest_path)
        name = str(entry["file"])
        seen = cache.get(name)
        if file.is_file() and isinstance(seen, dict) and seen.get("sha256") == entry.get("sha256") \
                and seen.get("stat") == _stat_key(file):
            verified[name] = seen
            continue
        try:
            verify_files(root, [entry], manifest_path)
        except IntegrityError as e:
            raise IntegrityError(f"{e}. Rebuild the dataset with `vgen preprocess`") from None
        verified[name], changed = {"sha256": entry["sha256"], "stat": _stat_key(file)}, True
    _VERIFIED_HERE[str(root.resolve())] = verified
    if changed:
        try:
            atomic_write_text(cache_path, json.dumps(verified, indent=0) + "\n")
        except (OSError, VgenError):
            pass


class ImageCaptionDataset(Dataset):
    """Images of one split with their captions.

    `dataset[i]` returns {"image": uint8 tensor 3xRxR, "caption": str, "id": int} with a caption drawn
    at random (torch's RNG, so DataLoader worker seeding applies) from the image's captions.
    With `verify` (the default) the index and shards are first checked against their recorded
    sha256 (verify_dataset; cached, so only the first load of a dataset pays for the hashing).
    `dataset.item(i, caption_seed)` draws the caption from `caption_seed` instead, for training loops
    that derive all randomness from (seed, step, sample index).
    """

    def __init__(self, dataset_dir: str | Path, split: str = "train", verify: bool = True):
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.root = Path(dataset_dir)
        self.manifest = load_dataset_manifest(self.root)
        self.split = split
        self.resolution = int(self.manifest["resolution"])
        manifest_path = str(self.root / DATASET_MANIFEST)
        index_path = resolve_inside(self.root, self.manifest["index"]["file"], manifest_path)
        if verify:
            verify_dataset(self.root, self.manifest)
        shards = {entry.get("file") for entry in self.manifest["shards"] if isinstance(entry, dict)}
        self.ids: list[int] = []
        self.captions: list[list[str]] = []
        self._locations: list[tuple[str, int]] = []
        try:
            with open(index_path, encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    if row["shard"] not in shards:
                        raise ManifestError(f"{index_path}: row {row.get('id')} names shard {row['shard']!r}, "
                                            f"which {DATASET_MANIFEST} does not list")
                    if row["split"] == split:
                        self.ids.append(row["id"])
                        self.captions.append(row["captions"])
                        self._locations.append((row["shard"], row["row"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{index_path}: unreadable dataset index ({e}); re-run vgen preprocess") from None
        self._shards: dict[str, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self):
        # Memory maps are reopened in each DataLoader worker rather than pickled.
        return {**self.__dict__, "_shards": {}}

    def image(self, i: int) -> torch.Tensor:
        shard, row = self._locations[i]
        arrays = self._shards.get(shard)
        if arrays is None:
            path = resolve_inside(self.root, shard, str(self.root / DATASET_MANIFEST))
            arrays = self._shards[shard] = open_shard(path)
            expected = (3, self.resolution, self.resolution)
            if arrays["images"].shape[1:] != expected:
                raise ManifestError(f"{self.root / shard}: images of shape {arrays['images'].shape[1:]}, "
                                    f"but {DATASET_MANIFEST} says {expected}")
        if int(arrays["ids"][row]) != self.ids[i]:
            raise ManifestError(f"{self.root / shard}: row {row} holds image {int(arrays['ids'][row])}, "
                                f"but {INDEX_FILE} says {self.ids[i]}; the dataset is inconsistent")
        return torch.from_numpy(np.array(arrays["images"][row]))

    def caption(self, i: int, caption_seed: int | None = None) -> str:
        """One of image i's captions: chosen by `caption_seed`, or at random (torch's generator)."""
        captions = self.captions[i]
        if not captions:
            return ""
        if caption_seed is None:
            return captions[int(torch.randint(len(captions), ()))]
        return captions[random.Random(caption_seed).randrange(len(captions))]

    def item(self, i: int, caption_seed: int | None = None) -> dict:
        return {"image": self.image(i), "caption": self.caption(i, caption_seed), "id": self.ids[i]}

    def __getitem__(self, i: int) -> dict:
        return self.item(i)


def dataset_sha256(dataset_dir: str | Path) -> str:
    """The hash later stages record to say which dataset manifest they were made from."""
    return sha256_file(Path(dataset_dir) / DATASET_MANIFEST)


def dataset_content_sha256(dataset_dir: str | Path) -> str:
    """The hash of what a dataset holds (its index and shards, by their recorded sha256), the same
    for the same data whatever else dataset.yaml says (its creation time, statistics a newer vgen
    adds): what decides whether a run may resume on a dataset."""
    manifest = load_dataset_manifest(dataset_dir)
    entries = sorted((str(e.get("file")), str(e.get("sha256"))) for e in [*manifest["shards"], manifest["index"]]
                     if isinstance(e, dict))
    return hashlib.sha256(json.dumps(entries).encode("utf-8")).hexdigest()
