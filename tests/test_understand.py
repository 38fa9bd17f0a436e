"""The understanding half: zero-shot classification and search with a CLIP (vgen classify, vgen search)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.test_train import run, vgen_train_cmd, write_config
from tests.train_fixtures import COLOURS, colour_dataset, tiny_text_encoder
from vgen.errors import UsageError
from vgen.understand.classify import ZeroShotClassifier, accuracy, parse_labels, template_set
from vgen.understand.search import SearchIndex, text_to_image_recall

CLIP = ["kind=clip", "clip.embed_dim=32", "clip.patch_size=8", "clip.vision_width=32", "clip.vision_layers=1",
        "clip.vision_head_width=16", "clip.text_width=32", "clip.text_layers=1", "clip.text_heads=2",
        "clip.context_length=8", "train.steps=40", "train.batch_size=32", "train.precision=fp32",
        "train.checkpoint_every=40", "train.val_every=40", "train.val_images=16", "optim.lr=3e-3",
        "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CLIP trained for 40 steps on squares whose caption is their colour."""
    root = tmp_path_factory.mktemp("understand")
    data = colour_dataset(root)
    out = root / "clip"
    result = run(vgen_train_cmd(write_config(root / "clip.yaml", CLIP), data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "clip": f"run:{out}", "root": root}


# --- the numerical core ------------------------------------------------------------------------


class _Prompts(list):
    def to(self, device):
        return self


class _FakeText:
    """A text tower whose embedding of a prompt is a fixed vector per prompt."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table

    def encode_text(self, tokens, normalize=False):
        out = torch.stack([self.table[t] for t in tokens])
        return F.normalize(out, dim=-1) if normalize else out


def test_classifier_averages_normalised_template_embeddings():
    """CLIP's prompt ensemble: per label, the mean of the normalised template embeddings, normalised."""
    table = {"a cat": torch.tensor([3.0, 0, 0]), "the cat": torch.tensor([0, 1.0, 0]),
             "a dog": torch.tensor([0, 0, 2.0]), "the dog": torch.tensor([0, 0, 5.0])}

    class Clip:
        model, tokenizer, mean = _FakeText(table), staticmethod(_Prompts), torch.zeros(1)

    classifier = ZeroShotClassifier.build(Clip, ["cat", "dog"], ["a {}", "the {}"])
    expected = torch.tensor([[2 ** -0.5, 0.0], [2 ** -0.5, 0.0], [0.0, 1.0]])
    assert torch.allclose(classifier.weights, expected, atol=1e-6)
    image = F.normalize(torch.tensor([[1.0, 1.0, 0.5]]), dim=-1)
    logits = 100 * image @ expected
    assert torch.allclose(classifier.probabilities(image), logits.softmax(-1), atol=1e-6)
    assert [label for label, _ in classifier.top(image, 5)[0]] == ["cat", "dog"]


def test_accuracy_counts_only_images_whose_caption_is_a_label():
    predictions = [[("a cat", 0.9), ("a dog", 0.1)], [("a cat", 0.6), ("a dog", 0.4)], [("a dog", 1.0), ("a cat", 0.0)]]
    truths = [("a cat",), ("a dog",), ("a cat and a dog",)]
    assert accuracy(predictions, truths, ["a cat", "a dog"]) == {"n": 2, "top1": 0.5, "top2": 1.0}


def test_recall_counts_a_hit_when_an_image_with_the_caption_is_among_the_k_nearest():
    # Three images on the axes; the texts: "x" points at image 0, "y" halfway between 1 and 2.
    index = SearchIndex(None, torch.eye(3), ["val/0", "val/1", "val/2"], [0, 1, 2], [["x"], ["y"], ["z"]], {}, False)

    class Clip:
        @staticmethod
        def encode_text(captions):
            table = {"x": [1.0, 0, 0], "y": [0, 0.6, 0.8], "z": [0, 0, 1.0]}
            return torch.tensor([table[c] for c in captions])

    assert text_to_image_recall(index, Clip, ks=(1, 2)) == {"queries": 3, "images": 3, "recall@1": 2 / 3,
                                                           "recall@2": 1.0}
    hits = index.search(torch.tensor([0, 0.6, 0.8]), 2)
    assert [(h.image, round(h.score, 3)) for h in hits] == [("val/2", 0.8), ("val/1", 0.6)]


def test_labels_and_templates_are_checked():
    assert parse_labels(" a cat, a dog ,", None) == ["a cat", "a dog"]
    for bad, message in ((("a cat", None), "at least 2"), (("a cat,a cat", None), "given twice"),
                         ((None, None), "--labels")):
        with pytest.raises(UsageError, match=message):
            parse_labels(*bad)
    assert len(template_set(["imagenet"])) == 80 and template_set([]) == ("{}",)
    with pytest.raises(UsageError, match="one '{}'"):
        template_set(["a photo of {0}"])


# --- the commands on a trained CLIP --------------------------------------------------------------


@pytest.mark.slow
def test_classify_reads_colours_zero_shot(trained, vgen_cli):
    """The CLIP has seen each square with its colour's name: zero-shot it names the colour of the val
    squares far above chance (1/6), and --json gives one line per image, then the summary."""
    labels = ",".join(COLOURS)
    result = vgen_cli("classify", trained["data"], "--clip", trained["clip"], "--labels", labels, "--json")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    summary = lines[-1]["summary"]
    assert len(lines) - 1 == summary["images"] and summary["accuracy"]["n"] == summary["images"]
    assert summary["accuracy"]["top1"] >= 0.6, summary
    assert all(len(line["top"]) == 5 and abs(sum(t["p"] for t in line["top"]) - 1) < 0.05 for line in lines[:-1])


@pytest.mark.slow
def test_classify_files_and_folders_skips_unreadable_ones(trained, vgen_cli, tmp_path):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = np.full((40, 24, 3), 255, np.uint8)  # not square, not the CLIP's size
        image[10:30, 4:20] = rgb
        Image.fromarray(image).save(folder / ("sub" if i % 2 else ".") / f"{name}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    result = vgen_cli("classify", folder, "--clip", trained["clip"], "--labels", ",".join(COLOURS), "--json")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"].rsplit("/", 1)[-1] for line in lines[:-1]] == \
        sorted(f"{n}.png" for i, n in enumerate(COLOURS) if i % 2 == 0) + sorted(f"{n}.png" for i, n in enumerate(COLOURS) if i % 2)
    assert lines[-1]["summary"]["unreadable"][0]["image"].endswith("broken.png")
    assert "skipped" in result.stderr and lines[-1]["summary"]["accuracy"] == {"n": 0}


