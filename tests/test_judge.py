"""Tests for the emoji-scenes compositional judge (the vgen/evaluate/judge package, vgen/evaluate/twemoji.py).

The judge is trained once (about a minute) into the pytest cache (.pytest_cache/d/vgen-judge) and
reused by later runs: its cache key covers the judge package's source, the settings and the Twemoji files,
so a change to any of them trains it again.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vgen.data import emoji_scenes as es
from vgen.data.transforms import center_crop_resize
from vgen.errors import MissingDependencyError, UsageError
from vgen.evaluate import judge as J
from vgen.evaluate.twemoji import load_twemoji

# Floors just below what the judge measures on 1000 + 333 Noto scenes of seed 1000003 (`calibration`
# in its judge.yaml): top guess right on 0.687 of crops, the object present (top 3) on 0.856 and a
# random wrong one on 0.069; real scenes accepted 0.757 (pairs 0.723); order of the two named objects
# 0.998; swapped prompts rejected 1.0, prompts with a wrong object 0.943.
CROP_ACCURACY_FLOOR = 0.65
CROP_PRESENT_FLOOR = 0.82
WRONG_PRESENT_CEILING = 0.1
REAL_PAIRS_ACCEPTED_FLOOR = 0.68
ORDER_ACCURACY_FLOOR = 0.97


def _twemoji_or_skip():
    try:
        return load_twemoji()
    except MissingDependencyError as e:
        pytest.skip(f"Twemoji is not installed (make setup): {e}")


@pytest.fixture(scope="module")
def renderer() -> es.SceneRenderer:
    try:
        return es.SceneRenderer()
    except MissingDependencyError as e:
        pytest.skip(f"the Noto emoji font is not installed: {e}")


@pytest.fixture(scope="module")
def judge(pytestconfig, renderer) -> J.Judge:
    _twemoji_or_skip()
    return J.load_judge(cache_dir=pytestconfig.cache.mkdir("vgen-judge"))


def _scene(relation: str, placed: list[tuple[str, es.Box]]) -> es.Scene:
    placements = tuple(es.Placement(noun, box, 0.9, 0, 0) for noun, box in placed)
    return es.Scene(0, relation, tuple(n for n, _ in placed), "", placements)


def _image(renderer: es.SceneRenderer, relation: str, placed: list[tuple[str, es.Box]], size: int = 32):
    return torch.from_numpy(center_crop_resize(renderer.render(_scene(relation, placed)), size))


def test_twemoji_files_for_every_object():
    twemoji = _twemoji_or_skip()
    assert twemoji.version == "16.0.0" and len(twemoji.files) == 36
    # Emoji with U+FE0F: the package names the file with it; without it (U+26F5) the plain name.
    assert twemoji.files["sun"].name == "2600-fe0f.png" and twemoji.files["sailboat"].name == "26f5.png"
    assert twemoji.files["cat"].name == "1f408.png"
    assert all(p.is_file() for ps in twemoji.variants.values() for p in ps)
    glyphs = twemoji.glyphs()
    assert all(images[0].mode == "RGBA" and images[0].getchannel("A").getbbox() == (0, 0, *images[0].size)
               for images in glyphs.values())


def test_missing_twemoji_is_a_missing_dependency(tmp_path, monkeypatch):
    monkeypatch.setenv("VGEN_TWEMOJI_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(MissingDependencyError, match="make setup"):
        J.load_judge(cache_dir=tmp_path / "cache")
    with pytest.raises(MissingDependencyError, match="npm install"):
        J.load_judge(cache_dir=tmp_path / "cache", twemoji_dir=tmp_path)
    assert not (tmp_path / "cache").exists()


def test_calibration_on_real_noto_scenes(judge):
    cal = judge.info["calibration"]
    assert cal["seed"] == J.CALIBRATION_SEED != 0 and cal["scenes"] == 1000
    assert cal["crop_accuracy"] >= CROP_ACCURACY_FLOOR, cal
    assert cal["crop_present"] >= CROP_PRESENT_FLOOR and cal["crop_wrong_object_present"] <= WRONG_PRESENT_CEILING, cal
    assert cal["two_object"] >= REAL_PAIRS_ACCEPTED_FLOOR and cal["wrong_object_prompt_rejected"] >= 0.9, cal
    assert cal["order"] >= ORDER_ACCURACY_FLOOR and cal["order_held_out_pairs"] >= ORDER_ACCURACY_FLOOR, cal
    assert cal["swapped_prompt_rejected"] >= 0.97 and cal["swapped_prompt_order_rejected"] >= 0.97, cal
    assert set(cal["by_relation"]) == set(es.RELATIONS)
    assert judge.info["trained_on"]["version"] == "16.0.0" and len(judge.info["weights"]["sha256"]) == 64


def test_swapped_image_is_judged_wrong(judge, renderer):
    # "a cat above a dog", judged against itself and against "a dog above a cat".
    image = _image(renderer, "above", [("cat", es.TOP), ("dog", es.BOTTOM)])
    right, swapped = judge.judge(torch.stack([image, image]), ["a cat above a dog", "a dog above a cat"])
    assert right.order_correct is True and swapped.order_correct is False
    assert not swapped.correct and swapped.expected == ("dog", "cat") and swapped.boxes == (es.TOP, es.BOTTOM)
    # Objects the judge reads well: the strict verdict (each box's most likely object) flips too.
    image = _image(renderer, "left", [("apple", es.LEFT), ("car", es.RIGHT)])
    right, swapped = judge.judge(torch.stack([image, image]), ["an apple to the left of a car",
                                                               "a car to the left of an apple"])
    assert right.correct and right.predicted == ("apple", "car") and right.order_correct
    assert not swapped.correct and swapped.expected == ("car", "apple")
    assert swapped.predicted == ("apple", "car")  # what is where does not depend on the prompt
    assert swapped.order_correct is False


def test_and_accepts_both_orders_and_two_needs_both(judge, renderer):
    pair = _image(renderer, "and", [("apple", es.LEFT), ("car", es.RIGHT)])
    twins = _image(renderer, "two", [("car", es.LEFT), ("car", es.RIGHT)])
    verdicts = judge.judge(torch.stack([pair, pair, twins, pair]),
                           ["an apple and a car", "a car and an apple", "two cars", "two cars"])
    assert [v.correct for v in verdicts] == [True, True, True, False]
    assert all(v.order_correct is None for v in verdicts)
    single = _image(renderer, "single", [("bus", es.CENTER)])
    (verdict,) = judge.judge(single[None], ["a bus"])
    assert verdict.correct and verdict.boxes == (es.CENTER,)


def test_other_resolutions_are_scaled(judge, renderer):
    placed = [("apple", es.TOP), ("car", es.BOTTOM)]
    images = [_image(renderer, "above", placed, size) for size in (32, 64)]
    verdicts = [judge.judge(image[None], ["an apple above a car"])[0] for image in images]
    assert all(v.correct for v in verdicts)
    with pytest.raises(UsageError, match="not in the"):
        judge.judge(images[0][None], ["a cat riding a dog"])
    with pytest.raises(UsageError, match="uint8"):
        judge.judge(images[0][None].float(), ["an apple above a car"])


def test_cache_is_reused(judge, pytestconfig, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached judge should have been used")

    monkeypatch.setattr("vgen.evaluate.judge.cache.train_network", no_training)
    again = J.load_judge(cache_dir=pytestconfig.cache.mkdir("vgen-judge"))
    assert again.info["source"] == "cache" and again.id == judge.id
    assert again.info["weights"]["sha256"] == judge.info["weights"]["sha256"]
    x = torch.rand(4, 3, J.CROP, J.CROP)
    assert torch.equal(again.probabilities(x), judge.probabilities(x))


def _verdict(relation, nouns, correct, order=None):
    held = relation in es.PAIR_RELATIONS and es.is_held_out(*nouns)
    return J.Verdict("", relation, tuple(nouns), (), (), (), (), correct, order, held)


def test_compositional_accuracy_summary():
    held = next((a, b) for a in J.NOUNS for b in J.NOUNS if a != b and es.is_held_out(a, b))
    seen = ("cat", "dog")
    assert not es.is_held_out(*seen)
    verdicts = [_verdict("single", ("cat",), True), _verdict("single", ("dog",), False),
                _verdict("above", seen, True, True), _verdict("above", held, False, True),
                _verdict("left", held, False, False), _verdict("and", seen, True),
                _verdict("two", ("cat", "cat"), True)]
    acc = J.compositional_accuracy(verdicts)
    assert acc["single_object"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert acc["two_object"] == {"accuracy": 0.5, "correct": 2, "n": 4}
    assert acc["two_object_seen_pairs"]["accuracy"] == 1.0 and acc["two_object_held_out_pairs"]["n"] == 2
    assert acc["two_object_held_out_pairs"]["accuracy"] == 0.0
    assert acc["by_relation"]["two"]["accuracy"] == 1.0 and "right" not in acc["by_relation"]
    assert acc["order"] == {"accuracy": round(2 / 3, 4), "correct": 2, "n": 3}
    assert acc["order_held_out_pairs"]["accuracy"] == 0.5
    assert np.isclose(acc["order_by_relation"]["above"]["accuracy"], 1.0)
