"""Data: raw-folder discovery, cleaning, shards, and the embedded emoji-scenes dataset."""
