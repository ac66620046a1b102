"""Reading and writing files: tar shards, where shards come from (files, pipes, URLs), shard sets and their
sizes, untrusted images, manifests, the synthetic generator, append-only line files.

May import: mgn's top level (config, cli, devices, distributed). Imports nothing else of mgn.
"""
