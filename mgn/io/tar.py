"""Reading WebDataset tar shards: regular files out of a tar stream, grouped into samples by key.

A few lines of header parsing instead of `tarfile`, whose per-member objects cost more than decoding a
small JPEG. Handles ustar (what webdataset and mgn.shards write), GNU long names and pax paths;
checksums are verified (a few us a header: worth it to catch a corrupt shard). Member names that would
point outside a folder (`../x`, `/x`) are never used as paths here: a sample's key is only a dictionary key.

Shards may come from anywhere, so what is in one decides neither the exception type nor the memory used:
- every problem raises `ShardError` (a `tarfile.ReadError`, which callers already catch), naming the shard,
  the byte offset of the header and, once its header could be read, the member. A tar has no index to
  resynchronise on, so the rest of that shard is unreadable; the loader counts what it loses.
- a member's size is checked before anything is read: more than `max_member_bytes`, or more than what is
  left of the file (when it is seekable; a pipe is not), is an error, never an allocation of that size.
- member names that are not UTF-8 (a latin-1 file name, a pax path with a stray byte) are read, their bad
  bytes written as `\\xff`: the key stays exactly as distinct as the raw names were (a file and its
  siblings still group into one sample, two latin-1 names never merge, as they would with U+FFFD), and it
  stays printable text for logs, error messages and eval.json, which surrogate escapes would break far
  from here with a UnicodeEncodeError. Skipping such members instead would lose good samples.
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator

from mgn.cli import UserError

MAX_MEMBER_BYTES = 64 << 20  # the default of data.max_member_bytes (mgn/config.py): far above any real image
_ZERO_BLOCK = bytes(512)


class ShardError(tarfile.ReadError, UserError):
    """A shard that cannot be read past this point; the message says which shard, where and why."""


def tar_files(f, *, max_member_bytes: int = MAX_MEMBER_BYTES,
              keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of the regular files in a tar stream; errors name it by `f.name`. With `keep`, a file it
    refuses (by name) is passed over without being read into memory, and comes with data None."""
    shard = str(getattr(f, "name", "tar stream"))
    left = _bytes_left(f)
    offset, long_name = 0, None
    while True:
        header = f.read(512)
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (a missing end marker is left to the sizes.json check)
        if len(header) < 512:
            raise _error(shard, offset, None, "cut short in a header")
        if not _checksum_ok(header):
            raise _error(shard, offset, None, "bad header checksum")
        kind = header[156:157]
        name = long_name or _tar_name(header)
        size = _tar_size(header[124:136])
        if size is None:
            raise _error(shard, offset, name, "bad size field " + repr(header[124:136].rstrip(b"\0")))
        if size > max_member_bytes:
            raise _error(shard, offset, name, f"size field claims {size:,} bytes, more than "
                                              f"data.max_member_bytes ({max_member_bytes:,})")
        if left is not None and 512 + size > left - offset:
            raise _error(shard, offset, name, f"size field claims {size:,} bytes, only "
                                              f"{left - offset - 512:,} are left in the file")
        regular = kind in (b"0", b"\0", b"7")
        if regular and keep is not None and not keep(name):
            _pass_over(f, size + (-size % 512), shard, offset, name)
            offset += 512 + size + (-size % 512)
            long_name = None
            yield name, None
            continue
        data = f.read(size)
        if len(data) < size:
            raise _error(shard, offset, name, f"cut short: {len(data):,} of the member's {size:,} bytes")
        f.read(-size % 512)
        offset += 512 + size + (-size % 512)
        if kind == b"L":  # GNU long name for the next member
            long_name = _text(data.rstrip(b"\0"))
        elif kind == b"x":  # pax extended header: only the path matters here
            long_name = _pax_path(data) or long_name
        elif regular:
            long_name = None
            yield name, data
        else:  # directories, links, global pax headers: nothing to read
            long_name = None


def tar_samples(f, *, max_member_bytes: int = MAX_MEMBER_BYTES, keep: Callable[[str], bool] | None = None
                ) -> Iterator[dict]:
    """Samples of a shard: consecutive files with the same key, as {"__key__": key, ext: bytes, ...}.

    webdataset's rule: the key is everything up to the first dot of the file name. A file whose
    extension the current sample already has starts a new sample (the caller sees the repeated key).
    `keep(ext)`: the extensions to read; the others are passed over unread (a reader that never looks at a 50
    MB video beside each image need not hold it), yet still count for the grouping, so the samples are the
    same.
    """
    current, seen = None, set()
    wanted = None if keep is None else (lambda name: keep(split_name(name)[1]))
    for name, data in tar_files(f, max_member_bytes=max_member_bytes, keep=wanted):
        key, ext = split_name(name)
        if key is None:
            continue
        if current is not None and (key != current["__key__"] or ext in seen):
            yield current
            current = None
        if current is None:
            current, seen = {"__key__": key}, set()
        seen.add(ext)
        if data is not None:
            current[ext] = data
    if current is not None:
        yield current


def split_name(name: str) -> tuple[str | None, str]:
    """(key, extension): the key is everything up to the first dot of the file name.

    No key for a name without a dot, nor for an extension like the reader's own fields (`__key__`,
    `__url__`): a file named `x.__key__` would otherwise replace the sample's key with bytes."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None, ""
    stem, ext = base.split(".", 1)
    if ext.startswith("__"):
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _pass_over(f, length: int, shard: str, offset: int, name: str) -> None:
    """Move past `length` bytes of the stream without keeping them: a seek where the file allows it, else
    reads of at most 1 MiB."""
    if f.seekable() if hasattr(f, "seekable") else False:
        f.seek(length, os.SEEK_CUR)
        return
    while length > 0:
        chunk = f.read(min(length, 1 << 20))
        if not chunk:
            raise _error(shard, offset, name, "cut short in a member the reader passes over")
        length -= len(chunk)


def _error(shard: str, offset: int, name: str | None, problem: str) -> ShardError:
    member = f" (member {name!r})" if name else ""
    return ShardError(f"{shard}, header at byte {offset:,}{member}: {problem}")


def _bytes_left(f) -> int | None:
    """Bytes from here to the end of a seekable file; None for a stream (a pipe), where only the cap holds."""
    try:
        if not f.seekable():
            return None
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        return None
    return end - here


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    # The checksum field counts as eight spaces (8 * 32 = 256); one pass over the header is ~3x faster than
    # two slices.
    return stored is not None and stored == sum(header) - sum(header[148:156]) + 256


def _tar_size(field: bytes) -> int | None:
    """The size field, or None when it is no size: octal (empty is 0), or GNU base-256 (0x80, then a
    big-endian number) for 8 GiB and more (base-256 starting 0xff is negative: no size either)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    return _octal(field) if field.strip(b"\0 ") else 0


def _octal(field: bytes) -> int | None:
    """An octal number field (NULs and spaces around it), or None: int(x, 8) alone would raise on 8 or 9
    and accept '-1' (a negative size reads the rest of the file), '+7' or '1_0'."""
    digits = field.strip(b"\0 ")
    if not digits.isdigit() or b"8" in digits or b"9" in digits:
        return None
    return int(digits, 8)


def _tar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return _text(name)


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, item = record.partition(b" ")
        if item.startswith(b"path="):
            return _text(item[5:])
    return None


def _text(raw: bytes) -> str:
    """A name as text: UTF-8, with any byte that is not written `\\xff` (the module docstring says why)."""
    return raw.decode("utf-8", "backslashreplace")
