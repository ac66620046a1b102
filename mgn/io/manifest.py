"""A user's rows, read and checked: a CSV/JSONL manifest or an image folder -> rows -> samples to encode or
rejects.

The first half of writing shards (`python -m mgn.shards`: mgn/io/encode.py encodes and mgn/shards.py writes
what this returns): reading the manifest or folder into `Row`s, then the cheap checks that need all rows in
order (duplicate ids, labels, captions, splits, paths inside the data root) and the train/test split of rows
that name none. Nothing here opens an image; every row comes out either checked, with its sample key, split
and class index, or as a `Reject` with its line and reason.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mgn.io.images import cap_caption

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_CAPTION_BYTES = 4096  # stored captions are cut to this (recorded in the sample's json and the card)
MAX_CSV_FIELD = 1 << 24  # a CSV cell beyond 16 MB makes its row a reject, not an aborted write
# Control characters a caption may not hold: all of C0 but tab and the line breaks (LF, and the CR of a
# CRLF), DEL, C1. They are no text a viewer sees (a NUL is a file's bytes pasted into a caption) and
# tokenizers drop them silently; rejected with their line rather than cleaned, as every other bad row is.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass
class Row:
    """One input row before any check; `line` is where to look in the manifest."""

    line: int
    where: str
    image: str
    caption: str
    label: str
    id: str | None = None
    split: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Reject:
    """A row that does not become a sample: where it is, the kind of problem and why (rejects.jsonl)."""

    line: int
    where: str
    kind: str  # missing_file | outside_root | unreadable_image | too_large | too_thin | empty_caption |
    #            control_characters | unknown_label | duplicate_id | bad_split | bad_row
    reason: str
    id: str | None = None
    image: str | None = None


# ---------------------------------------------------------------------------------------------- inputs

def read_manifest(path: str | Path) -> list[Row]:
    """CSV with a header or JSON Lines; columns image, caption, label, optional id and split.

    Image paths are relative to the manifest's folder. Other columns go to the sample's json.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    base = path.parent
    rows = _jsonl_rows(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _csv_rows(path)
    for row in rows:
        if row.image and not os.path.isabs(row.image):
            row.image = str(base / row.image)
    return rows


def _csv_rows(path: Path) -> list[Row]:
    previous = csv.field_size_limit(MAX_CSV_FIELD)  # the module's default, 128 KB, aborts on one long caption
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"image", "caption", "label"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: header lacks column(s) {sorted(missing)}; found "
                                 f"{reader.fieldnames}")
            rows = []
            while True:
                first_line = reader.line_num + 1
                try:
                    values = next(reader)
                    line = reader.line_num
                except StopIteration:
                    return rows
                except csv.Error as exc:  # e.g. a cell over MAX_CSV_FIELD: this row goes, the others stay
                    values, line = {"__error__": f"unreadable CSV row: {exc}"}, first_line
                rows.append(_row(line, f"{path.name}:{line}", values))
    finally:
        csv.field_size_limit(previous)


def _jsonl_rows(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                values = json.loads(text)
                if not isinstance(values, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                values = {"__error__": f"invalid JSON: {exc}"}
            rows.append(_row(line_no, f"{path.name}:{line_no}", values))
    return rows


def _row(line: int, where: str, values: dict) -> Row:
    values = {k: v for k, v in values.items() if k is not None}  # csv puts surplus cells under None
    known = {"image", "caption", "label", "id", "split"}
    text = {k: "" if values.get(k) is None else str(values[k]).strip() for k in known}
    extra = {k: v for k, v in values.items() if k not in known}
    return Row(line, where, text["image"], text["caption"], text["label"], text["id"] or None,
               text["split"] or None, extra)


def read_folder(root: str | Path) -> tuple[list[Row], list[str]]:
    """`root/<label>/<name>.jpg` with the caption in `<name>.txt`; or the same under root/train, root/test."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    split_dirs = [(s, root / s) for s in SPLITS if (root / s).is_dir()]
    rows, labels = [], set()
    for split, base in split_dirs or [(None, root)]:
        for label_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            labels.add(label_dir.name)
            for image in sorted(p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                txt = image.with_suffix(".txt")
                caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
                where = str(image.relative_to(root))
                rows.append(Row(len(rows) + 1, where, str(image), caption, label_dir.name,
                                f"{label_dir.name}_{image.stem}", split))
    return rows, sorted(labels)


# ---------------------------------------------------------------------------------------------- checks

def sample_key(row_id: str) -> str:
    """WebDataset splits file names at the first dot, so keys keep only [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", row_id)


def check_rows(rows: list[Row], labels: list[str], *, test_fraction: float, seed: int,
               root: Path | None = None,
               max_caption_bytes: int = MAX_CAPTION_BYTES) -> list[tuple[Row, str, str, int] | Reject]:
    """The cheap, order-dependent checks (ids, labels, captions, splits, paths), done once in this process.

    With `root`, an image whose path resolves outside it (an absolute path, a `..` escape, a symlink that
    points elsewhere) is rejected: a manifest from someone else must not copy arbitrary files into shards.
    Captions longer than `max_caption_bytes` are cut (the sample's json records the original length).
    """
    checked, first_line = [], {}
    root = root.resolve() if root is not None else None
    for row in rows:
        key = sample_key(row.id) if row.id else f"row{row.line:07d}"

        def bad(kind: str, reason: str) -> None:
            checked.append(Reject(row.line, row.where, kind, reason, row.id, row.image or None))

        if "__error__" in row.extra:
            bad("bad_row", row.extra["__error__"])
        elif key in first_line:
            bad("duplicate_id", f"duplicate id {row.id!r} (as key {key!r}; first on line {first_line[key]})")
        elif not row.caption:
            bad("empty_caption", "empty caption")
        elif control := CONTROL_CHARACTERS.search(row.caption):
            bad("control_characters", f"caption holds the control character U+{ord(control.group()):04X} at "
                                      f"character {control.start() + 1} (allowed: tab and line breaks)")
        elif row.label not in labels:
            bad("unknown_label", f"label {row.label!r} not in the declared set {labels}")
        elif row.split is not None and row.split.lower() not in SPLITS:
            bad("bad_split", f"split {row.split!r} is not one of {list(SPLITS)}")
        elif not row.image:
            bad("missing_file", "no image path")
        elif root is not None and not Path(row.image).resolve().is_relative_to(root):
            bad("outside_root", f"image {row.image!r} resolves to {Path(row.image).resolve()}, outside the "
                                "data "
                                f"root {root} (--data-root; --allow-outside-root to permit it)")
        else:
            raw = row.caption.encode("utf-8")
            if len(raw) > max_caption_bytes:
                row.caption = cap_caption(raw, max_caption_bytes)
                row.extra["caption_truncated_from_bytes"] = len(raw)
            split = row.split.lower() if row.split else _seeded_split(key, test_fraction, seed)
            checked.append((row, key, split, labels.index(row.label)))
        first_line.setdefault(key, row.line)
    return checked


def _seeded_split(key: str, test_fraction: float, seed: int) -> str:
    """Depends on the key only, so adding rows never moves an existing sample to the other split."""
    digest = hashlib.sha1(f"{seed}/{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"
