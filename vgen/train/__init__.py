"""The training stage: one loop for every kind of model (see loop.py)."""
