"""vgen.data.shards and vgen.data.dataset: shards round-trip through memory maps, and the training
Dataset over a small preprocessed dataset returns the right pixels and captions."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.numpy import load_file
from torch.utils.data import DataLoader

from vgen.data.dataset import ImageCaptionDataset, dataset_sha256, load_dataset_manifest
from vgen.data.preprocess import PreprocessOptions, preprocess, val_split
from vgen.data.shards import ShardWriter, open_shard, rows_per_shard
from vgen.errors import IntegrityError, ManifestError, UsageError
from vgen.manifest import sha256_file

R = 16


# ---------------------------------------------------------------- shards


def _chw(k: int, resolution: int = 8) -> np.ndarray:
    rng = np.random.default_rng(k)
    return rng.integers(0, 256, (3, resolution, resolution), dtype=np.uint8)


def test_rows_per_shard():
    assert rows_per_shard(64, 1.0) == 2**20 // (3 * 64 * 64)
    assert rows_per_shard(4096, 0.001) == 1  # never zero


def test_shard_writer_splits_and_round_trips(tmp_path):
    writer = ShardWriter(tmp_path, "train", 8, rows_per_shard=3)
    locations = []
    ids = [10, 11, 12, 13, 14, 15, 16]
    for k, image_id in enumerate(ids):
        locations.append(writer.next_location)
        writer.append(image_id, _chw(k))
    writer.flush()
    writer.flush()  # nothing buffered: no empty shard
    assert locations == [
        ("shards/train-00000.safetensors", 0), ("shards/train-00000.safetensors", 1),
        ("shards/train-00000.safetensors", 2), ("shards/train-00001.safetensors", 0),
        ("shards/train-00001.safetensors", 1), ("shards/train-00001.safetensors", 2),
        ("shards/train-00002.safetensors", 0),
    ]
    assert [s["file"] for s in writer.shards] == [
        "shards/train-00000.safetensors", "shards/train-00001.safetensors", "shards/train-00002.safetensors"
    ]
    assert [s["rows"] for s in writer.shards] == [3, 3, 1]
    assert all(s["split"] == "train" for s in writer.shards)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "train-00000.safetensors", "train-00001.safetensors", "train-00002.safetensors"
    ]  # no temporary files left
    for entry in writer.shards:
        assert entry["sha256"] == sha256_file(tmp_path / entry["file"])

    for (shard, row), image_id, k in zip(locations, ids, range(len(ids))):
        arrays = open_shard(tmp_path / shard)
        assert isinstance(arrays["images"], np.memmap)
        assert arrays["images"].dtype == np.uint8 and arrays["ids"].dtype == np.int64
        assert arrays["images"].shape[1:] == (3, 8, 8)
        assert int(arrays["ids"][row]) == image_id
        assert np.array_equal(arrays["images"][row], _chw(k))

    # The memory map agrees with the safetensors reader itself.
    reference = load_file(str(tmp_path / "shards/train-00001.safetensors"))
    arrays = open_shard(tmp_path / "shards/train-00001.safetensors")
    assert np.array_equal(reference["images"], arrays["images"])
    assert np.array_equal(reference["ids"], arrays["ids"])


def test_truncated_shard_refused(tmp_path):
    writer = ShardWriter(tmp_path, "val", 8, rows_per_shard=4)
    for k in range(4):
        writer.append(k, _chw(k))
    path = tmp_path / writer.shards[0]["file"]
    assert path.name == "val-00000.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ManifestError, match="truncated") as info:
        open_shard(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01\x02", (2**40).to_bytes(8, "little") + b"{}", (10).to_bytes(8, "little") + b"not json!!"],
)
def test_unreadable_shard_refused(tmp_path, data):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ManifestError, match="not a readable safetensors shard"):
        open_shard(path)


def test_shard_without_ids_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "x.safetensors"
    save_file({"images": np.zeros((1, 3, 8, 8), np.uint8)}, str(path))
    with pytest.raises(ManifestError, match="'ids'"):
        open_shard(path)


def test_missing_shard_refused(tmp_path):
    with pytest.raises(ManifestError):
        open_shard(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------- a small preprocessed dataset


def _colour(k: int) -> tuple[int, int, int]:
    return ((37 * k + 20) % 256, (91 * k + 60) % 256, (53 * k + 200) % 256)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A raw folder of solid-colour PNGs (some with two caption lines) and its preprocessed dataset.

    Images are added until both splits hold at least two, so the test does not depend on luck.
    """
    base = tmp_path_factory.mktemp("dataset")
    raw = base / "raw"
    raw.mkdir()
    sources: dict[str, dict] = {}
    splits = {"train": 0, "val": 0}
    k = 0
    while k < 12 or min(splits.values()) < 2:
        colour = _colour(k)
        path = raw / f"img{k:02d}.png"
        Image.new("RGB", (24 + k % 3 * 4, 24), colour).save(path)
        captions = [f"a solid colour number {k}"]
        if k % 3 == 0:
            captions.append(f"another caption of image {k}")
        (raw / f"img{k:02d}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        digest = hashlib.sha256(path.read_bytes()).digest()
        splits[val_split(digest, 0.3)] += 1
        sources[path.name] = {"colour": colour, "captions": captions}
        k += 1
        assert k < 100
    out = base / "data"
    manifest = preprocess(raw, out, PreprocessOptions(resolution=R, workers=1, val_fraction=0.3))
    index = [json.loads(line) for line in (out / "index.jsonl").read_text(encoding="utf-8").splitlines()]
    return {
        "raw": raw, "out": out, "manifest": manifest, "sources": sources, "index": index, "splits": splits
    }


def _copy(built, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(built["out"], copy)
    return copy


def test_preprocessed_layout(built):
    manifest, out = built["manifest"], built["out"]
    assert manifest["counts"]["kept"] == len(built["sources"])
    assert manifest["counts"]["skipped"] == 0
    assert manifest["splits"]["train"] == built["splits"]["train"]
    assert manifest["splits"]["val"] == built["splits"]["val"]
    assert load_dataset_manifest(out)["resolution"] == R
    assert dataset_sha256(out) == sha256_file(out / "dataset.yaml")


def test_split_lengths(built):
    train = ImageCaptionDataset(built["out"], "train")
    val = ImageCaptionDataset(built["out"], "val")
    kept = built["manifest"]["counts"]["kept"]
    assert len(train) + len(val) == kept
    assert len(train) == built["splits"]["train"] and len(val) == built["splits"]["val"]
    assert len(train) >= 2 and len(val) >= 2
    assert sorted(train.ids + val.ids) == list(range(kept))
    assert train.resolution == R


def test_unknown_split(built):
    with pytest.raises(UsageError, match="unknown split"):
        ImageCaptionDataset(built["out"], "test")


def test_pixels_and_captions_match_sources(built):
    by_id = {row["id"]: row for row in built["index"]}
    for split in ("train", "val"):
        dataset = ImageCaptionDataset(built["out"], split)
        for i in range(len(dataset)):
            item = dataset[i]
            source = built["sources"][by_id[item["id"]]["source"]]
            image = item["image"]
            assert isinstance(image, torch.Tensor)
            assert image.dtype == torch.uint8 and tuple(image.shape) == (3, R, R)
            expected = torch.tensor(source["colour"], dtype=torch.uint8)[:, None, None].expand(3, R, R)
            assert torch.equal(image, expected)
            assert item["caption"] in source["captions"]
            assert dataset.captions[i] == source["captions"]


def _two_caption_dataset(built) -> tuple[ImageCaptionDataset, int]:
    for split in ("train", "val"):
        dataset = ImageCaptionDataset(built["out"], split)
        for i, captions in enumerate(dataset.captions):
            if len(captions) == 2:
                return dataset, i
    raise AssertionError("the fixture should contain an image with two captions")


def test_item_with_caption_seed_is_deterministic(built):
    dataset = ImageCaptionDataset(built["out"], "train")
    for i in range(len(dataset)):
        torch.manual_seed(i)  # the seeded draw does not depend on torch's RNG state
        first = dataset.item(i, caption_seed=1234)
        torch.manual_seed(i + 1000)
        second = dataset.item(i, caption_seed=1234)
        assert first["caption"] == second["caption"]
        assert first["caption"] in dataset.captions[i]
        assert first["id"] == second["id"] == dataset.ids[i]
        assert torch.equal(first["image"], second["image"])
    # Over many seeds, both captions of a two-caption image are drawn.
    dataset, i = _two_caption_dataset(built)
    assert {dataset.item(i, caption_seed=s)["caption"] for s in range(50)} == set(dataset.captions[i])


def test_random_caption_per_draw(built):
    dataset, i = _two_caption_dataset(built)
    torch.manual_seed(0)
    drawn = [dataset[i]["caption"] for _ in range(60)]
    assert set(drawn) == set(dataset.captions[i])
    # The draw follows torch's RNG, so reseeding repeats it.
    torch.manual_seed(0)
    assert [dataset[i]["caption"] for _ in range(60)] == drawn


def test_dataset_pickles(built):
    dataset = ImageCaptionDataset(built["out"], "train")
    before = [dataset.item(i, caption_seed=7) for i in range(len(dataset))]  # opens the memory maps
    assert dataset._shards
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._shards == {}  # memory maps are reopened, not pickled
    assert len(clone) == len(dataset)
    for i, expected in enumerate(before):
        got = clone.item(i, caption_seed=7)
        assert got["caption"] == expected["caption"] and got["id"] == expected["id"]
        assert torch.equal(got["image"], expected["image"])


def test_dataloader_batches(built):
    dataset = ImageCaptionDataset(built["out"], "train")
    loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=0)
    seen = 0
    for batch in loader:
        n = len(batch["caption"])
        assert batch["image"].dtype == torch.uint8
        assert tuple(batch["image"].shape) == (n, 3, R, R)
        assert all(isinstance(c, str) and c for c in batch["caption"])
        assert batch["id"].tolist() == dataset.ids[seen: seen + n]
        seen += n
    assert seen == len(dataset)


def test_verify_passes_on_intact_dataset(built):
    assert len(ImageCaptionDataset(built["out"], "train", verify=True)) == built["splits"]["train"]


def test_schema_2_refused(built, tmp_path):
    copy = _copy(built, tmp_path)
    manifest_path = copy / "dataset.yaml"
    data = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    data["schema"] = 2
    manifest_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(ManifestError, match="schema 2") as info:
        ImageCaptionDataset(copy, "train")
    assert str(manifest_path) in str(info.value)


def test_missing_required_key_refused(built, tmp_path):
    copy = _copy(built, tmp_path)
    manifest_path = copy / "dataset.yaml"
    data = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    del data["index"]["sha256"]
    manifest_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(ManifestError, match="'index.sha256'"):
        ImageCaptionDataset(copy, "train")


def test_verify_detects_modified_shard(built, tmp_path):
    copy = _copy(built, tmp_path)
    shard = copy / built["manifest"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one pixel changed, size unchanged
    shard.write_bytes(bytes(data))
    ImageCaptionDataset(copy, "train", verify=False)  # only an explicit verify=False skips the check
    with pytest.raises(IntegrityError, match="does not match") as info:
        ImageCaptionDataset(copy, "train")  # verified by default
    assert shard.name in str(info.value)


def test_verify_detects_modified_index(built, tmp_path):
    copy = _copy(built, tmp_path)
    with open(copy / "index.jsonl", "a", encoding="utf-8") as f:
        f.write("\n")
    with pytest.raises(IntegrityError, match="index.jsonl"):
        ImageCaptionDataset(copy, "train")


def test_index_shard_mismatch_detected(built, tmp_path):
    copy = _copy(built, tmp_path)
    index_path = copy / "index.jsonl"
    rows = [json.loads(line) for line in index_path.read_text(encoding="utf-8").splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    train[0]["row"], train[1]["row"] = train[1]["row"], train[0]["row"]  # point at each other's pixels
    index_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(IntegrityError, match="index.jsonl"):  # the edited index no longer matches its sha256
        ImageCaptionDataset(copy, "train")
    dataset = ImageCaptionDataset(copy, "train", verify=False)  # the row check still guards an unverified load
    with pytest.raises(ManifestError, match="inconsistent"):
        dataset.image(0)
