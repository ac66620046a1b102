"""Shards another tool wrote, made readable as they are: one streaming read, three small files beside them.

    python -m mgn.shards --index 'mine/*.tar' --labels safe,violent --label-from json:label

img2dataset and webdataset's `ShardWriter` write shards this project's reader can read, but not the
`sizes.json` it needs (samples per shard: every rank must get the same number of batches) nor a card that says
which labels there are and where a sample keeps its label and caption. Indexing reads each shard once,
streaming (in `--workers` processes), and writes beside the shards, per folder:

- `sizes.json`: samples per shard, counted as the loader counts them (mgn/io/tar.py's grouping);
- `dataset_card.json`: the labels (their order fixes the class indices), where label and caption are read from
  (`fields`: mgn/io/sample_fields.py), samples and usable samples per shard and per label;
- `rejects.jsonl`: one line per sample the loader will skip (no image, an image that does not open, no label
  or caption where the card says, a label outside --labels, a key whose dots make two samples one), with its
  shard and key.

Not a byte of a shard is written, moved or re-encoded; images are opened to their header only. Indexing more
shards of the same folder later (train, then test) adds to these files; the labels and fields must agree.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mgn.cli import UserError
from mgn.data.writer import CARD_FILE, REJECTS_FILE, SIZES_FILE, ordered_map, write_text_atomically
from mgn.io.images import DEFAULT_MAX_PIXELS, open_capped
from mgn.io.sample_fields import IMAGE_FIELDS, SampleFieldError, SampleFields, last_extension
from mgn.io.shard_sets import expand_shards
from mgn.io.sources import is_url
from mgn.io.tar import MAX_MEMBER_BYTES, ShardError, tar_samples

CREATED_BY = "mgn.shards --index"


class ShardIndexError(UserError, ValueError):
    """Shards that cannot be indexed as asked (URLs, a damaged shard, a folder indexed with other labels)."""


@dataclass
class ShardIndex:
    """One shard's count: samples as the loader sees them, the usable ones per label, the rejected."""
    shard: str
    samples: int = 0
    per_label: Counter = field(default_factory=Counter)
    rejects: list[dict] = field(default_factory=list)


def index_shard(shard: str, fields: SampleFields, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_member_bytes: int = MAX_MEMBER_BYTES) -> ShardIndex:
    """Read one shard to its end: each sample's image header, label and caption, where `fields` says."""
    result = ShardIndex(shard)
    wanted = IMAGE_FIELDS | fields.members
    with open(shard, "rb") as f:
        for sample in tar_samples(f, max_member_bytes=max_member_bytes,
                                  keep=lambda ext: last_extension(ext) in wanted):
            result.samples += 1
            try:
                label = _check_sample(sample, fields, max_pixels)
            except (SampleFieldError, ValueError) as problem:
                result.rejects.append({"shard": Path(shard).name, "key": sample["__key__"],
                                       "reason": str(problem)})
                continue
            result.per_label[fields.labels[label] if fields.labels else str(label)] += 1
    return result


def _check_sample(sample: dict, fields: SampleFields, max_pixels: int) -> int:
    """The sample's class index, or the reason the loader will skip it."""
    images = [name for name in sample if last_extension(name) in IMAGE_FIELDS and name[:2] != "__"]
    if len(images) > 1:
        raise ValueError(f"{len(images)} images ({', '.join(images)}) under one key: webdataset's rule makes "
                         "the key everything up to a file name's first dot, so keys with dots that differ "
                         "after it fall together; write keys without dots")
    if not images:
        raise ValueError("missing image (jpg/png/webp)")
    fields.caption(sample).decode("utf-8")  # UnicodeDecodeError is a ValueError
    label = fields.label(sample)
    open_capped(sample[images[0]], max_pixels, want=1)  # header only
    return label


