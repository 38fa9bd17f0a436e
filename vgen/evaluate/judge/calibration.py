"""Calibration on real Noto scenes: how far to trust the judge (stored with it in judge.yaml)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from vgen.data import emoji_scenes as es
from vgen.evaluate.judge.geometry import crop_boxes, to_judge_resolution, to_resolution
from vgen.evaluate.judge.settings import NOUNS, RESOLUTION
from vgen.evaluate.judge.verdicts import ORDERED_RELATIONS, PRESENCE_TOP_K, Judge, compositional_accuracy, objects_present

CALIBRATION_SEED = 1000003  # Noto scenes for calibration; the dataset's default seed is 0


def _held_out_scene(seed: int, index: int) -> es.Scene:
    """A scene of a held-out pair with the spec's geometry (the dataset never draws these)."""
    rng = random.Random(f"vgen-judge/held-out/{seed}/{index}")
    relation = rng.choice(es.PAIR_RELATIONS)
    nouns = rng.choice(es.HELDOUT_PAIRS)
    boxes = es.BOXES[relation]
    if relation == "and" and rng.random() < 0.5:
        boxes = boxes[::-1]
    placements = tuple(es.Placement(n, box, rng.uniform(0.8, 1.0), rng.randint(-3, 3), rng.randint(-3, 3))
                       for n, box in zip(nouns, boxes))
    return es.Scene(index, relation, nouns, es.caption_for(relation, nouns), placements)


def _share(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _with_wrong_object(scene: es.Scene, rng: random.Random) -> str:
    """The scene's caption with one of its objects replaced by a random other object."""
    nouns = list(scene.nouns)
    k = rng.randrange(len(nouns))
    choices = [n for n in NOUNS if n not in nouns and (scene.relation != "two" or n in es.COUNTABLE)]
    nouns[k] = rng.choice(choices)
    return es.caption_for(scene.relation, tuple(nouns))


def _swapped(scene: es.Scene) -> str | None:
    if scene.relation not in ORDERED_RELATIONS:
        return None
    return es.caption_for(scene.relation, scene.nouns[::-1])


def calibrate(judge: Judge, scenes: int = 1000, seed: int = CALIBRATION_SEED,
              renderer: es.SceneRenderer | None = None, held_out_scenes: int | None = None) -> dict[str, Any]:
    """Judge `scenes` fresh Noto scenes (the dataset's own style and geometry, seed `seed`; the dataset's
    default seed is 0) at 32 px against their captions, and against swapped captions: how often the
    judge accepts real, correct images, and rejects them when the prompt has the order reversed."""
    renderer = renderer or es.SceneRenderer()
    specs = [es.scene_spec(seed, i) for i in range(scenes)]
    held_n = max(1, scenes // 3) if held_out_scenes is None else held_out_scenes
    held_specs = [_held_out_scene(seed, i) for i in range(held_n)]
    images = torch.stack([to_resolution(renderer.render(s)) for s in specs + held_specs])
    verdicts = judge.judge(images, [s.caption for s in specs + held_specs])
    crops_ok: dict[str, list[bool]] = {n: [] for n in NOUNS}
    confusions: Counter = Counter()
    for scene, v in zip(specs + held_specs, verdicts):
        seen = dict(zip(v.boxes, v.predicted))
        for p in scene.placements:
            crops_ok[p.noun].append(seen[p.box] == p.noun)
            if seen[p.box] != p.noun:
                confusions[f"{p.noun} -> {seen[p.box]}"] += 1
    # The presence test on single crops: the right object, and a random wrong one, within the top k.
    rng = random.Random(f"vgen-judge/wrong/{seed}")
    by_box: dict[es.Box, list[tuple[int, str]]] = {}
    for i, scene in enumerate(specs + held_specs):
        for p in scene.placements:
            by_box.setdefault(p.box, []).append((i, p.noun))
    right_in, wrong_in = [], []
    x = to_judge_resolution(images)
    for box, rows in by_box.items():
        probs = judge.probabilities(crop_boxes(x[[i for i, _ in rows]], box))
        for (_, noun), p in zip(rows, probs):
            other = rng.choice([n for n in NOUNS if n != noun])
            right_in.append(objects_present([p], [noun])[0])
            wrong_in.append(objects_present([p], [other])[0])
    # Whole prompts with one object replaced by another: how often a wrong prompt is accepted.
    wrong_prompts = [_with_wrong_object(s, rng) for s in specs]
    wrong = judge.judge(images[:scenes], wrong_prompts)
    swap_rows = [i for i, s in enumerate(specs) if _swapped(s) is not None]
    swapped = judge.judge(images[swap_rows], [_swapped(specs[i]) for i in swap_rows])
    acc = compositional_accuracy(verdicts[:scenes])
    held_acc = compositional_accuracy(verdicts[scenes:])
    all_crops = [ok for oks in crops_ok.values() for ok in oks]
    return {
        "style": "Noto Color Emoji (the dataset's style), scenes of the spec's geometry",
        "font": renderer.font_path,
        "seed": seed,
        "scenes": scenes,
        "held_out_pair_scenes": held_n,
        "resolution": RESOLUTION,
        "crop_accuracy": _share(all_crops),  # the top guess is the object
        "crops": len(all_crops),
        "presence_top_k": PRESENCE_TOP_K,
        "crop_present": _share(right_in),  # the object passes the presence test
        "crop_wrong_object_present": _share(wrong_in),  # a random other object passes it
        "scene_accuracy": _share([v.correct for v in verdicts[:scenes]]),
        "by_relation": {r: a["accuracy"] for r, a in acc["by_relation"].items()},
        "two_object": acc["two_object"]["accuracy"],
        "two_object_held_out_pairs": held_acc["two_object"]["accuracy"],
        "order": acc["order"]["accuracy"],
        "order_held_out_pairs": held_acc["order"]["accuracy"],
        "swapped_prompt_rejected": _share([not v.correct for v in swapped]),
        "wrong_object_prompt_rejected": _share([not v.correct for v in wrong]),
        "swapped_prompt_order_rejected": _share([not v.order_correct for v in swapped]),
        "crop_accuracy_by_object": {n: _share(oks) for n, oks in crops_ok.items() if oks},
        "common_confusions": dict(confusions.most_common(8)),
    }

