"""Frozen caption encodings computed once: every training caption's text block, pooled to the image grid,
stored beside the run and read by the loader with its sample (`data.text_blocks`).

Why: a frozen text encoder maps a caption to the same block at every epoch, yet encoding it costs a
transformer forward per caption at every step (DistilBERT at 121 tokens: ~10 GFLOP, about half a
MobileOne-S4 training step at 224 px). The per-rank LRU cache (`model.text_cache`) cannot fix that at scale:
samples move between ranks every epoch, so a caption comes back to the rank that cached it with
probability 1/world size. Here the blocks are computed in one pass, the shards split over the ranks, and a
training step reads H x g x g bf16 values per sample instead (768 x 7 x 7: 75 KB at the paper's shapes).

Layout: `<data.text_blocks>/<shard file name>.<digest of its path>.blocks.safetensors`, one per training shard
(one folder can serve several data sets), holding the tensor
`blocks` [N, H, g, g] (bf16, the shard's N samples in tar order) and two metadata strings: `keys` (JSON list,
checked against every sample read, so blocks of an older version of a shard are never paired with new
images) and `fingerprint` (what the blocks depend on: the text model's weights, seq_len, the grid, the
caption byte cap). A missing or stale file is (re)computed at the start of training; nothing else is.
Training only: evaluation encodes its captions as before (the teacher's accuracy is a diagnostic).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mgn import distributed
from mgn.config import Config, resolve_text_model
from mgn.decode import cap_caption
from mgn.tokens import tokenize
from mgn.model import TextBlockEncoder, grid_size
from mgn.shard_io import is_url, open_shard, shard_name
from mgn.shard_sets import expand_shards
from mgn.tar import tar_samples

log = logging.getLogger(__name__)

SUFFIX = ".blocks.safetensors"
DTYPE = torch.bfloat16  # blocks are inputs to a conv fusion: bf16's 8 bits of mantissa are plenty


class TextBlockError(RuntimeError):
    """The precomputed blocks cannot serve this run (another text model or shape, or another shard version)."""


def sidecar(folder: str | Path, shard: str) -> Path:
    """The blocks file of a shard: its file name and a digest of where it lives, so that one folder serves
    several training sets whose shards share names (train-000000.tar of two data sets)."""
    where = shard if is_url(shard) else os.path.abspath(shard)
    return Path(folder) / f"{shard_name(shard)}.{hashlib.sha256(where.encode()).hexdigest()[:10]}{SUFFIX}"


def fingerprint(cfg: Config, encoder: TextBlockEncoder) -> str:
    """What the blocks depend on, as one string: a change of any makes every file stale."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return json.dumps({"text_model": resolve_text_model(cfg.model.text_model), "weights_sha256": digest.hexdigest(),
                       "seq_len": cfg.model.seq_len, "grid": list(grid_size(cfg.model)),
                       "max_caption_bytes": cfg.data.max_caption_bytes}, sort_keys=True)


def ensure(cfg: Config, encoder: TextBlockEncoder, device: torch.device, batch_size: int = 256) -> None:
    """Every training shard's blocks present and current: the ranks compute the missing or stale ones
    (shard i on rank i mod world size), then wait for each other. Called by every rank before its loader."""
    if not encoder.frozen:
        raise TextBlockError("data.text_blocks needs model.freeze_text true: a trained text encoder changes "
                             "its blocks at every step")
    expected = fingerprint(cfg, encoder)
    shards = expand_shards(cfg.data.train_shards)
    folder = Path(cfg.data.text_blocks)
    folder.mkdir(parents=True, exist_ok=True)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    # rank 0's list for all: a rank that looked after another had written a file would split a shorter list
    stale = distributed.gather_objects([s for s in shards if read_fingerprint(sidecar(folder, s)) != expected]
                                       if rank == 0 else None)[0]
    mine = stale[rank::world]
    if stale and rank == 0:
        log.info("MGN: text blocks: computing %d of %d shards' caption encodings into %s (once; later runs of "
                 "this text model and shape read them)", len(stale), len(shards), folder)
    encoder = encoder.to(device).eval()
    for shard in mine:
        write_blocks(cfg, encoder, shard, sidecar(folder, shard), expected, device, batch_size)
    distributed.barrier()
    missing = [s for s in shards if read_fingerprint(sidecar(folder, s)) != expected]
    if missing:
        raise TextBlockError(f"text blocks missing or stale after the pass: {sidecar(folder, missing[0])} (and "
                             f"{len(missing) - 1} more); data.text_blocks={cfg.data.text_blocks!r} must be a folder "
                             f"every node sees (each rank computes some shards, and every rank reads them all)")


