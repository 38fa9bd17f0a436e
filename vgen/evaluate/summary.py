"""What an evaluation says first: the headline numbers (metric -> value, N, extractor) and the
caveats a reader must know before trusting the distribution metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vgen.evaluate.evaluation import ImageSet


# Below this many generated images FID is strongly biased upward and KID noisy (Chong & Forsyth 2020,
# "Effectively Unbiased FID and Inception Score and where to find them"): numbers of different N
# do not compare.
SMALL_SET = 1000
DISTRIBUTION_METRICS = ("fid", "kid", "precision-recall", "fd-clip", "kid-clip")


def caveats(fid_set: ImageSet, data_dir: Path, metrics: dict[str, dict]) -> list[str]:
    """What a reader must know before trusting the distribution metrics: generated images of another
    size than the dataset's, and a generated set far smaller than the reference or than SMALL_SET."""
    from vgen.data.dataset import load_dataset_manifest

    notes = []
    resolution = int(load_dataset_manifest(data_dir)["resolution"])
    height, width = fid_set.images.shape[-2:]
    if (height, width) != (resolution, resolution):
        notes.append(f"the {fid_set.name} images are {width}x{height} but the dataset's are {resolution}x{resolution}: "
                     "feature metrics then measure the difference in size as well as in content")
    measured = [name for name in DISTRIBUTION_METRICS if name in metrics and "unavailable" not in metrics[name]]
    references = [metrics[name].get("reference", {}).get("n") for name in measured]
    reference_n = max((n for n in references if isinstance(n, int)), default=None)
    n = len(fid_set.images)
    if measured and (n < SMALL_SET or (reference_n and n < reference_n / 4)):
        notes.append(f"{', '.join(measured)}: {n} generated images against {reference_n} reference images; at "
                     "this N FID is biased upward and KID is noisy, so compare only numbers of the same N "
                     f"(at least {SMALL_SET} images, e.g. `vgen evaluate --run ... --fid-images 2000`)")
    return notes


def headline(metrics: dict[str, dict]) -> dict[str, Any]:
    """The numbers a reader looks for first (README, terminal): metric -> value, N, extractor."""
    rows = {}
    for name, result in metrics.items():
        if "unavailable" in result:
            rows[name] = {"unavailable": result["unavailable"]}
            continue
        n = result.get("n_generated", result.get("n"))
        rows[name] = {"value": result["value"], "n": n, "extractor_id": result.get("extractor_id")}
    return rows
