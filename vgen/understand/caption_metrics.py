"""How well written captions match the true ones: exact match, BLEU-4, and on emoji scenes (whose
grammar is known) the accuracy of each slot (the relation, the first and the second object) and
of the scene: a written caption true of the scene the true one describes, however said ("a dog
below a cat" for "a cat above a dog"; "a cat to the left of a dog" for "a dog and a cat", which
does not say which stands where). Emoji scenes say one layout several ways (bench/RESULTS.md):
exact match on them is about 0.55 at best, in expectation, whatever the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from vgen.models.captioner import normalize_caption


HORIZONTAL = ("and", "left", "right")  # the relations whose two objects stand side by side


def _same_scene(written: tuple[str, tuple[str, ...]], truth: tuple[str, tuple[str, ...]]) -> bool:
    """Whether a written emoji-scenes caption is true of the scene a true caption describes: the
    same objects, and where the truth says which stands where, in those places ("a dog below a
    cat" for "a cat above a dog"). "A and B" says only that the two stand side by side, so any
    side-by-side caption of A and B fits it, and it fits any of them."""
    (relation, nouns), (true_relation, true_nouns) = written, truth
    if true_relation in ("single", "two") or relation in ("single", "two"):
        return written == truth
    if sorted(nouns) != sorted(true_nouns):
        return False
    if "and" in (relation, true_relation):
        return relation in HORIZONTAL and true_relation in HORIZONTAL

    def places(r: str, n: tuple[str, ...]) -> tuple:  # (axis, first place's noun, second place's)
        return ("x", *n) if r == "left" else ("x", *n[::-1]) if r == "right" else \
               ("y", *n) if r == "above" else ("y", *n[::-1])

    return places(relation, nouns) == places(true_relation, true_nouns)


def caption_scores(written: Sequence[str], truths: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """`truths[i]`: the true captions of image i (any of them counts for exact match; all are BLEU's
    references). Images without a true caption are not counted."""
    from torchmetrics.text import BLEUScore

    from vgen.data import emoji_scenes as es

    pairs = [(normalize_caption(w), [normalize_caption(t) for t in ts]) for w, ts in zip(written, truths) if ts]
    if not pairs:
        return {"n": 0}
    out: dict[str, float | int] = {"n": len(pairs)}
    out["exact_match"] = sum(w in ts for w, ts in pairs) / len(pairs)
    out["bleu4"] = float(BLEUScore(n_gram=4, smooth=False)([w for w, _ in pairs], [ts for _, ts in pairs]))
    slots = {"relation": [], "first_object": [], "second_object": [], "same_scene": []}
    for w, ts in pairs:
        try:
            relation, nouns = es.parse_caption(ts[0])
        except ValueError:
            continue  # not an emoji-scenes caption: no slots
        try:
            got_relation, got_nouns = es.parse_caption(w)
        except ValueError:
            got_relation, got_nouns = None, ()
        slots["same_scene"].append(got_relation is not None and _same_scene((got_relation, got_nouns), (relation, nouns)))
        slots["relation"].append(got_relation == relation)
        slots["first_object"].append(got_nouns[:1] == nouns[:1])
        if len(nouns) > 1 and relation != "two":
            slots["second_object"].append(got_nouns[1:2] == nouns[1:2])
    for name, hits in slots.items():
        if hits:
            out[name] = sum(hits) / len(hits)
    return out
