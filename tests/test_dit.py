"""The DiT's text refiner: bidirectional over the caption, blind to padding, absent when off; and
the lexical path (the text tower's input embeddings) that carries words the output features blur."""

import pytest

import torch

from vgen.models.dit import DiT, DiTConfig
from vgen.text.encoder import TextFeatures

TEXT_WIDTH, LENGTH = 32, 8


def make_dit(refiner_layers: int, lexical: bool = False) -> DiT:
    torch.manual_seed(0)
    cfg = DiTConfig(image_size=8, patch_size=4, width=32, depth=1, heads=2, text_refiner_layers=refiner_layers,
                    text_lexical=lexical)
    return DiT(cfg, text_width=TEXT_WIDTH, pooled_width=16).eval()


def text_and_mask(real: int = 6):
    text = torch.randn(1, LENGTH, TEXT_WIDTH, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, LENGTH, dtype=torch.bool)
    mask[:, :real] = True
    return text, mask


def feats(text, mask, inputs=None) -> TextFeatures:
    return TextFeatures(text, mask, torch.zeros(text.shape[0], 16), inputs)


def test_refined_tokens_see_later_tokens():
    # What a causal text tower cannot do: the first word's features depend on a later word.
    dit = make_dit(refiner_layers=2)
    text, mask = text_and_mask()
    changed = text.clone()
    changed[:, 4] = torch.randn(TEXT_WIDTH)  # a later word ("above" -> "below")
    with torch.no_grad():
        before, after = dit.refine_text(feats(text, mask)), dit.refine_text(feats(changed, mask))
    assert (before[:, 1] - after[:, 1]).abs().max() > 1e-3


def test_refined_tokens_ignore_padding():
    dit = make_dit(refiner_layers=2)
    text, mask = text_and_mask(real=5)
    padded = text.clone()
    padded[:, 5:] = torch.randn(1, LENGTH - 5, TEXT_WIDTH)  # whatever sits in the padding
    with torch.no_grad():
        a, b = dit.refine_text(feats(text, mask)), dit.refine_text(feats(padded, mask))
    torch.testing.assert_close(a[:, :5], b[:, :5])


def test_refiner_sees_word_order():
    # Learned positions: the same words in swapped places give different refined features.
    dit = make_dit(refiner_layers=1)
    text, mask = text_and_mask()
    swapped = text.clone()
    swapped[:, [2, 5]] = text[:, [5, 2]]
    with torch.no_grad():
        a, b = dit.refine_text(feats(text, mask)), dit.refine_text(feats(swapped, mask))
    assert (a[:, 2] - b[:, 5]).abs().max() > 1e-3


def test_no_refiner_means_no_parameters_and_identity():
    dit = make_dit(refiner_layers=0)
    assert not any(name.startswith(("text_refiner", "text_pos")) for name, _ in dit.named_parameters())
    text, mask = text_and_mask()
    assert dit.refine_text(feats(text, mask)) is text


def test_lexical_path_separates_words_the_tower_output_blurs():
    # Two captions whose tower outputs are identical ("above"/"below" nearly are, in the demo CLIP)
    # but whose input embeddings differ at the relation word: only the lexical path tells them apart.
    text, mask = text_and_mask()
    inputs = 0.02 * torch.randn(1, LENGTH, TEXT_WIDTH, generator=torch.Generator().manual_seed(2))
    other = inputs.clone()
    other[:, 3] = 0.02 * torch.randn(TEXT_WIDTH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lexical = make_dit(refiner_layers=1, lexical=True)
        a, b = lexical.refine_text(feats(text, mask, inputs)), lexical.refine_text(feats(text, mask, other))
        plain = make_dit(refiner_layers=1)
        c, d = plain.refine_text(feats(text, mask, inputs)), plain.refine_text(feats(text, mask, other))
    # Normalised first: embeddings at CLIP's init scale (0.02) still move every refined token.
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-2
    torch.testing.assert_close(c, d)


def test_lexical_dit_needs_the_input_embeddings():
    dit = make_dit(refiner_layers=0, lexical=True)
    text, mask = text_and_mask()
    with pytest.raises(ValueError, match="text_lexical"):
        dit.refine_text(feats(text, mask))
