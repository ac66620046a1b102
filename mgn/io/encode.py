"""One sample for a shard, checked and encoded: its image read, decoded in full and re-encoded as 8-bit RGB.

    encode_row(item, ...) -> Record (ready to write) | Reject (why not), in the encoding worker processes

The first half of writing a row (mgn/shards.py writes the Records into shards): kept apart because it is about
images only (decoding untrusted files safely, resizing, what the stored bytes are) and runs in other
processes, while the writer is about tar files, their names and the set's completeness.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mgn.io.manifest import Reject, Row
from mgn.io.images import DEFAULT_MAX_PIXELS, ImageTooLarge, ImageTooThin, open_capped, to_rgb


@dataclass
class Record:
    """A fully checked and encoded sample, ready to be written in one piece."""

    key: str
    split: str
    label: int
    caption: str
    image: bytes
    ext: str
    meta: dict


def encode_row(item: tuple[Row, str, str, int] | Reject, *, labels: list[str], image_size: int, quality: int,
               fmt: str, keep_original: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Record | Reject:
    """Read and re-encode one image (runs in the worker processes); rejects pass through in order."""
    if isinstance(item, Reject):
        return item
    row, key, split, label = item
    path = Path(row.image)
    if not path.is_file():
        return Reject(row.line, row.where, "missing_file", f"missing file {row.image}", row.id, row.image)
    try:
        data = path.read_bytes()
        image, ext = _encode_image(data, image_size, quality, fmt, keep_original, max_pixels)
    except ImageTooLarge as exc:
        return Reject(row.line, row.where, "too_large", f"image too large: {exc} (--max-pixels)", row.id,
                      row.image)
    except ImageTooThin as exc:
        return Reject(row.line, row.where, "too_thin", f"image too thin: {exc}", row.id, row.image)
    except Exception as exc:  # PIL raises many types for bad files; all mean the same here
        return Reject(row.line, row.where, "unreadable_image", f"unreadable image: {exc}", row.id, row.image)
    meta = {"id": row.id or key, "label": labels[label], "source": row.where, **row.extra}
    return Record(key, split, label, row.caption, image, ext, meta)


def _encode_image(data: bytes, image_size: int, quality: int, fmt: str, keep_original: bool = False,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """Decode fully (so broken files are caught here, not in training) and re-encode as 8-bit RGB.

    Re-encoding drops what rides along in a file (EXIF with GPS, bytes after a JPEG's end); with
    `keep_original` an RGB, upright, small-enough JPEG is stored byte for byte instead. A JPEG over
    `max_pixels` is decoded at a reduced scale and stored within the cap; anything else over it is refused.
    """
    want = image_size or int(max_pixels ** 0.5)
    with open_capped(data, max_pixels, want) as image:
        drafted = image.size != Image.open(io.BytesIO(data)).size
        image.load()
        upright = image.getexif().get(0x0112, 1) == 1
        small = not image_size or min(image.size) <= image_size
        if keep_original and fmt == "jpg" and image.format == "JPEG" and image.mode == "RGB" and upright \
                and small and not drafted:
            return data, "jpg"  # asked for: the original bytes, no second loss
        image = to_rgb(image)
        if image.width * image.height > max_pixels:  # a drafted JPEG can still be a little over
            scale = (max_pixels / (image.width * image.height)) ** 0.5
            image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                                 Image.BICUBIC)
        if image_size and min(image.size) > image_size:
            scale = image_size / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BICUBIC)
        out = io.BytesIO()
        if fmt == "png":
            image.save(out, format="PNG")
        else:
            image.save(out, format="JPEG", quality=quality)
        return out.getvalue(), fmt