@pytest.mark.slow
def test_search_finds_the_captioned_images_and_caches_the_index(trained, vgen_cli, tmp_path):
    index = vgen_cli("search", "index", trained["data"], "--clip", trained["clip"], "--json")
    assert index.exit_code == 0 and json.loads(index.stdout)["from_cache"] is False, index.stderr
    again = vgen_cli("search", "index", trained["data"], "--clip", trained["clip"], "--json")
    assert json.loads(again.stdout)["from_cache"] is True
    result = vgen_cli("search", "eval", trained["data"], "--clip", trained["clip"], "--split", "all", "--json")
    assert result.exit_code == 0, result.stderr
    recall = json.loads(result.stdout)
    assert recall["queries"] == 6 and recall["images"] == json.loads(index.stdout)["images"], recall
    assert recall["recall@1"] >= 0.8, recall
    grid = tmp_path / "red.png"
    query = vgen_cli("search", "query", trained["data"], "red", "--clip", trained["clip"], "-k", "4",
                     "--grid", grid, "--json")
    assert query.exit_code == 0, query.stderr
    hits = json.loads(query.stdout)["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and sum(h["captions"] == ["red"] for h in hits) >= 3, hits
    assert Image.open(grid).size[0] >= 4 * 128
    sample = tmp_path / "blue.png"
    image = np.full((16, 16, 3), 255, np.uint8)
    image[3:13, 3:13] = COLOURS["blue"]
    Image.fromarray(image).save(sample)
    by_image = vgen_cli("search", "query", trained["data"], "--image", sample, "--clip", trained["clip"], "--json")
    assert by_image.exit_code == 0 and json.loads(by_image.stdout)["results"][0]["captions"] == ["blue"]


def test_understanding_commands_refuse_bad_input(vgen_cli, tmp_path):
    clip = f"local-dir:{tiny_text_encoder(tmp_path)}"
    cases = [
        (("classify", tmp_path / "missing", "--clip", clip, "--labels", "a,b"), "no such file"),
        (("classify", tmp_path, "--clip", clip, "--labels", "a"), "at least 2 labels"),
        (("classify", tmp_path, "--clip", "random", "--labels", "a,b"), "untrained"),
        (("search", "query", tmp_path, "--clip", clip), "TEXT"),
        (("search", "query", tmp_path, "a cat", "--image", tmp_path / "x.png", "--clip", clip), "one of them"),
    ]
    for args, message in cases:
        result = vgen_cli(*args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert result.stdout == ""
