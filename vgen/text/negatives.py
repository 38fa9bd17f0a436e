"""Hard-negative captions by swapping content words (NegCLIP, Yuksekgonul et al., "When and Why
Vision-Language Models Behave like Bags-of-Words, and What to Do About It", ICLR 2023, sec. 4).

NegCLIP swaps words chosen by a part-of-speech tagger; without one, we call every word that is not
an English function word (article, preposition, conjunction, pronoun, auxiliary) a content word.
Swapping two different content words keeps the bag of words and changes the meaning, which is
exactly what a bag-of-words text encoder cannot tell apart.
"""

from __future__ import annotations

import random

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
