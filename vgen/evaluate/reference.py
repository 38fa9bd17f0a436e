"""The reference features of a dataset's real images, computed once and cached.

`reference_features`: the features and Gaussian statistics of one split of a vgen dataset under a
feature extractor of vgen.evaluate.features, stored once as
`DATASET/.vgen-cache/reference-<extractor id>-<split>.safetensors`, valid while the extractor
(id, weights, description), the dataset manifest's sha256, the split and the subset size are
unchanged. FID/KID's real side, CLIP's FD/KID and `vgen search`'s index read it.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vgen.atomic import atomic_path
from vgen.data.dataset import CACHE_DIR
from vgen.errors import UsageError
from vgen.evaluate.features import extract_features
from vgen.evaluate.metrics import FeatureStatistics, feature_statistics

CACHE_FORMAT = "vgen-reference-features/1"
SUBSET_SEED = 0  # which images `max_images` picks: a fixed function of the split


@dataclass
class ReferenceFeatures:
    """Features of a dataset split's real images, their Gaussian statistics and their provenance."""

    features: torch.Tensor  # float32 [N, D]
    statistics: FeatureStatistics  # float64 mean [D], covariance [D, D]
    extractor_id: str
    weights_sha256: str | None
    dataset_sha256: str
    split: str
    path: Path  # the cache file
    from_cache: bool

    @property
    def count(self) -> int:
        return int(self.features.shape[0])


def reference_cache_path(dataset_dir: str | Path, extractor_id: str, split: str) -> Path:
    safe_id = re.sub(r"[^A-Za-z0-9._-]+", "_", extractor_id)
    return Path(dataset_dir) / CACHE_DIR / f"reference-{safe_id}-{split}.safetensors"


def _cache_key(extractor, dataset_sha: str, split: str, max_images: int | None) -> dict[str, str]:
    return {
        "format": CACHE_FORMAT,
        "extractor_id": extractor.id,
        "weights_sha256": str(extractor.weights_sha256),
        "description": json.dumps(extractor.description, sort_keys=True),
        "dataset_sha256": dataset_sha,
        "split": split,
        "max_images": str(max_images),
    }


def _read_cache(path: Path, key: dict[str, str]) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if any(metadata.get(k) != v for k, v in key.items()):
                return None
            return {name: f.get_tensor(name) for name in ("features", "mean", "covariance")}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is a cache miss, not an error
        warnings.warn(f"{path}: unreadable reference cache ({e}); recomputing", RuntimeWarning, stacklevel=3)
        return None


def reference_is_cached(dataset_dir: str | Path, extractor, split: str = "val",
                        max_images: int | None = None) -> bool:
    """Whether reference_features would read its cache (no images to run through the extractor)."""
    from vgen.data.dataset import dataset_sha256

    key = _cache_key(extractor, dataset_sha256(dataset_dir), split, max_images)
    return _read_cache(reference_cache_path(dataset_dir, extractor.id, split), key) is not None


def reference_features(
    dataset_dir: str | Path,
    extractor,
    split: str = "val",
    max_images: int | None = None,
    batch_size: int = 64,
    advance: Callable[[int], None] | None = None,
) -> ReferenceFeatures:
    """Features of `split` of a vgen dataset under `extractor`, computed once and cached.

    `extractor` is a feature module with `id`, `weights_sha256` and `description` (InceptionFeatures,
    ClipFeatures). `max_images` takes a fixed random subset (seeded) of that many images. The cache
    is used only while the extractor, the dataset manifest's sha256, the split and `max_images` are
    the same; otherwise the features are recomputed and the cache file replaced (atomically). A
    dataset dir that cannot be written to costs a warning, not the result.
    """
    from safetensors.torch import save_file

    from vgen.data.dataset import ImageCaptionDataset, dataset_sha256

    dataset_dir = Path(dataset_dir)
    dataset_sha = dataset_sha256(dataset_dir)
    path = reference_cache_path(dataset_dir, extractor.id, split)
    key = _cache_key(extractor, dataset_sha, split, max_images)
    cached = _read_cache(path, key)
    if cached is not None:
        statistics = FeatureStatistics(cached["mean"], cached["covariance"], int(cached["features"].shape[0]))
        return ReferenceFeatures(cached["features"], statistics, extractor.id, extractor.weights_sha256,
                                 dataset_sha, split, path, from_cache=True)

    dataset = ImageCaptionDataset(dataset_dir, split)
    rows = list(range(len(dataset)))
    if max_images is not None and max_images < len(rows):
        generator = torch.Generator().manual_seed(SUBSET_SEED)
        rows = sorted(torch.randperm(len(rows), generator=generator)[:max_images].tolist())
    if len(rows) < 2:
        raise UsageError(
            f"{dataset_dir}: the {split} split has {len(rows)} images; a reference set needs at least 2"
        )
    images = _DatasetImages(dataset, rows)
    features = extract_features(extractor, images, batch_size, advance)
    statistics = feature_statistics(features)
    tensors = {
        "features": features.contiguous(),
        "mean": statistics.mean.contiguous(),
        "covariance": statistics.covariance.contiguous(),
    }
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={**key, "count": str(len(rows))})
    except OSError as e:
        warnings.warn(f"{path}: cannot write the reference cache ({e}); continuing without it",
                      RuntimeWarning, stacklevel=2)
    return ReferenceFeatures(features, statistics, extractor.id, extractor.weights_sha256,
                             dataset_sha, split, path, from_cache=False)


class _DatasetImages(Sequence):
    """The uint8 images of chosen rows of an ImageCaptionDataset, as a sequence."""

    def __init__(self, dataset, rows: list[int]):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.dataset.image(self.rows[i]) for i in range(*index.indices(len(self.rows)))]
        return self.dataset.image(self.rows[index])
