"""The training run: the loop, its engine and precision, the non-finite guard, rollback, signals, what it
shows while it trains, its folder, evaluation during training, precomputed caption blocks.

May import: every package above (mgn.io, mgn.data, mgn.model, mgn.checkpoint, mgn.eval); not mgn.bench or
mgn.compare.
"""
