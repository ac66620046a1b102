"""A shard set on disk: which files a spec names, how many samples each holds, what its labels are.

Kept apart from the reader so that a caller needing only the list (the comparison planner, evaluation's
checks, the caption-only reference) touches the file system and nothing else: no torch, no webdataset.
`sizes.json` and `dataset_card.json` are written by `python -m mgn.shards` (mgn/shards.py).
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from pathlib import Path

import braceexpand


def expand_shards(spec: str) -> list[str]:
    """Brace pattern, glob, or a .txt file listing shards (relative to the file); '::' joins several."""
    shards: list[str] = []
    for part in spec.split("::"):
        if part.endswith(".txt"):
            listing = Path(part)
            if not listing.is_file():
                raise FileNotFoundError(f"shard list {part!r} (from {spec!r}) does not exist")
            lines = [x.strip() for x in listing.read_text().splitlines()]
            found = [str(listing.parent / x) for x in lines if x and not x.startswith("#")]
        else:
            found = []
            for pattern in braceexpand.braceexpand(part):
                found += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        shards += found
    if not shards:
        raise FileNotFoundError(f"no shards match {spec!r}")
    missing = [s for s in shards if not os.path.isfile(s)]
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
        card = Path(expand_shards(spec)[0]).parent / "dataset_card.json"
        return [str(x) for x in json.loads(card.read_text())["labels"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def read_sizes(shards: list[str]) -> dict[str, int]:
    """Samples per shard from the `sizes.json` beside each shard (written by mgn.shards)."""
    tables: dict[Path, dict] = {}
    sizes, missing = {}, []
    for shard in shards:
        folder = Path(shard).parent
        if folder not in tables:
            path = folder / "sizes.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the loader needs samples per shard to give every rank the same "
                    f"number of batches (write shards with `python -m mgn.shards`, which writes it last)")
            tables[folder] = json.loads(path.read_text())
        count = tables[folder].get(Path(shard).name)
        if count is None:
            missing.append(shard)
        else:
            sizes[shard] = int(count)
    if missing:
        raise ValueError(f"sizes.json lacks {len(missing)} shard(s), e.g. {missing[:3]}; "
                         f"was the shard set rewritten or interrupted?")
    return sizes
