"""Zero-shot classification with a CLIP (Radford et al. 2021, sec. 3.1.4), as open_clip does it.

Each label is written into every prompt template; the text embeddings of a label are averaged over
its templates and normalised again (the "prompt ensembling" of the CLIP paper, open_clip's
`build_zero_shot_classifier`); an image's logits are 100 x the cosine with each label's embedding,
and its probabilities their softmax. 100 is CLIP's learned temperature at the end of training
(clamped there), the scale open_clip's zero-shot evaluation uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vgen.errors import UsageError

LOGIT_SCALE = 100.0
# The label as it is: right for a CLIP trained on captions of the user's own form ("a cat"); a web
# CLIP does better with open_clip's ImageNet ensemble (--template imagenet) or its own templates.
DEFAULT_TEMPLATES = ("{}",)


def template_set(name_or_templates: Sequence[str]) -> tuple[str, ...]:
    """The templates: `imagenet` (open_clip's 80 OpenAI ImageNet templates) or format strings, each
    with one `{}` where the label goes."""
    if list(name_or_templates) == ["imagenet"]:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
    templates = tuple(name_or_templates) or DEFAULT_TEMPLATES
    for template in templates:
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
            raise UsageError(f"--template {template!r}: expected one '{{}}' where the label goes and no other braces")
    return templates


def parse_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """Labels from a comma-separated list or a file of one label a line (blank lines and lines
    starting with # skipped); duplicates are an error (two equal classes would split a vote)."""
    if (labels is None) == (labels_file is None):
        raise UsageError("give the classes with --labels cat,dog,... or --labels-file FILE (one of them)")
    if labels is not None:
        found = [label.strip() for label in labels.split(",")]
    else:
        try:
            with open(labels_file, encoding="utf-8") as f:
                found = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--labels-file {labels_file}: cannot read it ({e})") from None
    found = [label for label in found if label]
    if len(found) < 2:
        raise UsageError(f"zero-shot classification needs at least 2 labels, got {len(found)}")
    duplicates = sorted({label for label in found if found.count(label) > 1})
    if duplicates:
        raise UsageError(f"labels given twice: {', '.join(map(repr, duplicates))}")
    return found


@dataclass
class ZeroShotClassifier:
    labels: list[str]
    templates: tuple[str, ...]
    weights: torch.Tensor  # [D, classes], columns L2-normalised

    @classmethod
    def build(cls, clip, labels: Sequence[str], templates: Sequence[str]) -> ZeroShotClassifier:
        """`clip`: vgen.evaluate.features.ClipFeatures."""
        from open_clip import build_zero_shot_classifier

        with torch.no_grad():
            weights = build_zero_shot_classifier(clip.model, clip.tokenizer, list(labels), list(templates),
                                                 num_classes_per_batch=max(1, 256 // len(templates)),
                                                 device=clip.mean.device)
        return cls(list(labels), tuple(templates), weights.float().cpu())

    def probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """[N, D] normalised image embeddings -> [N, classes] probabilities."""
        return (LOGIT_SCALE * image_features.float() @ self.weights).softmax(dim=-1)

    def top(self, image_features: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """The k most probable labels of each image, with their probabilities."""
        probabilities = self.probabilities(image_features)
        values, indices = probabilities.topk(min(k, len(self.labels)), dim=-1)
        return [[(self.labels[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
                for row_p, row_i in zip(values, indices)]


def accuracy(predictions: Sequence[Sequence[tuple[str, float]]], truths: Sequence[Sequence[str]],
             labels: Sequence[str]) -> dict[str, float | int]:
    """Top-1 and top-k accuracy over the images whose captions name exactly one of the labels (a
    dataset's rows; other images have no known class and are not counted)."""
    label_set = set(labels)
    counted = top1 = topk = 0
    for predicted, captions in zip(predictions, truths):
        named = label_set.intersection(captions)
        if len(named) != 1:
            continue
        (truth,) = named
        counted += 1
        top1 += predicted[0][0] == truth
        topk += any(label == truth for label, _ in predicted)
    if not counted:
        return {"n": 0}
    return {"n": counted, "top1": top1 / counted, f"top{len(predictions[0])}": topk / counted}
