"""Verdicts: what the classifier sees in each box of an image, read against the prompt, and the
accuracies over many of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vgen.data import emoji_scenes as es
from vgen.errors import UsageError
from vgen.evaluate.judge.geometry import crop_boxes, to_judge_resolution
from vgen.evaluate.judge.network import normalize
from vgen.evaluate.judge.settings import NOUNS

PRESENCE_TOP_K = 3  # an object is present in a box when it is among the classifier's 3 likeliest there


@dataclass(frozen=True)
class Verdict:
    prompt: str
    relation: str
    expected: tuple[str, ...]  # per box, in caption order ("two cats": ("cat", "cat"))
    boxes: tuple[es.Box, ...]  # where the caption puts them ("and": LEFT, RIGHT), 64 px coordinates
    predicted: tuple[str, ...]  # what the judge sees in each box (the most likely of the 36 objects)
    confidence: tuple[float, ...]  # the classifier's probability of each prediction
    present: tuple[bool, ...]  # each box's expected object passes the presence test ("and": the better way round)
    correct: bool  # every object present where the prompt puts it ("and": either way), in order
    # left/right/above/below only: of the two named objects, is each more likely where the prompt puts
    # it than swapped (a relative reading, far more reliable than recognising each object outright)
    order_correct: bool | None
    held_out: bool  # a pair never seen together in training images (pair relations only)


ORDERED_RELATIONS = ("left", "right", "above", "below")


class Judge:
    """The trained classifier and what it is (`info`: id, weights sha256, Twemoji version, calibration)."""

    def __init__(self, model: nn.Module, info: dict[str, Any]):
        self.model = model.eval()
        self.info = info

    @property
    def id(self) -> str:
        return str(self.info["id"])

    @torch.no_grad()
    def probabilities(self, crops: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """float crops [N,3,CROP,CROP] in [0, 1] -> class probabilities [N,36] (NOUNS order)."""
        parts = []
        for k in range(0, len(crops), batch_size):
            x = normalize(crops[k:k + batch_size])
            # The classifier was trained with horizontal flips: average both views.
            parts.append((F.softmax(self.model(x), 1) + F.softmax(self.model(x.flip(-1)), 1)) / 2)
        return torch.cat(parts) if parts else torch.zeros(0, len(NOUNS))

    def judge(self, images: torch.Tensor | np.ndarray, prompts: Sequence[str]) -> list[Verdict]:
        """Verdicts for uint8 images [N,3,H,W] against their emoji-scenes prompts."""
        if len(images) != len(prompts):
            raise UsageError(f"{len(images)} images but {len(prompts)} prompts")
        parsed = []
        for prompt in prompts:
            try:
                parsed.append(es.parse_caption(prompt))
            except ValueError:
                raise UsageError(f"the emoji-scenes judge cannot read the prompt {prompt!r}: not in the "
                                 "benchmark's caption grammar (../shared/emoji-scenes.md)") from None
        x = to_judge_resolution(images)
        wanted: dict[es.Box, list[int]] = {}
        for i, (relation, _) in enumerate(parsed):
            for box in es.BOXES[relation]:
                wanted.setdefault(box, []).append(i)
        probs: dict[tuple[int, es.Box], torch.Tensor] = {}
        for box, rows in wanted.items():
            for i, p in zip(rows, self.probabilities(crop_boxes(x[rows], box))):
                probs[(i, box)] = p
        verdicts = []
        for i, (prompt, (relation, nouns)) in enumerate(zip(prompts, parsed)):
            boxes = es.BOXES[relation]
            expected = tuple(nouns) * 2 if relation == "two" else tuple(nouns)
            box_probs = [probs[(i, b)] for b in boxes]
            predicted = tuple(NOUNS[int(p.argmax())] for p in box_probs)
            present = objects_present(box_probs, expected)
            if relation == "and":
                present = max(present, objects_present(box_probs, expected[::-1]), key=sum)
            order = None
            if relation in ORDERED_RELATIONS:
                a, b = (NOUNS.index(n) for n in nouns)
                p1, p2 = box_probs
                order = bool(p1[a] * p2[b] > p1[b] * p2[a])
            ok = all(present) and order is not False
            held = relation in es.PAIR_RELATIONS and es.is_held_out(*nouns)
            verdicts.append(Verdict(prompt, relation, expected, boxes, predicted,
                                    tuple(round(float(p.max()), 4) for p in box_probs), present, ok, order, held))
        return verdicts


def objects_present(box_probs: Sequence[torch.Tensor], expected: Sequence[str]) -> tuple[bool, ...]:
    """Is each expected object among the PRESENCE_TOP_K likeliest classes of its box."""
    return tuple(bool((p > p[NOUNS.index(noun)]).sum() < PRESENCE_TOP_K) for p, noun in zip(box_probs, expected))


def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    n = len(flags)
    return {"accuracy": round(sum(flags) / n, 4) if n else None, "correct": int(sum(flags)), "n": n}


def compositional_accuracy(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Accuracy (with counts) per relation, for single objects, for the two-object (pair) relations
    overall, and separately over pairs seen together in training and held-out pairs; and the order
    accuracy of left/right/above/below (Verdict.order_correct), overall and over held-out pairs."""
    by_relation = {r: _rate([v.correct for v in verdicts if v.relation == r])
                   for r in es.RELATIONS if any(v.relation == r for v in verdicts)}
    pairs = [v for v in verdicts if v.relation in es.PAIR_RELATIONS]
    held = [v for v in pairs if v.held_out]
    ordered = [v for v in verdicts if v.order_correct is not None]
    return {
        "by_relation": by_relation,
        "single_object": _rate([v.correct for v in verdicts if v.relation == "single"]),
        "two_object": _rate([v.correct for v in pairs]),
        "two_object_seen_pairs": _rate([v.correct for v in pairs if not v.held_out]),
        "two_object_held_out_pairs": _rate([v.correct for v in held]),
        "held_out_by_relation": {r: _rate([v.correct for v in held if v.relation == r])
                                 for r in es.PAIR_RELATIONS if any(v.relation == r for v in held)},
        "order": _rate([bool(v.order_correct) for v in ordered]),
        "order_held_out_pairs": _rate([bool(v.order_correct) for v in ordered if v.held_out]),
        "order_by_relation": {r: _rate([bool(v.order_correct) for v in ordered if v.relation == r])
                              for r in ORDERED_RELATIONS if any(v.relation == r for v in ordered)},
    }

