"""Scoring models: the evaluation core shared with training, metrics, the attention picture, evaluate.py's
logic, CLIP zero-shot, the caption-only reference, the image-only ceiling.

May import: mgn's top level, mgn.io, mgn.data, mgn.model and mgn.checkpoint.
"""
