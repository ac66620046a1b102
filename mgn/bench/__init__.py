"""Timing the deployed student: latency and throughput against plain timm, the printed report, how a model is
timed.

May import: mgn's top level, mgn.io, mgn.data, mgn.model, mgn.checkpoint and mgn.eval; not mgn.train or
mgn.compare.
"""
