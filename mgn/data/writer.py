"""Writing WebDataset shards: rows of a manifest or folder, or the synthetic generator's samples, encoded and
packed into `train-%06d.tar` and `test-%06d.tar` (samples `{__key__, jpg|png, txt, cls, json, ids.<fp>}`, the
last the caption's token ids for a tokenizer, so loader workers need not tokenize: mgn/data/tokens.py), with
`sizes.json` (samples per shard, which the reader needs to give every rank the same number of batches),
`dataset_card.json` (counts per label and split, options, rejects) and `rejects.jsonl`. `python -m mgn.shards`
is its command line.

Each shard is written under a hidden temporary name and renamed only when complete, and
`sizes.json` is written last: an interrupted run leaves nothing the reader would accept. Bad
rows are checked completely before any byte of them is written, so a shard never holds half a
sample; they go to `rejects.jsonl` with their line and reason, or stop the run with --strict.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import multiprocessing
import os
import re
import shutil
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds

from mgn.data import tokens
from mgn.io import synthetic
from mgn.config import PACKAGED_MINILM
from mgn.io.encode import Record, encode_row
from mgn.io.manifest import MAX_CAPTION_BYTES, SPLITS, Reject, Row, check_rows
from mgn.io.shard_sets import WRITING_MARKER
from mgn.io.images import DEFAULT_MAX_PIXELS

SIZES_FILE, CARD_FILE, REJECTS_FILE = "sizes.json", "dataset_card.json", "rejects.jsonl"


class BadRowError(ValueError):
    """Raised under --strict on the first bad row."""


# --------------------------------------------------------------------------------------------- writing

class SplitWriter:
    """`<split>-%06d.tar` shards, each under a hidden temporary name until it is complete."""

    def __init__(self, out_dir: Path, split: str, max_samples: int, max_bytes: int):
        self.out_dir, self.split = out_dir, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.sizes: dict[str, int] = {}
        self.per_label: Counter = Counter()
        self._tar = self._file = self._tmp = None
        self._count = self._bytes = 0

    def write(self, record: Record, extra: dict[str, bytes]) -> None:
        """One sample's files; `extra`: fields beside the record's own (its caption's token ids)."""
        sample = {"__key__": record.key, record.ext: record.image, "txt": record.caption.encode("utf-8"),
                  "cls": str(record.label).encode(), "json": json.dumps(record.meta, sort_keys=True).encode(),
                  **extra}
        size = sum(len(v) + 1024 for k, v in sample.items() if k != "__key__")  # + tar headers/padding
        if self._tar is not None and (self._count >= self.max_samples or self._bytes + size > self.max_bytes):
            self.finish()
        if self._tar is None:
            self._open()
        with _naming(self._tmp):
            self._tar.write(sample)  # all of a sample's files go in one call, after every check passed
        self._count += 1
        self._bytes += size
        self.per_label[record.label] += 1

    def _open(self) -> None:
        name = f"{self.split}-{len(self.sizes):06d}.tar"
        self._tmp = self.out_dir / f".{name}.partial"
        self._file = open(self._tmp, "wb")
        # mtime fixed: same data, same bytes; an int: no pax record per file
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._name, self._count, self._bytes = name, 0, 0

    def finish(self) -> None:
        if self._tar is None:
            return
        with _naming(self._tmp):
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        os.replace(self._tmp, self.out_dir / self._name)
        self.sizes[self._name] = self._count
        self._tar = self._file = self._tmp = None

    def abort(self) -> None:
        """Drop the shard being written; finished ones are removed by the caller. Never raises: on a full disk
        closing flushes buffers that cannot be written, and the file must go all the same."""
        if self._file is not None:
            for close in (self._tar.close, self._file.close):
                with contextlib.suppress(Exception):
                    close()
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError raised inside names `path` where it names no file: a full disk's says only "No space left on
    device"."""
    try:
        yield
    except OSError as error:
        error.filename = error.filename or str(path)
        raise


def even_shard_size(count: int, max_samples: int) -> int:
    """Samples per shard that spread `count` evenly over as few shards as `max_samples` allows (the last shard
    is then at most one sample short of the others, instead of a small remainder)."""
    shards = max(1, math.ceil(count / max_samples))
    return max(1, math.ceil(count / shards))


def write_records(records: Iterable[Record | Reject], out_dir: str | Path, *, labels: list[str],
                  max_samples: int, max_bytes: int, strict: bool, card: dict, overwrite: bool = False,
                  expected: dict[str, int] | None = None, tokenizer: str | None = PACKAGED_MINILM) -> dict:
    """Stream records into shards; on any error remove everything this run wrote. `expected` (samples per
    split, when known up front) spreads each split evenly over its shards; `tokenizer` (None: none) whose
    token ids of each caption are stored beside it."""
    ids_field = _ids_field(tokenizer)
    card = {**card, "token_ids": {"tokenizer": tokenizer, "field": ids_field}}
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    expected = expected or {}
    writers = {s: SplitWriter(out, s, even_shard_size(expected[s],
                                                      max_samples) if expected.get(s) else max_samples,
                              max_bytes) for s in SPLITS}
    rejects: list[Reject] = []
    try:
        for item in records:
            if isinstance(item, Reject):
                if strict:
                    raise BadRowError(f"{item.where}: {item.reason}")
                rejects.append(item)
            else:
                extra = {ids_field: tokens.encode(tokenizer, [item.caption])[0]} if ids_field else {}
                writers[item.split].write(item, extra)
        for w in writers.values():
            w.finish()
        rejects.sort(key=lambda r: r.line)
        write_text_atomically(out / REJECTS_FILE, "".join(json.dumps(r.__dict__) + "\n" for r in rejects))
        card = _card(card, labels, writers, rejects)
        write_text_atomically(out / CARD_FILE, json.dumps(card, indent=2) + "\n")
        sizes = {name: n for w in writers.values() for name, n in w.sizes.items()}
        # last: marks the set complete
        write_text_atomically(out / SIZES_FILE, json.dumps(sizes, indent=2) + "\n")
        (out / WRITING_MARKER).unlink(missing_ok=True)
    except BaseException as error:
        for w in writers.values():  # every split's writer: one failing must not leave the other's file behind
            w.abort()
        for path in [out / name for w in writers.values() for name in w.sizes] + [
                out / REJECTS_FILE, out / CARD_FILE, out / WRITING_MARKER]:
            path.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(_disk_full(error, out)) from error
        raise
    return card


def _disk_full(error: OSError, out: Path) -> str:
    """The one line of a full disk or quota: which file, how much room there is now that this run's files are
    gone, what to do."""
    usage = shutil.disk_usage(out)
    free, total = usage.free / 2**20, usage.total / 2**20
    return (f"{error.filename or out}: {error.strerror} (its file system has {free:.1f} MB free of "
            f"{total:.1f} MB with this run's files removed; the shards need more): free some space or pass "
            f"another --out, then run the same command again")


def _ids_field(tokenizer: str | None) -> str | None:
    """The field of `tokenizer`'s ids (None: store none); a tokenizer that cannot be loaded, or has no fast
    (Rust) backend to fingerprint, stops the writer before anything is written."""
    if tokenizer is None:
        return None
    try:
        field = tokens.field_name(tokenizer)
    except Exception as error:  # any failure to load it (OSError offline or unknown, ...) is the flag's
        raise ValueError(f"--tokenizer {tokenizer}: cannot load it ({error}); pass a hub name, a local "
                         "folder, "
                         f"{PACKAGED_MINILM}, or none") from None
    if field is None:
        raise ValueError(f"--tokenizer {tokenizer}: no fast tokenizer, so its ids cannot be fingerprinted; "
                         f"pass --tokenizer none (workers then tokenize the captions)")
    return field


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a shard set (or part of one) unless `overwrite`. A hidden
    `.<name>.partial` is what a killed writer left: never part of a set, it is removed without asking. The
    folder is marked as being written (WRITING_MARKER) until sizes.json is."""
    out.mkdir(parents=True, exist_ok=True)
    names = rf"(train|test)-\d{{6}}\.tar|{'|'.join(map(re.escape, (SIZES_FILE, CARD_FILE, REJECTS_FILE)))}"
    ours = [p for p in out.iterdir() if re.fullmatch(names, p.name)]
    if ours and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({ours[0].name}, ...); pass --overwrite to "
                              "replace them")
    for p in ours + [p for p in out.iterdir() if re.fullmatch(rf"\.({names})\.partial", p.name)]:
        p.unlink()
    (out / WRITING_MARKER).write_text("mgn.shards is writing a shard set here\n")


def write_text_atomically(path: Path, text: str) -> None:
    """`text` in `path` whole or not at all: written beside it under a hidden name, then renamed."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with _naming(tmp):
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _card(card: dict, labels: list[str], writers: dict[str, SplitWriter], rejects: list[Reject]) -> dict:
    splits = {s: {"samples": sum(w.sizes.values()), "shards": len(w.sizes),
                  "per_label": {labels[i]: w.per_label[i] for i in range(len(labels))}}
              for s, w in writers.items()}
    by_kind = Counter(r.kind for r in rejects)
    return {"labels": labels, "splits": splits,
            "rejected": {"rows": len(rejects), "by_kind": dict(sorted(by_kind.items())),
                         "file": REJECTS_FILE},
            **card}


def ordered_map(fn: Callable, items: list, workers: int) -> Iterator:
    """Results in input order (so shards are reproducible) from `workers` processes."""
    if workers <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=max(1, min(64, len(items) // (4 * workers))))


# ---------------------------------------------------------------------------------------- entry points

def write_shards(rows: list[Row], out_dir: str | Path, *, labels: list[str], source: str,
                 image_size: int = 0, quality: int = 90, fmt: str = "jpg", max_samples: int = 1000,
                 max_bytes: int = 1 << 30, workers: int = 1, test_fraction: float = 0.15, seed: int = 0,
                 strict: bool = False, overwrite: bool = False, data_root: str | Path | None = None,
                 keep_original: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_caption_bytes: int = MAX_CAPTION_BYTES, tokenizer: str | None = PACKAGED_MINILM) -> dict:
    """Rows (from `read_manifest` / `read_folder`) to shards; returns the dataset card.

    `data_root`: images must resolve inside it (None: anywhere, i.e. --allow-outside-root).
    """
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels {labels} must be a non-empty list without repeats")
    checked = check_rows(rows, labels, test_fraction=test_fraction, seed=seed,
                         root=Path(data_root) if data_root is not None else None,
                         max_caption_bytes=max_caption_bytes)
    encode = partial(encode_row, labels=labels, image_size=image_size, quality=quality, fmt=fmt,
                     keep_original=keep_original, max_pixels=max_pixels)
    card = {"source": source, "created_by": "mgn.shards",
            "options": {"image_size": image_size, "quality": quality, "format": fmt,
                        "max_samples": max_samples,
                        "max_bytes": max_bytes, "test_fraction": test_fraction, "seed": seed,
                        "data_root": str(data_root) if data_root is not None else None,
                        "keep_original_bytes": keep_original, "max_pixels": max_pixels,
                        "max_caption_bytes": max_caption_bytes},
            "captions_truncated": sum(1 for c in checked if not isinstance(c, Reject)
                                      and "caption_truncated_from_bytes" in c[0].extra)}
    expected = Counter(c[2] for c in checked if not isinstance(c, Reject))
    records = ordered_map(encode, checked, workers)
    return write_records(records, out_dir, labels=labels, max_samples=max_samples, max_bytes=max_bytes,
                         strict=strict, card=card, overwrite=overwrite, expected=expected,
                         tokenizer=tokenizer)


def write_synthetic(out_dir: str | Path, *, samples: int, image_size: int, seed: int, max_samples: int = 256,
                    workers: int = 1, overwrite: bool = False, tokenizer: str | None = PACKAGED_MINILM,
                    **knobs) -> dict:
    """The synthetic moderation set (see mgn/io/synthetic.py for `knobs`); returns the dataset card."""
    spec = synthetic.SyntheticSpec(samples=samples, image_size=image_size, seed=seed, **knobs)
    spec.validate()
    items = list(enumerate(synthetic.assign_splits(spec)))

    def records() -> Iterator[Record]:
        for s in ordered_map(partial(synthetic.render, spec), items, workers):
            meta = {"id": s.key, "label": spec.labels[s.label], **s.meta}
            yield Record(s.key, s.split, s.label, s.caption, s.jpeg, "jpg", meta)

    card = {"source": "synthetic", "created_by": "mgn.shards", "generator": spec.to_dict(),
            "options": {"max_samples": max_samples}}
    return write_records(records(), out_dir, labels=list(spec.labels), max_samples=max_samples,
                         max_bytes=1 << 40, strict=True, card=card, overwrite=overwrite,
                         expected=Counter(split for _, split in items), tokenizer=tokenizer)


