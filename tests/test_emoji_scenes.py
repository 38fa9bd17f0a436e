"""Tests for the emoji-scenes dataset (../shared/emoji-scenes.md)."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from vgen.data.emoji_scenes import (
    BOTTOM, LEFT, OBJECT_BY_NOUN, OBJECTS, PAIR_RELATIONS, RELATIONS, RIGHT, TOP, Placement, Scene,
    SceneRenderer, benchmark_prompts, caption_for, is_held_out, parse_caption, scene_spec,
    write_emoji_scenes, write_prompts,
)
from vgen.errors import MissingDependencyError, UsageError


@pytest.fixture(scope="module")
def renderer() -> SceneRenderer:
    return SceneRenderer()


def test_objects_follow_the_spec():
    assert len(OBJECTS) == 36 == len(OBJECT_BY_NOUN)
    assert [o.noun for o in OBJECTS[:3]] == ["cat", "dog", "rabbit"] and OBJECTS[-1].noun == "soccer ball"
    assert OBJECT_BY_NOUN["sun"].emoji == "\u2600\ufe0f" and OBJECT_BY_NOUN["car"].emoji == "\U0001f697"
    assert sum(RELATIONS.values()) == pytest.approx(1.0)
    assert list(RELATIONS) == ["single", "and", "left", "right", "above", "below", "two"]


@pytest.mark.parametrize("relation, nouns, caption", [
    ("single", ("apple",), "an apple"),
    ("single", ("airplane",), "an airplane"),
    ("single", ("umbrella",), "an umbrella"),
    ("single", ("grapes",), "some grapes"),
    ("single", ("soccer ball",), "a soccer ball"),
    ("two", ("butterfly",), "two butterflies"),
    ("two", ("strawberry",), "two strawberries"),
    ("two", ("cactus",), "two cacti"),
    ("two", ("bus",), "two buses"),
    ("two", ("fish",), "two fish"),
    ("two", ("cat",), "two cats"),
    ("two", ("soccer ball",), "two soccer balls"),
    ("and", ("cat", "dog"), "a cat and a dog"),
    ("left", ("cat", "dog"), "a cat to the left of a dog"),
    ("right", ("apple", "grapes"), "an apple to the right of some grapes"),
    ("above", ("cat", "dog"), "a cat above a dog"),
    ("below", ("soccer ball", "umbrella"), "a soccer ball below an umbrella"),
])
def test_exact_captions(relation, nouns, caption):
    assert caption_for(relation, nouns) == caption
    assert parse_caption(caption) == (relation, nouns)


def test_grammar_round_trip_for_every_relation_and_object():
    nouns = [o.noun for o in OBJECTS]
    for relation in RELATIONS:
        if relation in ("single", "two"):
            cases = [(n,) for n in nouns if not (relation == "two" and n == "grapes")]
        else:
            cases = list(itertools.permutations(nouns, 2))
        for case in cases:
            assert parse_caption(caption_for(relation, case)) == (relation, case)


@pytest.mark.parametrize("text", ["", "a dragon", "two grapes", "a cat and a cat", "a cat beside a dog",
                                  "a cat and a dog and a pig", "cat", "two cat", "A cat"])
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_caption_for_rejects_bad_input():
    for relation, nouns in [("two", ("grapes",)), ("and", ("cat", "cat")), ("single", ("dragon",)),
                            ("left", ("cat",)), ("sideways", ("cat", "dog"))]:
        with pytest.raises(ValueError):
            caption_for(relation, nouns)


def test_held_out_rule_matches_the_spec():
    import hashlib

    a, b = "soccer ball", "cat"
    expected = int(hashlib.sha256(b"cat|soccer ball").hexdigest(), 16) % 10 == 0
    assert is_held_out(a, b) == is_held_out(b, a) == expected
    held = [p for p in itertools.combinations([o.noun for o in OBJECTS], 2) if is_held_out(*p)]
    assert 0 < len(held) < 630 * 0.2  # about a tenth of the 630 unordered pairs


def test_relation_shares_and_scene_rules():
    scenes = [scene_spec(0, i) for i in range(5000)]
    counts = Counter(s.relation for s in scenes)
    for relation, share in RELATIONS.items():
        assert abs(counts[relation] / len(scenes) - share) < 0.02, (relation, counts)
    boxes = {"single": {((12, 12, 52, 52),)}, "left": {(LEFT, RIGHT)}, "right": {(RIGHT, LEFT)},
             "above": {(TOP, BOTTOM)}, "below": {(BOTTOM, TOP)}, "two": {(LEFT, RIGHT)},
             "and": {(LEFT, RIGHT), (RIGHT, LEFT)}}
    and_orders = Counter()
    for s in scenes:
        assert s.caption == caption_for(s.relation, s.nouns)
        assert tuple(p.box for p in s.placements) in boxes[s.relation]
        assert all(0.8 <= p.scale <= 1.0 and -3 <= p.dx <= 3 and -3 <= p.dy <= 3 for p in s.placements)
        if s.relation in PAIR_RELATIONS:
            assert s.nouns[0] != s.nouns[1] and not is_held_out(*s.nouns)
            assert tuple(p.noun for p in s.placements) == s.nouns
        if s.relation == "and":
            and_orders[s.placements[0].box] += 1
        if s.relation == "two":
            assert s.nouns != ("grapes",) and [p.noun for p in s.placements] == list(s.nouns) * 2
    assert min(and_orders.values()) > 0.4 * sum(and_orders.values())  # "and" order is random
    assert {p.dx for s in scenes for p in s.placements} == set(range(-3, 4))


def test_determinism(renderer):
    a, b = scene_spec(7, 123), scene_spec(7, 123)
    assert a == b
    assert np.array_equal(np.asarray(renderer.render(a)), np.asarray(SceneRenderer().render(b)))
    assert [scene_spec(7, i) for i in range(20)] != [scene_spec(8, i) for i in range(20)]
    assert scene_spec(7, 1) != scene_spec(7, 2)


def _nonwhite(img) -> np.ndarray:
    return (np.asarray(img) < 250).any(axis=2)


def test_every_object_renders_in_its_box(renderer):
    nouns = [o.noun for o in OBJECTS]
    glyphs = {n: renderer.glyph(n) for n in nouns}
    font_advance = 136  # Noto Color Emoji's advance at size 109: one glyph, not glyph + FE0F
    assert all(0 < g.width <= font_advance and 0 < g.height <= font_advance for g in glyphs.values())
    assert len({g.tobytes() for g in glyphs.values()}) == 36  # 36 distinct pictures
    for x, y in zip(nouns, nouns[1:] + nouns[:1]):
        scene = Scene(0, "above", (x, y), caption_for("above", (x, y)),
                      (Placement(x, TOP, 1.0, 0, 0), Placement(y, BOTTOM, 1.0, 0, 0)))
        img = renderer.render(scene)
        assert img.mode == "RGB" and img.size == (64, 64)
        ink = _nonwhite(img)
        top, bottom = ink[2:31, 17:46], ink[33:62, 17:46]
        assert top.mean() > 0.15 and bottom.mean() > 0.15, (x, y, top.mean(), bottom.mean())
        outside = ink.copy()
        outside[2:31, 17:46] = outside[33:62, 17:46] = False
        assert not outside.any(), (x, y)  # nothing leaks out of the boxes without a shift
        # the glyph fills its box along its longer side
        rows, cols = np.nonzero(ink[2:31, 17:46])
        assert max(np.ptp(rows), np.ptp(cols)) + 1 >= 27, x


def test_write_emoji_scenes_excludes_held_out_pairs(tmp_path):
    calls = []
    out = tmp_path / "raw"
    summary = write_emoji_scenes(out, 1500, seed=3, progress=calls.append)
    assert summary["count"] == 1500 and summary["seed"] == 3 and summary["out_dir"] == str(out)
    assert sum(calls) == 1500 and sum(summary["relations"].values()) == 1500
    texts = sorted(out.glob("*.txt"))
    assert len(texts) == len(list(out.glob("*.png"))) == 1500
    assert texts[0].name == "000000.txt" and texts[-1].name == "001499.txt"
    seen = Counter()
    for path in texts:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n") and text.count("\n") == 1
        relation, nouns = parse_caption(text[:-1])
        seen[relation] += 1
        assert len(nouns) == 1 or not is_held_out(*nouns), text
    assert seen == Counter(summary["relations"])
    assert not list(tmp_path.glob(".*partial*"))

    heldout = benchmark_prompts("heldout", 10)
    parsed = [parse_caption(p) for p in heldout]
    assert len(heldout) == 50 and all(is_held_out(*nouns) for _, nouns in parsed)
    assert {r for r, _ in parsed} == set(PAIR_RELATIONS)


def test_benchmark_prompts(tmp_path):
    train = benchmark_prompts("train", 50)
    parsed = [parse_caption(p) for p in train]
    per = Counter(r for r, _ in parsed)
    assert per == {"single": 36, "two": 35, **{r: 50 for r in PAIR_RELATIONS}}
    assert len(set(train)) == len(train)
    assert not any(len(n) == 2 and is_held_out(*n) for _, n in parsed)
    assert benchmark_prompts("train", 50) == train and benchmark_prompts("train", 50, seed=1) != train
    with pytest.raises(UsageError):
        benchmark_prompts("test", 5)
    write_prompts(tmp_path / "p.txt", train[:3])
    assert (tmp_path / "p.txt").read_text().splitlines() == train[:3]


def test_overwrite_replaces_only_earlier_scenes(tmp_path):
    out = tmp_path / "raw"
    write_emoji_scenes(out, 5)
    with pytest.raises(UsageError, match="--overwrite") as err:
        write_emoji_scenes(out, 3)
    assert str(out) in str(err.value)
    write_emoji_scenes(out, 3, overwrite=True)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == [f"00000{i}.{e}" for i in range(3) for e in ("png", "txt")]


def test_overwrite_never_deletes_a_foreign_folder(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="not an emoji-scenes dir") as err:
            write_emoji_scenes(out, 3, overwrite=overwrite)
        assert str(out) in str(err.value) and (out / "keep.txt").read_text() == "x"


def test_missing_font_names_the_debian_package(tmp_path, monkeypatch):
    with pytest.raises(MissingDependencyError, match="fonts-noto-color-emoji"):
        SceneRenderer(str(tmp_path / "nope.ttf"))
    monkeypatch.setenv("VGEN_EMOJI_FONT", str(tmp_path / "nope.ttf"))
    with pytest.raises(MissingDependencyError, match="fonts-noto-color-emoji"):
        SceneRenderer()


def test_missing_raqm_names_the_debian_packages(monkeypatch):
    from PIL import features

    monkeypatch.setattr(features, "check", lambda name: False if name == "raqm" else True)
    with pytest.raises(MissingDependencyError, match="libraqm0 libfribidi0"):
        SceneRenderer()


def test_new_object_scenes_teach_the_new_object_and_replay_the_rest(renderer):
    from vgen.data.emoji_scenes import NEW_OBJECT_BY_NOUN, new_object_scene_spec

    scenes = [new_object_scene_spec(4, i, ["rocket", "star"], share=0.5) for i in range(2000)]
    new = [s for s in scenes if set(s.nouns) & {"rocket", "star"}]
    replay = [s for s in scenes if not set(s.nouns) & {"rocket", "star"}]
    assert 0.45 < len(new) / len(scenes) < 0.55
    assert all(s == scene_spec(4, s.index) for s in replay)  # the default scenes exactly
    assert {s.relation for s in new} == set(RELATIONS)
    pairs = [s for s in new if len(s.nouns) == 2]
    assert all(sum(n in NEW_OBJECT_BY_NOUN for n in s.nouns) == 1 for s in pairs)
    assert 0.4 < sum(s.nouns[0] in NEW_OBJECT_BY_NOUN for s in pairs) / len(pairs) < 0.6  # both orders
    assert caption_for("two", ("rocket",)) == "two rockets" and caption_for("above", ("star", "cat")) == \
        "a star above a cat"
    assert new_object_scene_spec(4, 7, ["rocket"], 1.0) == new_object_scene_spec(4, 7, ["rocket"], 1.0)
    teaching = SceneRenderer(new_nouns=["rocket"])
    image = np.asarray(teaching.render(next(s for s in new if s.nouns == ("rocket",) and s.relation == "single")))
    assert (image < 200).any()  # the rocket is drawn
    with pytest.raises(KeyError):
        renderer.glyph("rocket")  # a default renderer knows only the 36


def test_write_emoji_scenes_with_new_objects(tmp_path):
    out = tmp_path / "rockets"
    summary = write_emoji_scenes(out, 40, seed=1, new_objects=["rocket"], new_share=1.0)
    assert summary["new_objects"] == ["rocket"]
    assert all("rocket" in p.read_text() for p in out.glob("*.txt"))
    with pytest.raises(UsageError, match="'dragon' is not one of the new objects"):
        write_emoji_scenes(tmp_path / "x", 5, new_objects=["dragon"])
    with pytest.raises(UsageError, match="--objects-share"):
        write_emoji_scenes(tmp_path / "y", 5, new_objects=["rocket"], new_share=0.0)


def test_cli_objects_options(tmp_path, vgen_cli):
    result = vgen_cli("data", "emoji-scenes", tmp_path / "a", "--count", "5", "--objects-share", "0.5")
    assert result.exit_code == 2 and "only with --objects" in result.stderr
    result = vgen_cli("data", "emoji-scenes", tmp_path / "b", "--count", "12", "--objects", "rocket,star", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["new_objects"] == ["rocket", "star"]
