"""A shard set: which shards a spec names, how many samples each holds, what its labels are.

Kept apart from the reader so that a caller needing only the list (the comparison planner, evaluation's
checks, the caption-only reference) touches the file system and nothing else: no torch, no webdataset.
`sizes.json` and `dataset_card.json` are written by `python -m mgn.shards` (mgn/shards.py).

Shards may also be URLs (`pipe:...`, `http(s)://...`, other `scheme://...`: mgn/io/sources.py): their brace
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

from mgn.cli import bad_flag, one_line
from mgn.io.sample_fields import SampleFields
from mgn.io.sources import ShardOpenError, beside, is_url, local_path, read_beside, shard_name


def expand_shards(spec: str) -> list[str]:
    """Brace pattern, glob, or a .txt file listing shards (relative to the file); '::' joins several.

    A URL part (mgn/io/sources.py) is brace-expanded only: no glob (`?` starts a query), no existence check
    (the reader's first read is that check). A list file is local; its lines may be URLs."""
    shards: list[str] = []
    for part in re.split(r"::(?![^\[\]]*\])", spec):  # not the '::' of an IPv6 host, http://[::1]:8000/...
        if is_url(part):
            found = list(braceexpand.braceexpand(part))
        elif part.endswith(".txt"):
            listing = Path(local_path(part))
            if not listing.is_file():
                raise FileNotFoundError(f"shard list {part!r} (from {spec!r}) does not exist")
            lines = [x.strip() for x in listing.read_text().splitlines()]
            found = [x if is_url(x) else str(listing.parent / x) for x in lines
                     if x and not x.startswith("#")]
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


def dataset_card(spec: str) -> dict | None:
    """The `dataset_card.json` beside a shard set's first shard (None if there is none, or it does not
    parse)."""
    try:
        card = json.loads(read_beside(expand_shards(spec)[0], "dataset_card.json"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def class_names(spec: str) -> list[str]:
    """The label names of a shard set, from its dataset card ([] if there is none)."""
    return list(sample_fields(spec).labels)


def sample_fields(spec: str) -> SampleFields:
    """Where the shard set's samples keep their label and caption (mgn/io/sample_fields.py), from its card."""
    try:
        return SampleFields.from_card(dataset_card(spec))
    except (ValueError, TypeError, AttributeError):
        return SampleFields()


# Left in a folder while mgn.shards writes a shard set into it, removed once sizes.json is written: a folder
# holding it is one the writer may fill again (train.py's synthetic demo data after an interrupted write).
WRITING_MARKER = ".mgn-writing"
INDEX_COMMAND = "python -m mgn.shards --index '<shards>' --labels A,B --label-from cls|json:FIELD"


def read_sizes(shards: list[str]) -> dict[str, int]:
    """Samples per shard from the `sizes.json` beside each shard (written by mgn.shards), fetched for URL
    shards."""
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
                    f"number of batches; shards from another tool get one, read once and left as they are, "
                    f"from `{INDEX_COMMAND}`") from None
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


SHARD_FORMS = ("expected existing .tar shards: a brace pattern like dir/train-{000000..000009}.tar, a glob "
               "in "
               "quotes like 'dir/train-*.tar', or a .txt file listing them; '::' joins several")


def check_shards(flag: str, spec: str) -> list[str]:
    """The shards a flag names, or one line naming the flag: nothing matches, a listed shard is missing,
    ..."""
    if not spec:
        raise bad_flag(flag, spec, f"no shards named ({SHARD_FORMS})")
    try:
        return expand_shards(spec)
    except (OSError, ValueError) as error:
        message = one_line(error)
        if message.startswith("no shards match"):
            message = f"no shards match ({SHARD_FORMS})"
        raise bad_flag(flag, spec, message) from error
