"""Checkpoints on disk: training state (save, verify, find, resume), which path means which checkpoint,
reading checkpoints and students for evaluation.

May import: mgn's top level, mgn.io, mgn.data and mgn.model.
"""
