"""Opening untrusted images safely: a pixel cap and an aspect-ratio cap read from the header before
decoding, an error that says what is wrong with a file that is no image, and RGB done right.

Shared by the shard writer (mgn/io/manifest.py, mgn/io/encode.py) and the reader (mgn/data/decode.py), so a
file the writer would refuse is refused the same way when it comes from someone else's shards.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 25_000_000  # 5000 x 5000: far above what the models see, far below a decompression bomb
MAX_ASPECT = 50  # longer side / shorter side: any crop of a thinner image (a 60000 x 1 strip) smears a row
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageTooLarge(ValueError):
    pass


class ImageTooThin(ValueError):
    """Sides more than MAX_ASPECT to 1 apart."""


def open_capped(data: bytes, max_pixels: int, want: int, *, reduce: bool = False) -> Image.Image:
    """Open without decoding. A JPEG over `max_pixels` (or any JPEG with `reduce`) will decode at a reduced
    scale (its `draft`: 1/2 to 1/8, keeping at least `want` pixels a side); anything else over the cap, and
    any image thinner than 1:MAX_ASPECT, is refused before a pixel is decoded."""
    if not data:
        raise ValueError("an empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # PIL's own limit, above ours: the same answer
        raise ImageTooLarge(f"{error} (the cap is {max_pixels:,} pixels)") from None
    except Image.UnidentifiedImageError:  # PIL's message names only its in-memory file object
        raise ValueError(f"not an image in a format PIL reads ({len(data):,} bytes, starting "
                         f"{data[:8]!r})") from None
    width, height = image.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageTooThin(f"{width}x{height}: its sides are more than {MAX_ASPECT} to 1 apart (the cap is "
                           f"1:{MAX_ASPECT})")
    if image.format == "JPEG" and (reduce or width * height > max_pixels):
        image.draft("RGB", (want, want))
    if image.size[0] * image.size[1] > max_pixels:
        raise ImageTooLarge(f"{width}x{height} = {width * height:,} pixels, over the cap of {max_pixels:,}")
    return image


def to_rgb(image: Image.Image, *, upright: bool = True) -> Image.Image:
    """8-bit RGB from any mode: transparency on white, 16-bit scaled (not clipped: a 16-bit PNG converted by
    PIL alone comes out nearly all white), and with `upright` turned by its EXIF orientation (the writer does
    it once; the reader skips it, as it costs a copy of every image)."""
    if upright:
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(pixels / 257.0, 0, 255).round().astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image)
        scale = max(float(np.nanmax(pixels)), 1e-12) if pixels.size else 1.0
        image = Image.fromarray(np.clip(np.nan_to_num(pixels) / scale * 255, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    return image.convert("RGB")


def cap_caption(raw: bytes, max_bytes: int) -> str:
    """UTF-8 text of at most `max_bytes` bytes: decoded strictly (bad UTF-8 raises ValueError, wherever it
    is), except that a character the cut splits in half is dropped."""
    try:
        return raw[:max_bytes].decode("utf-8")
    except UnicodeDecodeError as error:
        if len(raw) > max_bytes and error.start >= max_bytes - 3 and error.reason == "unexpected end of data":
            return raw[:error.start].decode("utf-8")
        raise
