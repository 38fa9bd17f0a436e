"""Evaluation: feature extractors, metrics, the emoji-scenes compositional judge, the report."""
