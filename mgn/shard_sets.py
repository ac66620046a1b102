"""A shard set: which shards a spec names, how many samples each holds, what its labels are.

Kept apart from the reader so that a caller needing only the list (the comparison planner, evaluation's
checks, the caption-only reference) touches the file system and nothing else: no torch, no webdataset.
`sizes.json` and `dataset_card.json` are written by `python -m mgn.shards` (mgn/shards.py).

Shards may also be URLs (`pipe:...`, `http(s)://...`, other `scheme://...`: mgn/shard_io.py): their brace
patterns are expanded but never globbed or stat-ed, and their `sizes.json` and `dataset_card.json` are fetched
from beside them (the same URL with the last part replaced; for `pipe:`, the command with its `*.tar` path's
last part replaced), once per call.
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections import Counter
from pathlib import Path

import braceexpand

from mgn.shard_io import ShardOpenError, beside, is_url, local_path, read_beside, shard_name


def expand_shards(spec: str) -> list[str]:
    """Brace pattern, glob, or a .txt file listing shards (relative to the file); '::' joins several.

    A URL part (mgn/shard_io.py) is brace-expanded only: no glob (`?` starts a query), no existence check (the
    reader's first read is that check). A list file is local; its lines may be URLs."""
    shards: list[str] = []
    for part in re.split(r"::(?![^\[\]]*\])", spec):  # not the '::' of an IPv6 host, http://[::1]:8000/...
        if is_url(part):
            found = list(braceexpand.braceexpand(part))
        elif part.endswith(".txt"):
            listing = Path(local_path(part))
            if not listing.is_file():
                raise FileNotFoundError(f"shard list {part!r} (from {spec!r}) does not exist")
            lines = [x.strip() for x in listing.read_text().splitlines()]
            found = [x if is_url(x) else str(listing.parent / x) for x in lines if x and not x.startswith("#")]
        else:
            found = []
            for pattern in braceexpand.braceexpand(local_path(part)):
                found += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        shards += found
    if not shards:
        raise FileNotFoundError(f"no shards match {spec!r}")
    missing = [s for s in shards if not is_url(s) and not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards from {spec!r} do not exist, "
                                f"e.g. {missing[:3]}")
    repeated = [s for s, n in Counter(shards).items() if n > 1]
    if repeated:
        raise ValueError(f"shards listed more than once in {spec!r}: {repeated[:3]}")
    return shards


def class_names(spec: str) -> list[str]:
    """The label names of a shard set, from the `dataset_card.json` beside its first shard ([] if there is none)."""
    try:
        card = read_beside(expand_shards(spec)[0], "dataset_card.json")
        return [str(x) for x in json.loads(card)["labels"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def read_sizes(shards: list[str]) -> dict[str, int]:
    """Samples per shard from the `sizes.json` beside each shard (written by mgn.shards), fetched for URL shards."""
    tables: dict[str, dict] = {}
    sizes, missing = {}, []
    for shard in shards:
        path = beside(shard, "sizes.json")
        if path not in tables:
            try:
                tables[path] = json.loads(read_beside(shard, "sizes.json"))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{path} is missing: the loader needs samples per shard to give every rank the same "
                    f"number of batches (write shards with `python -m mgn.shards`, which writes it last)") from None
            except OSError as exc:  # a URL that cannot be fetched: ShardOpenError names it and says why
                raise ShardOpenError(f"{exc}; the loader needs this sizes.json (samples per shard)") from None
        count = tables[path].get(shard_name(shard))
        if count is None:
            missing.append(shard)
        else:
            sizes[shard] = int(count)
    if missing:
        raise ValueError(f"sizes.json lacks {len(missing)} shard(s), e.g. {missing[:3]}; "
                         f"was the shard set rewritten or interrupted?")
    return sizes
