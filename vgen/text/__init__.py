"""Text side of vgen: open_clip tokenizer and text encoders."""
