"""Shards to batches and back: captions as token ids, what a sample becomes (decode), who reads what each
epoch, the distributed loaders, caption blocks on disk, caption counts, the shard writer.

May import: mgn's top level and mgn.io.
"""
