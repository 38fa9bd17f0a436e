"""The understanding half: what a trained CLIP says about images (zero-shot classification, text and
image search), the inverse of generating them."""
