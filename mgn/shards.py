"""Write WebDataset shards from a manifest, a folder of images, or the synthetic generator; or index shards
another tool wrote.

    python -m mgn.shards --manifest data.csv --labels non_violent,violent --out shards/mine
    python -m mgn.shards --folder images/ --out shards/mine   # images/[train|test/]<label>/x.jpg + x.txt
    python -m mgn.shards --synthetic --out shards/demo --samples 2400 --image-size 96 --seed 0
    python -m mgn.shards --index 'mine/*.tar' --labels safe,violent --label-from json:label

--index (img2dataset's or webdataset's ShardWriter's shards) reads the shards once and writes only
`sizes.json`, `dataset_card.json` and `rejects.jsonl` beside them (mgn/data/index.py); the shards stay as
they are. The rest of this help is about writing shards:

Output in --out: `train-%06d.tar` and `test-%06d.tar` (samples `{__key__, jpg|png, txt, cls, json, ids.<fp>}`,
the last the caption's token ids for `--tokenizer`, so loader workers need not tokenize: mgn/data/tokens.py),
`sizes.json` (samples per shard, which the reader needs to give every rank the same number of
batches), `dataset_card.json` (counts per label and split, options, rejects) and `rejects.jsonl`.

Each shard is written under a hidden temporary name and renamed only when complete, and
`sizes.json` is written last: an interrupted run leaves nothing the reader would accept. Bad
rows are checked completely before any byte of them is written, so a shard never holds half a
sample; they go to `rejects.jsonl` with their line and reason, or stop the run with --strict.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from mgn.cli import require, run_command
from mgn.config import PACKAGED_MINILM
from mgn.data.index import index_shards
from mgn.data.writer import CARD_FILE, REJECTS_FILE, SIZES_FILE, write_shards, write_synthetic
from mgn.io import synthetic
from mgn.io.images import DEFAULT_MAX_PIXELS
from mgn.io.manifest import MAX_CAPTION_BYTES, read_folder, read_manifest
from mgn.io.sample_fields import SampleFields


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
    src.add_argument("--index", metavar="SHARDS",
                     help="shards another tool wrote (a quoted glob, brace pattern or .txt list): write "
                          "sizes.json, dataset_card.json and rejects.jsonl beside them, nothing else")
    p.add_argument("--label-from", default="cls",
                   help="with --index: where a sample's label is, cls or json:FIELD (a class index, a name "
                        "from --labels, or true/false)")
    p.add_argument("--caption-from", default="txt",
                   help="with --index: where its caption is, txt or json:FIELD")
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
                   help="store RGB JPEGs that need no resizing byte for byte (keeps their EXIF, GPS "
                        "included, and "
                        "any bytes after the image); default: re-encode every image")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="width x height cap, read from the header before decoding: bigger JPEGs are decoded "
                        "reduced and stored within it, other formats rejected (default 25,000,000)")
    p.add_argument("--max-caption-bytes", type=int, default=MAX_CAPTION_BYTES,
                   help="captions are cut to this many UTF-8 bytes (recorded per sample; default 4096)")
    p.add_argument("--tokenizer", default=PACKAGED_MINILM,
                   help="store each caption's token ids for this tokenizer (hub name, local folder, or "
                        f"{PACKAGED_MINILM}: DistilBERT's uncased vocabulary, the default), so loader "
                        "workers need "
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
                   help="stored label: violence (the moderation task), or scene_quadrant (8 classes) or "
                        "scene "
                        "(2 classes) for pretraining")
    g.add_argument("--ground-truth", action="store_true",
                   help="also write every splat's cue and the Bayes posterior into each sample's json")
    return p


def _write(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict:
    """Write the shards the parsed command line asks for; returns the dataset card."""
    if args.synthetic:
        knobs = {k: getattr(args, k) for k in ("cue_strength", "caption_info", "label_noise",
                                               "positive_fraction",
                                                "spurious_train", "spurious_test", "decoys", "target",
                                                "ground_truth")}
        return write_synthetic(args.out, samples=args.samples, image_size=args.image_size or 96,
                               seed=args.seed,
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
                             ("--max-bytes-per-shard", args.max_bytes_per_shard, 1), ("--workers",
                                                                                      args.workers, 1),
                             ("--max-pixels", args.max_pixels, 1), ("--max-caption-bytes",
                                                                    args.max_caption_bytes, 1),
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


def _index(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """--index: count and check the shards where they are; print what each folder holds."""
    if not args.labels:
        p.error("--index needs --labels: the declared set fixes the class indices")
    try:
        fields = SampleFields(tuple(x.strip() for x in args.labels.split(",")), args.label_from,
                              args.caption_from)
    except ValueError as error:
        p.error(str(error))
    cards = index_shards(args.index, fields, workers=args.workers, overwrite=args.overwrite,
                         max_pixels=args.max_pixels)
    for folder, card in cards.items():
        rejected = card["rejected"]
        print(f"{folder}: {card['samples']} samples in {len(card['shards'])} shards, usable "
              f"{card['per_label']}; wrote {SIZES_FILE}, {CARD_FILE}, {REJECTS_FILE}")
        if rejected["rows"]:
            share = rejected["rows"] / max(card["samples"], 1)
            print(f"{folder}: {rejected['rows']} samples ({share:.1%}) the loader will skip "
                  f"{rejected['by_reason']}: see {folder / REJECTS_FILE}"
                  + (f"; training stops past data.max_skip_fraction (0.01 by default): pass "
                     f"--data.max_skip_fraction {min(1.0, share * 1.5 + 0.01):.2f} to train on these shards"
                     if share > 0.01 else ""))
    return 0


def _main(argv: list[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_flags(args)
    if args.index:
        return _index(args, p)
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
