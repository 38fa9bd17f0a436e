"""Hard-negative captions: by swapping content words (NegCLIP, Yuksekgonul et al., "When and Why
Vision-Language Models Behave like Bags-of-Words, and What to Do About It", ICLR 2023, sec. 4), or
by taking another caption of the dataset that differs in exactly one word.

NegCLIP swaps words chosen by a part-of-speech tagger; without one, we call every word that is not
an English function word (article, preposition, conjunction, pronoun, auxiliary) a content word.
Swapping two different content words keeps the bag of words and changes the meaning, which is
exactly what a bag-of-words text encoder cannot tell apart.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable

FUNCTION_WORDS = frozenset(
    """a an the some any this that these those of to in on at by for with from into onto over under
    above below behind beside between near next and or but nor is are was were be been it its
    their his her there here""".split()
)


def swap_content_words(caption: str, rng: random.Random) -> str | None:
    """`caption` with two different content words exchanged, or None when it has fewer than two."""
    words = caption.split(" ")
    content = [i for i, w in enumerate(words) if w.lower() not in FUNCTION_WORDS]
    pairs = [(i, j) for a, i in enumerate(content) for j in content[a + 1:] if words[i] != words[j]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


class OneWordNeighbours:
    """The captions of a set that differ from a given caption in exactly one word position.

    A caption one word away ("a cat and a fish" for "a cat and a dog", "a cat to the right of a dog"
    for "... left of ...", "two dogs" for "two cats") describes a different scene that shares all
    but one thing with the true one: as the wrong caption of a matching-aware discriminator it can
    only be told apart by checking every object and relation, where a random caption differs in all
    of them and one look suffices. A reordering ("a dog and a cat") is two words away, so a caption
    that may say the same thing in another order is never chosen.
    """

    def __init__(self, captions: Iterable[str]):
        self._by_blank: dict[tuple[int, tuple[str, ...]], list[str]] = defaultdict(list)
        for caption in sorted(set(captions)):  # sorted: the choice depends on the set, not its order
            for key in self._keys(caption):
                self._by_blank[key].append(caption)

    @staticmethod
    def _keys(caption: str):
        words = tuple(caption.split(" "))
        for i in range(len(words)):
            yield i, words[:i] + ("",) + words[i + 1:]

    def of(self, caption: str) -> list[str]:
        """Every caption of the set one word away from `caption` (it need not be in the set)."""
        return [other for key in self._keys(caption) for other in self._by_blank.get(key, ()) if other != caption]

    def choose(self, caption: str, rng: random.Random) -> str | None:
        """One of them, uniformly, or None when there is none."""
        neighbours = self.of(caption)
        return rng.choice(neighbours) if neighbours else None