def read_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (OSError, SafetensorError):  # absent, cut short, or not a safetensors file: computed again
        return None


@torch.no_grad()
def write_blocks(cfg: Config, encoder: TextBlockEncoder, shard: str, path: Path, expected: str,
                 device: torch.device, batch_size: int) -> None:
    """One shard's blocks, in its tar order, written atomically (a killed pass leaves no half file).

    A sample without a readable caption gets a zero block (an empty caption's block): the loader skips it
    anyway, as it would without blocks."""
    keys, captions = [], []
    with open_shard(shard) as f:
        for sample in tar_samples(f, max_member_bytes=cfg.data.max_member_bytes):
            keys.append(sample["__key__"])
            captions.append(_caption(sample.get("txt"), cfg.data.max_caption_bytes))
    grid = grid_size(cfg.model)
    blocks = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        ids, mask = tokenize(resolve_text_model(cfg.model.text_model), cfg.model.seq_len,
                             [c or "" for c in chunk])
        mask[[i for i, c in enumerate(chunk) if c is None]] = 0
        blocks.append(encode_blocks(encoder, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
                                    grid).cpu())
    save_blocks(path, keys, torch.cat(blocks) if blocks else torch.zeros(0, encoder.hidden_size, *grid, dtype=DTYPE),
                expected)


@torch.no_grad()
def encode_blocks(encoder: TextBlockEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  grid: tuple[int, int]) -> torch.Tensor:
    """What is stored for a batch of tokenized captions: the encoder's blocks pooled to the image grid, in DTYPE."""
    return F.adaptive_avg_pool2d(encoder.encode(input_ids, attention_mask).float(), grid).to(DTYPE)


def save_blocks(path: Path, keys: list[str], blocks: torch.Tensor, expected: str) -> None:
    """One shard's file: `blocks` [len(keys), H, g, g] in the shard's order; written whole or not at all."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file({"blocks": blocks.to(DTYPE).contiguous()}, str(partial),
              metadata={"keys": json.dumps(keys), "fingerprint": expected})
    os.replace(partial, path)


def _caption(data: bytes | None, max_bytes: int) -> str | None:
    if data is None:
        return None
    try:
        return cap_caption(data, max_bytes)
    except ValueError:
        return None


class TextBlockReader:
    """The loader's side, in the main process: a batch's blocks from their (shard, index, key) references.

    Workers only name each sample's block; the main process copies the rows here, from files memory-mapped as
    raw bf16 bits (uint16) through their safetensors header (8 bytes of length, then JSON: read, never
    executed). Measured at the paper's shapes (768 x 7 x 7 bf16, 75 KB a sample), a worker that copied the
    blocks and handed them over in shared memory spent ~190 CPU-us more per sample than one that tokenizes;
    the copy here costs ~10. The files of the shards in flight stay mapped (at most `open_files`)."""

    def __init__(self, folder: str, open_files: int = 64):
        self.folder, self.open_files = folder, open_files
        self.mapped: OrderedDict[str, tuple[np.ndarray, list[str]]] = OrderedDict()

    def batch(self, refs: list[tuple[str, int, str]]) -> torch.Tensor:
        """[B, H, g, g] bf16 for the samples (shard, index in its tar, key) of a batch."""
        rows = [self.row(*ref) for ref in refs]
        bits = np.stack(rows)
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)

    def row(self, shard: str, index: int, key: str) -> np.ndarray:
        if shard not in self.mapped:
            self.mapped[shard] = map_blocks(sidecar(self.folder, shard))
            if len(self.mapped) > self.open_files:
                self.mapped.popitem(last=False)
        self.mapped.move_to_end(shard)
        rows, keys = self.mapped[shard]
        if index >= len(keys) or keys[index] != key:
            found = keys[index] if index < len(keys) else "nothing"
            raise TextBlockError(f"{sidecar(self.folder, shard)} was computed from another version of {shard}: "
                                 f"its sample {index} is {key!r}, the blocks hold {found!r} there; delete the file "
                                 f"and the next run computes it again")
        return rows[index]


def map_blocks(path: Path) -> tuple[np.ndarray, list[str]]:
    """(rows [N, H, g, g] uint16, memory-mapped; keys) of one blocks file."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    entry = header["blocks"]
    if entry["dtype"] != "BF16":
        raise TextBlockError(f"{path}: blocks stored as {entry['dtype']}, expected BF16; delete the file")
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    rows = np.memmap(path, dtype=np.uint16, mode="r", offset=8 + length + start, shape=shape) if end > start \
        else np.zeros(shape, dtype=np.uint16)
    return rows, json.loads(header["__metadata__"]["keys"])