def index_shards(spec: str, fields: SampleFields, *, workers: int = 1, overwrite: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, progress=print) -> dict[Path, dict]:
    """Index every shard `spec` names; returns the card written in each folder."""
    shards = expand_shards(spec)
    remote = [s for s in shards if is_url(s)]
    if remote:
        raise ShardIndexError(f"--index reads local shards only ({remote[0]} is a URL): index them where "
                              "they are written, then serve sizes.json and dataset_card.json beside them")
    if not fields.labels:
        raise ShardIndexError("--index needs --labels: their order fixes the class indices")
    folders: dict[Path, list[str]] = {}
    for shard in shards:
        folders.setdefault(Path(shard).parent, []).append(shard)
    previous = {folder: _previous(folder, fields, overwrite) for folder in folders}
    results: list[ShardIndex] = []
    read = partial(index_shard, fields=fields, max_pixels=max_pixels)
    try:
        for done, result in enumerate(ordered_map(read, shards, workers), 1):
            results.append(result)
            if done % 50 == 0 or done == len(shards):
                samples = sum(r.samples for r in results)
                progress(f"indexed {done}/{len(shards)} shards, {samples} samples")
    except ShardError as error:
        raise ShardIndexError(f"{error}: a shard that cannot be read to its end cannot be indexed; "
                              "repair or remove it, then index again") from None
    return {folder: _write_folder(folder, [r for r in results if Path(r.shard).parent == folder], fields,
                                  previous[folder]) for folder in folders}


def _previous(folder: Path, fields: SampleFields, overwrite: bool) -> dict:
    """What an earlier index of this folder recorded (kept for shards not indexed now); refused if it was
    made with other labels or fields, or if the folder's set was written by mgn.shards, unless `overwrite`."""
    sizes_path, card_path = folder / SIZES_FILE, folder / CARD_FILE
    if not sizes_path.exists() or overwrite:
        return {"sizes": {}, "shards": {}, "rejects": []}
    try:
        card = json.loads(card_path.read_text())
        sizes = json.loads(sizes_path.read_text())
    except (OSError, ValueError):
        card, sizes = {}, {}
    if card.get("created_by") != CREATED_BY:
        raise ShardIndexError(f"{folder} already has a {SIZES_FILE} not written by --index (a set `python "
                              "-m mgn.shards` wrote reads as it is); pass --overwrite to index it anyway")
    if SampleFields.from_card(card) != fields:
        raise ShardIndexError(f"{card_path} was indexed with labels {card.get('labels')} and fields "
                              f"{card.get('fields')}; index with the same, or pass --overwrite to start over")
    lines = (folder / REJECTS_FILE).read_text().splitlines() if (folder / REJECTS_FILE).exists() else []
    rejects = [json.loads(line) for line in lines if line.strip()]
    return {"sizes": sizes, "shards": card.get("shards", {}), "rejects": rejects}


def _write_folder(folder: Path, results: list[ShardIndex], fields: SampleFields, previous: dict) -> dict:
    """One folder's sizes.json, dataset_card.json and rejects.jsonl, each whole or not at all; sizes last."""
    indexed = {Path(r.shard).name for r in results}
    shards = {name: entry for name, entry in previous["shards"].items() if name not in indexed}
    sizes = {name: n for name, n in previous["sizes"].items() if name not in indexed}
    rejects = [r for r in previous["rejects"] if r.get("shard") not in indexed]
    for r in results:
        name = Path(r.shard).name
        sizes[name] = r.samples
        shards[name] = {"samples": r.samples, "usable": sum(r.per_label.values()),
                        "per_label": dict(sorted(r.per_label.items()))}
        rejects += r.rejects
    per_label = Counter()
    for entry in shards.values():
        per_label.update(entry["per_label"])
    card = {"labels": list(fields.labels), "fields": fields.to_card(), "created_by": CREATED_BY,
            "samples": sum(sizes.values()), "usable": sum(per_label.values()),
            "per_label": {label: per_label.get(label, 0) for label in fields.labels},
            "rejected": {"rows": len(rejects), "by_reason": _reasons(rejects), "file": REJECTS_FILE},
            "shards": dict(sorted(shards.items()))}
    write_text_atomically(folder / REJECTS_FILE, "".join(json.dumps(r) + "\n" for r in rejects))
    write_text_atomically(folder / CARD_FILE, json.dumps(card, indent=2) + "\n")
    write_text_atomically(folder / SIZES_FILE, json.dumps(dict(sorted(sizes.items())), indent=2) + "\n")
    return card


def _reasons(rejects: list[dict]) -> dict[str, int]:
    """Rejected samples counted by the start of their reason (before any ':' or '('), most common first."""
    kinds = Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejects)
    return dict(kinds.most_common())
