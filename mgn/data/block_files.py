"""Caption blocks on disk (`data.text_blocks`): one file per training shard, what it holds, how it is verified
and how the loader reads a batch's blocks from it. mgn/train/text_blocks.py computes them.

Layout: `<data.text_blocks>/<shard file name>.<digest of its path>.blocks.safetensors`, one per training shard
(one folder can serve several data sets), holding the tensor `blocks` [N, H, g, g] (bf16, the shard's N
samples in tar order) and three metadata strings: `keys` (JSON list, checked against every sample read, so
blocks of an older version of a shard are never paired with new images), `fingerprint` (what the blocks depend
on: the text model's weights, seq_len, the grid, the caption byte cap, the precision) and `crc32` (of the
blocks' bytes: a flipped byte in the data, which no header check sees, would feed the fusion values up to
1e33).
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mgn.io.sources import is_url, shard_name

SUFFIX = ".blocks.safetensors"
DTYPE = torch.bfloat16  # blocks are inputs to a conv fusion: bf16's 8 bits of mantissa are plenty


class TextBlockError(ValueError):
    """The precomputed blocks cannot serve this run (another shard version, a folder it cannot write): a user
    error, one line naming data.text_blocks (exit code 2, mgn/cli.py)."""



def sidecar(folder: str | Path, shard: str) -> Path:
    """The blocks file of a shard: its file name and a digest of where it lives, so that one folder serves
    several training sets whose shards share names (train-000000.tar of two data sets)."""
    where = shard if is_url(shard) else os.path.abspath(shard)
    return Path(folder) / f"{shard_name(shard)}.{hashlib.sha256(where.encode()).hexdigest()[:10]}{SUFFIX}"



def read_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (OSError, SafetensorError):  # absent, cut short, or not a safetensors file: computed again
        return None



def save_blocks(path: Path, keys: list[str], blocks: torch.Tensor, expected: str) -> None:
    """One shard's file: `blocks` [len(keys), H, g, g] in the shard's order, with the CRC-32 of their bytes;
    written whole or not at all."""
    blocks = blocks.to(DTYPE).contiguous()
    crc = zlib.crc32(blocks.view(torch.int16).numpy().tobytes())
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file({"blocks": blocks}, str(partial),
                  metadata={"keys": json.dumps(keys), "fingerprint": expected, "crc32": str(crc)})
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise TextBlockError(f"data.text_blocks={str(path.parent)!r}: cannot write {path.name} ({error}); "
                             "make the "
                             f"folder writable, or name another") from None



def verify(path: Path) -> str | None:
    """None when the file's blocks are whole and match their checksum; else what is wrong, in words."""
    try:
        rows, _, header = _open_blocks(path)
        stored = header["__metadata__"]["crc32"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"cannot be read ({type(error).__name__}: {error})"
    crc = 0
    flat = rows.reshape(-1)
    for start in range(0, flat.size, 1 << 24):  # 32 MB at a time
        crc = zlib.crc32(flat[start:start + (1 << 24)].tobytes(), crc)
    return None if str(crc) == stored else "is damaged (its blocks do not match their checksum)"



class TextBlockReader:
    """The loader's side, in the main process: a batch's blocks from their (shard, index, key) references.

    Workers only name each sample's block; the main process copies the rows here, from files memory-mapped as
    raw bf16 bits (uint16) through their safetensors header (8 bytes of length, then JSON: read, never
    executed). At the paper's shapes (768 x 7 x 7 bf16, 75 KB a sample) a worker that copied the blocks and
    handed them over in shared memory spent far more per sample than one that tokenizes; the copy here is a
    small part of that (benchmarks/results/README.md, "Loader throughput"). The files of the shards in flight
    stay mapped (at most `open_files`)."""

    def __init__(self, folder: str, open_files: int = 64):
        self.folder, self.open_files = folder, open_files
        self.mapped: OrderedDict[str, tuple[np.ndarray, list[str]]] = OrderedDict()

    def batch(self, refs: list[tuple[str, int, str]], pin: bool = False) -> torch.Tensor:
        """[B, H, g, g] bf16 for the samples (shard, index in its tar, key) of a batch; with `pin`, made in
        page-locked memory (torch's caching host allocator): the one copy the rows need anyway, no second one
        to pin them."""
        rows = [self.row(*ref) for ref in refs]
        out = torch.empty((len(rows), *rows[0].shape), dtype=DTYPE, pin_memory=pin)
        np.stack(rows, out=out.view(torch.int16).numpy().view(np.uint16))
        return out

    def row(self, shard: str, index: int, key: str) -> np.ndarray:
        if shard not in self.mapped:
            self.mapped[shard] = map_blocks(sidecar(self.folder, shard))
            if len(self.mapped) > self.open_files:
                self.mapped.popitem(last=False)
        self.mapped.move_to_end(shard)
        rows, keys = self.mapped[shard]
        if index >= len(keys) or keys[index] != key:
            found = keys[index] if index < len(keys) else "nothing"
            raise TextBlockError(f"{sidecar(self.folder, shard)} was computed from another version of "
                                 f"{shard}: "
                                 f"its sample {index} is {key!r}, the blocks hold {found!r} there; delete "
                                 "the file "
                                 f"and the next run computes it again")
        return rows[index]



def map_blocks(path: Path) -> tuple[np.ndarray, list[str]]:
    """(rows [N, H, g, g] uint16, memory-mapped; keys) of one blocks file (verified at the run's start)."""
    rows, keys, _ = _open_blocks(path)
    return rows, keys



def _open_blocks(path: Path) -> tuple[np.ndarray, list[str], dict]:
    """(rows, keys, header) of one blocks file, its header read as data (8 bytes of length, then JSON)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= path.stat().st_size - 8:
            raise ValueError(f"a header of {length} bytes in a file of {path.stat().st_size}")
        header = json.loads(f.read(length))
    entry = header["blocks"]
    if entry["dtype"] != "BF16":
        raise TextBlockError(f"{path}: blocks stored as {entry['dtype']}, expected BF16; delete the file")
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - start != 2 * int(np.prod(shape)):
        raise ValueError(f"{end - start} data bytes for blocks of shape {list(shape)}")
    rows = np.memmap(path, dtype=np.uint16, mode="r", offset=8 + length + start, shape=shape) if end > start \
        else np.zeros(shape, dtype=np.uint16)
    return rows, json.loads(header["__metadata__"]["keys"]), header
