"""Text -> image and image -> image search over a vgen dataset with a CLIP.

The index is the L2-normalised CLIP image embedding of every image of the dataset's splits,
computed once and cached in the dataset dir (vgen.evaluate.reference.reference_features: keyed by
the CLIP's weights sha256 and the dataset manifest's sha256, written atomically), so an index
never outlives the model or the data it was made from. A query is one matrix product with all of
it: exact cosine search, no approximation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vgen.data.dataset import ImageCaptionDataset
from vgen.data.preprocess import SPLITS
from vgen.errors import UsageError

ALL_SPLITS = "all"


@dataclass
class Hit:
    rank: int
    image: str  # split/row
    id: int  # the dataset's image id
    score: float  # cosine similarity
    captions: list[str]


@dataclass
class SearchIndex:
    dataset_dir: Path
    features: torch.Tensor  # [N, D] normalised
    names: list[str]  # split/row per feature row
    ids: list[int]
    captions: list[list[str]]
    datasets: dict[str, ImageCaptionDataset]
    from_cache: bool

    @classmethod
    def build(cls, dataset_dir: Path, clip, split: str = ALL_SPLITS,
              advance: Callable[[int], None] | None = None) -> SearchIndex:
        """`clip`: vgen.evaluate.features.ClipFeatures. `split`: one of the dataset's splits or all."""
        from vgen.evaluate.reference import reference_features

        if split != ALL_SPLITS and split not in SPLITS:
            raise UsageError(f"--split: expected {ALL_SPLITS} or one of {', '.join(SPLITS)}, got {split!r}")
        features, names, ids, captions, datasets, cached = [], [], [], [], {}, True
        for name in (SPLITS if split == ALL_SPLITS else (split,)):
            dataset = ImageCaptionDataset(dataset_dir, name)
            if not len(dataset):
                continue
            reference = reference_features(dataset_dir, clip, name, advance=advance)
            features.append(reference.features)
            names += [f"{name}/{row}" for row in range(len(dataset))]
            ids += dataset.ids
            captions += dataset.captions
            datasets[name] = dataset
            cached = cached and reference.from_cache
        if not features:
            raise UsageError(f"{dataset_dir}: no images in the {split} split(s) to search")
        return cls(Path(dataset_dir), torch.cat(features), names, ids, captions, datasets, cached)

    def __len__(self) -> int:
        return len(self.names)

    def nearest(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[Q, D] normalised queries -> (scores, rows), each [Q, min(k, N)], best first."""
        scores = queries.float() @ self.features.T
        return scores.topk(min(k, len(self)), dim=-1)

    def search(self, query: torch.Tensor, k: int) -> list[Hit]:
        scores, rows = self.nearest(query[None] if query.ndim == 1 else query, k)
        return [Hit(rank + 1, self.names[row], self.ids[row], score, list(self.captions[row]))
                for rank, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()))]

    def image(self, name: str) -> torch.Tensor:
        split, row = name.split("/")
        return self.datasets[split].image(int(row))


def text_to_image_recall(index: SearchIndex, clip, ks: Sequence[int] = (1, 5, 10),
                         batch_size: int = 256) -> dict[str, float | int]:
    """Recall@k of text -> image search: every distinct caption of the index is a query, a hit an
    image among its k nearest that has that caption."""
    queries = sorted({caption for captions in index.captions for caption in captions})
    if not queries:
        raise UsageError(f"{index.dataset_dir}: the indexed images have no captions to query with")
    holders: dict[str, set[int]] = {}
    for row, captions in enumerate(index.captions):
        for caption in captions:
            holders.setdefault(caption, set()).add(row)
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        _, rows = index.nearest(clip.encode_text(chunk), max(ks))
        for caption, found in zip(chunk, rows.tolist()):
            for k in ks:
                hits[k] += any(row in holders[caption] for row in found[:k])
    return {"queries": len(queries), "images": len(index),
            **{f"recall@{k}": hits[k] / len(queries) for k in ks}}
