"""Write WebDataset shards from a manifest, a folder of images, or the synthetic generator.

    python -m mgn.shards --manifest data.csv --labels non_violent,violent --out shards/mine
    python -m mgn.shards --folder images/ --out shards/mine         # images/[train|test/]<label>/x.jpg + x.txt
    python -m mgn.shards --synthetic --out shards/demo --samples 2400 --image-size 96 --seed 0

Output in --out: `train-%06d.tar` and `test-%06d.tar` (samples `{__key__, jpg|png, txt, cls, json, ids.<fp>}`,
the last the caption's token ids for `--tokenizer`, so loader workers need not tokenize: mgn/tokens.py),
`sizes.json` (samples per shard, which the reader needs to give every rank the same number of
batches), `dataset_card.json` (counts per label and split, options, rejects) and `rejects.jsonl`.

Each shard is written under a hidden temporary name and renamed only when complete, and
`sizes.json` is written last: an interrupted run leaves nothing the reader would accept. Bad
rows are checked completely before any byte of them is written, so a shard never holds half a
sample; they go to `rejects.jsonl` with their line and reason, or stop the run with --strict.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import re
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds

from mgn import synthetic, tokens
from mgn.cli import require, run_command
from mgn.config import PACKAGED_MINILM
from mgn.encode import Record, encode_row
from mgn.manifest import MAX_CAPTION_BYTES, SPLITS, Reject, Row, check_rows, read_folder, read_manifest
from mgn.safe_images import DEFAULT_MAX_PIXELS

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
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.out_dir / self._name)
        self.sizes[self._name] = self._count
        self._tar = self._file = self._tmp = None

    def abort(self) -> None:
        """Drop the shard being written; finished ones are removed by the caller."""
        if self._file is not None:
            with contextlib.suppress(Exception):  # may be why we abort (disk full); the file goes anyway
                self._tar.close()
            self._file.close()
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None


def even_shard_size(count: int, max_samples: int) -> int:
    """Samples per shard that spread `count` evenly over as few shards as `max_samples` allows (the last shard is
    then at most one sample short of the others, instead of a small remainder)."""
    shards = max(1, math.ceil(count / max_samples))
    return max(1, math.ceil(count / shards))


def write_records(records: Iterable[Record | Reject], out_dir: str | Path, *, labels: list[str],
                  max_samples: int, max_bytes: int, strict: bool, card: dict, overwrite: bool = False,
                  expected: dict[str, int] | None = None, tokenizer: str | None = PACKAGED_MINILM) -> dict:
    """Stream records into shards; on any error remove everything this run wrote. `expected` (samples per split,
    when known up front) spreads each split evenly over its shards; `tokenizer` (None: none) whose token ids of
    each caption are stored beside it."""
    ids_field = _ids_field(tokenizer)
    card = {**card, "token_ids": {"tokenizer": tokenizer, "field": ids_field}}
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    expected = expected or {}
    writers = {s: SplitWriter(out, s, even_shard_size(expected[s], max_samples) if expected.get(s) else max_samples,
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
    except BaseException:
        for w in writers.values():
            w.abort()
            for name in w.sizes:
                (out / name).unlink(missing_ok=True)
        raise
    rejects.sort(key=lambda r: r.line)
    _write_text(out / REJECTS_FILE, "".join(json.dumps(r.__dict__) + "\n" for r in rejects))
    card = _card(card, labels, writers, rejects)
    _write_text(out / CARD_FILE, json.dumps(card, indent=2) + "\n")
    sizes = {name: n for w in writers.values() for name, n in w.sizes.items()}
    _write_text(out / SIZES_FILE, json.dumps(sizes, indent=2) + "\n")  # last: marks the set complete
    return card


def _ids_field(tokenizer: str | None) -> str | None:
    """The field of `tokenizer`'s ids (None: store none); a tokenizer that cannot be loaded, or has no fast
    (Rust) backend to fingerprint, stops the writer before anything is written."""
    if tokenizer is None:
        return None
    try:
        field = tokens.field_name(tokenizer)
    except Exception as error:  # noqa: BLE001 - any failure to load it (OSError offline or unknown, ...) is the flag's
        raise ValueError(f"--tokenizer {tokenizer}: cannot load it ({error}); pass a hub name, a local folder, "
                         f"{PACKAGED_MINILM}, or none") from None
    if field is None:
        raise ValueError(f"--tokenizer {tokenizer}: no fast tokenizer, so its ids cannot be fingerprinted; "
                         f"pass --tokenizer none (workers then tokenize the captions)")
    return field


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out.iterdir() if re.fullmatch(r"\.?(train|test)-\d{6}\.tar(\.partial)?", p.name)
            or p.name in (SIZES_FILE, CARD_FILE, REJECTS_FILE)]
    if ours and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({ours[0].name}, ...); pass --overwrite to replace them")
    for p in ours:
        p.unlink()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _card(card: dict, labels: list[str], writers: dict[str, SplitWriter], rejects: list[Reject]) -> dict:
    splits = {s: {"samples": sum(w.sizes.values()), "shards": len(w.sizes),
                  "per_label": {labels[i]: w.per_label[i] for i in range(len(labels))}}
              for s, w in writers.items()}
    by_kind = Counter(r.kind for r in rejects)
    return {"labels": labels, "splits": splits,
            "rejected": {"rows": len(rejects), "by_kind": dict(sorted(by_kind.items())), "file": REJECTS_FILE},
            **card}


def _ordered_map(fn: Callable, items: list, workers: int) -> Iterator:
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
                         root=Path(data_root) if data_root is not None else None, max_caption_bytes=max_caption_bytes)
    encode = partial(encode_row, labels=labels, image_size=image_size, quality=quality, fmt=fmt,
                     keep_original=keep_original, max_pixels=max_pixels)
    card = {"source": source, "created_by": "mgn.shards",
            "options": {"image_size": image_size, "quality": quality, "format": fmt, "max_samples": max_samples,
                        "max_bytes": max_bytes, "test_fraction": test_fraction, "seed": seed,
                        "data_root": str(data_root) if data_root is not None else None,
                        "keep_original_bytes": keep_original, "max_pixels": max_pixels,
                        "max_caption_bytes": max_caption_bytes},
            "captions_truncated": sum(1 for c in checked if not isinstance(c, Reject)
                                      and "caption_truncated_from_bytes" in c[0].extra)}
    expected = Counter(c[2] for c in checked if not isinstance(c, Reject))
    records = _ordered_map(encode, checked, workers)
    return write_records(records, out_dir, labels=labels, max_samples=max_samples, max_bytes=max_bytes,
                         strict=strict, card=card, overwrite=overwrite, expected=expected, tokenizer=tokenizer)


def write_synthetic(out_dir: str | Path, *, samples: int, image_size: int, seed: int, max_samples: int = 256,
                    workers: int = 1, overwrite: bool = False, tokenizer: str | None = PACKAGED_MINILM,
                    **knobs) -> dict:
    """The synthetic moderation set (see mgn/synthetic.py for `knobs`); returns the dataset card."""
    spec = synthetic.SyntheticSpec(samples=samples, image_size=image_size, seed=seed, **knobs)
    spec.validate()
    items = list(enumerate(synthetic.assign_splits(spec)))

    def records() -> Iterator[Record]:
        for s in _ordered_map(partial(synthetic.render, spec), items, workers):
            meta = {"id": s.key, "label": spec.labels[s.label], **s.meta}
            yield Record(s.key, s.split, s.label, s.caption, s.jpeg, "jpg", meta)

    card = {"source": "synthetic", "created_by": "mgn.shards", "generator": spec.to_dict(),
            "options": {"max_samples": max_samples}}
    return write_records(records(), out_dir, labels=list(spec.labels), max_samples=max_samples,
                         max_bytes=1 << 40, strict=True, card=card, overwrite=overwrite,
                         expected=Counter(split for _, split in items), tokenizer=tokenizer)


def _parse_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)B?", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 500M or 1G, got {text!r}")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2) or " "))


def _parser() -> argparse.ArgumentParser:
    """The command line of `python -m mgn.shards`; its help is this module's docstring."""
    p = argparse.ArgumentParser(prog="python -m mgn.shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="CSV or JSONL: image, caption, label[, id][, split][, extra columns]")
    src.add_argument("--folder", help="<root>/[train|test/]<label>/<name>.<ext> with captions in <name>.txt")
    src.add_argument("--synthetic", action="store_true", help="generate the synthetic moderation set")
    p.add_argument("--out", default="shards", help="output folder (default: shards)")
    p.add_argument("--labels", help="comma-separated label set; its order fixes the class indices "
                                    "(required with --manifest; default for --folder: the sub-folder names)")
    p.add_argument("--max-samples-per-shard", type=int, default=None,
                   help="default: 1000, or 256 with --synthetic")
    p.add_argument("--max-bytes-per-shard", type=_parse_bytes, default=1 << 30, help="e.g. 500M (default 1G)")
    p.add_argument("--image-size", type=int, default=None,
                   help="re-encode so the shorter side is at most this (default: keep); with --synthetic "
                        "the rendered size (default 96)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")
    p.add_argument("--test-fraction", type=float, default=0.15, help="used where no split column is given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="any bad row is fatal")
    p.add_argument("--data-root", default=None, help="images must resolve inside this folder (default: the "
                                                     "manifest's folder, or --folder); others are rejected")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept absolute paths, '..' and symlinks that lead outside the data root")
    p.add_argument("--keep-original-bytes", action="store_true",
                   help="store RGB JPEGs that need no resizing byte for byte (keeps their EXIF, GPS included, and "
                        "any bytes after the image); default: re-encode every image")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="width x height cap, read from the header before decoding: bigger JPEGs are decoded "
                        "reduced and stored within it, other formats rejected (default 25,000,000)")
    p.add_argument("--max-caption-bytes", type=int, default=MAX_CAPTION_BYTES,
                   help="captions are cut to this many UTF-8 bytes (recorded per sample; default 4096)")
    p.add_argument("--tokenizer", default=PACKAGED_MINILM,
                   help="store each caption's token ids for this tokenizer (hub name, local folder, or "
                        f"{PACKAGED_MINILM}: DistilBERT's uncased vocabulary, the default), so loader workers need "
                        "not tokenize; training reads them only if its text model's tokenizer has the same "
                        "fingerprint, and tokenizes otherwise; none: store no ids")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    g = p.add_argument_group("synthetic generator (see shards/README.md)")
    defaults = synthetic.SyntheticSpec()
    g.add_argument("--samples", type=int, default=defaults.samples)
    for name in ("cue_strength", "caption_info", "label_noise", "positive_fraction", "spurious_train",
                 "spurious_test"):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    g.add_argument("--decoys", type=int, default=defaults.decoys)
    g.add_argument("--target", choices=sorted(synthetic.TARGETS), default=defaults.target,
                   help="stored label: violence (the moderation task), or scene_quadrant (8 classes) or scene "
                        "(2 classes) for pretraining")
    g.add_argument("--ground-truth", action="store_true",
                   help="also write every splat's cue and the Bayes posterior into each sample's json")
    return p


def _write(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict:
    """Write the shards the parsed command line asks for; returns the dataset card."""
    if args.synthetic:
        knobs = {k: getattr(args, k) for k in ("cue_strength", "caption_info", "label_noise", "positive_fraction",
                                                "spurious_train", "spurious_test", "decoys", "target", "ground_truth")}
        return write_synthetic(args.out, samples=args.samples, image_size=args.image_size or 96, seed=args.seed,
                               max_samples=args.max_samples_per_shard or 256, workers=args.workers,
                               overwrite=args.overwrite, test_fraction=args.test_fraction,
                               tokenizer=_tokenizer_flag(args.tokenizer), **knobs)
    if args.manifest:
        if not args.labels:
            p.error("--manifest needs --labels: the declared set fixes class indices across data sets")
        rows, labels, source = read_manifest(args.manifest), None, f"manifest:{args.manifest}"
    else:
        rows, labels = read_folder(args.folder)
        source = f"folder:{args.folder}"
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else labels
    root = None if args.allow_outside_root else (
        args.data_root or (Path(args.manifest).parent if args.manifest else args.folder))
    return write_shards(rows, args.out, labels=labels, source=source, image_size=args.image_size or 0,
                        quality=args.quality, fmt=args.format,
                        max_samples=args.max_samples_per_shard or 1000,
                        max_bytes=args.max_bytes_per_shard, workers=args.workers,
                        test_fraction=args.test_fraction, seed=args.seed, strict=args.strict,
                        overwrite=args.overwrite, data_root=root, keep_original=args.keep_original_bytes,
                        max_pixels=args.max_pixels, max_caption_bytes=args.max_caption_bytes,
                        tokenizer=_tokenizer_flag(args.tokenizer))


def _tokenizer_flag(value: str) -> str | None:
    return None if value.lower() == "none" else value


# The generator's float knobs, one --flag each (see _parser).
SYNTHETIC_KNOBS = ("cue_strength", "caption_info", "label_noise", "positive_fraction", "spurious_train",
                   "spurious_test")


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0, or 2 after one line `python -m mgn.shards: error: ...` for a bad flag or input."""
    return run_command("python -m mgn.shards", lambda: _main(argv))


def _check_flags(args: argparse.Namespace) -> None:
    """Every number in range before anything is read or written; one line naming the flag (mgn/cli.py)."""
    low_image = 32 if args.synthetic else 1  # the generator draws at >= 32 px
    for flag, value, low in (("--image-size", args.image_size, low_image),
                             ("--max-samples-per-shard", args.max_samples_per_shard, 1),
                             ("--max-bytes-per-shard", args.max_bytes_per_shard, 1), ("--workers", args.workers, 1),
                             ("--max-pixels", args.max_pixels, 1), ("--max-caption-bytes", args.max_caption_bytes, 1),
                             ("--samples", args.samples, 1)):
        if value is not None:
            require(flag, value, value >= low, f"must be >= {low}")
    require("--quality", args.quality, 1 <= args.quality <= 100, "must be in [1, 100] (JPEG quality)")
    require("--test-fraction", args.test_fraction, 0 <= args.test_fraction <= 1, "must be in [0, 1]")
    if args.synthetic:  # the generator's own checks, its field names given back as the flags that set them
        try:
            synthetic.SyntheticSpec(samples=args.samples, image_size=args.image_size or 96, seed=args.seed,
                                    test_fraction=args.test_fraction, decoys=args.decoys, target=args.target,
                                    **{k: getattr(args, k) for k in SYNTHETIC_KNOBS}).validate()
        except ValueError as error:
            name, _, rest = str(error).partition("=")
            raise ValueError(f"--{name.replace('_', '-')}={rest}" if rest else str(error)) from None


def _main(argv: list[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_flags(args)
    card = _write(args, p)
    for split, info in card["splits"].items():
        print(f"{split}: {info['samples']} samples in {info['shards']} shards {info['per_label']}")
    rejected = card["rejected"]
    if rejected["rows"]:
        print(f"rejected {rejected['rows']} rows {rejected['by_kind']}: see {Path(args.out) / REJECTS_FILE}")
    print(f"wrote {args.out}/{{train,test}}-*.tar, {SIZES_FILE}, {CARD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
