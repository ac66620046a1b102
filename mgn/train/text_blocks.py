"""Frozen caption encodings computed once: every training caption's text block, pooled to the image grid,
stored beside the run and read by the loader with its sample (`data.text_blocks`).

Why: a frozen text encoder maps a caption to the same block at every epoch, yet encoding it costs a
transformer forward per caption at every step (DistilBERT at 121 tokens: ~10 GFLOP, about half a
MobileOne-S4 training step at 224 px). The per-rank LRU cache (`model.text_cache`) cannot fix that at scale:
samples move between ranks every epoch, so a caption comes back to the rank that cached it with
probability 1/world size. Here the blocks are computed in one pass, the shards split over the ranks, and a
training step reads H x g x g bf16 values per sample instead (768 x 7 x 7: 75 KB at the paper's shapes).

The files, their checksum and how the loader reads them: mgn/data/block_files.py. At the start of training a
missing or stale file is (re)computed, and every other one is verified against its checksum, split over the
ranks, and computed again when damaged, with a line naming it; nothing else is. Training only: evaluation
encodes its captions as before (the teacher's accuracy is a diagnostic).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from mgn import distributed
from mgn.config import Config, resolve_text_model
from mgn.data.block_files import DTYPE, TextBlockError, read_fingerprint, save_blocks, sidecar, verify
from mgn.data.decode import cap_caption
from mgn.data.tokens import tokenize
from mgn.io.sample_fields import SampleFields
from mgn.io.shard_sets import expand_shards, sample_fields
from mgn.io.sources import open_shard
from mgn.io.tar import tar_samples
from mgn.model.networks import TextBlockEncoder, grid_size
from mgn.train.engine import autocast, precision

log = logging.getLogger(__name__)


def fingerprint(cfg: Config, encoder: TextBlockEncoder, device: torch.device) -> str:
    """What the blocks depend on, as one string: a change of any makes every file stale."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return json.dumps({"text_model": resolve_text_model(cfg.model.text_model),
                       "weights_sha256": digest.hexdigest(),
                       "seq_len": cfg.model.seq_len, "grid": list(grid_size(cfg.model)),
                       "max_caption_bytes": cfg.data.max_caption_bytes, "precision": precision(cfg, device)},
                      sort_keys=True)



def ensure(cfg: Config, encoder: TextBlockEncoder, device: torch.device, batch_size: int = 256) -> None:
    """Every training shard's blocks present and current: the ranks compute the missing or stale ones
    (shard i on rank i mod world size), then wait for each other. Called by every rank before its loader."""
    if not encoder.frozen:
        raise TextBlockError("data.text_blocks needs model.freeze_text true: a trained text encoder changes "
                             "its blocks at every step")
    expected = fingerprint(cfg, encoder, device)
    shards = expand_shards(cfg.data.train_shards)
    folder = Path(cfg.data.text_blocks)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TextBlockError(f"data.text_blocks={cfg.data.text_blocks!r}: cannot make the folder "
                             f"({error})") from None
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    # rank 0's list for all: a rank that looked after another had written a file would split a shorter list
    stale = distributed.gather_objects([s for s in shards if read_fingerprint(sidecar(folder, s)) != expected]
                                       if rank == 0 else None)[0]
    mine = stale[rank::world]
    if stale and rank == 0:
        log.info("MGN: text blocks: computing %d of %d shards' caption encodings into %s (once; later runs "
                 "of "
                 "this text model and shape read them)", len(stale), len(shards), folder)
    for shard in [s for s in shards if s not in stale][rank::world]:  # the current ones, this rank's share
        problem = verify(sidecar(folder, shard))
        if problem:
            log.warning("MGN: text blocks: %s %s: computing it again", sidecar(folder, shard), problem)
            mine.append(shard)
    encoder = encoder.to(device).eval()
    for shard in mine:
        write_blocks(cfg, encoder, shard, sidecar(folder, shard), expected, device, batch_size)
    distributed.barrier()
    missing = [s for s in shards if read_fingerprint(sidecar(folder, s)) != expected]
    if missing:
        raise TextBlockError(f"text blocks missing or stale after the pass: {sidecar(folder, missing[0])} "
                             "(and "
                             f"{len(missing) - 1} more); data.text_blocks={cfg.data.text_blocks!r} must be a "
                             "folder "
                             "every node sees (each rank computes some shards, and every rank reads them "
                             "all)")


@torch.no_grad()
def write_blocks(cfg: Config, encoder: TextBlockEncoder, shard: str, path: Path, expected: str,
                 device: torch.device, batch_size: int) -> None:
    """One shard's blocks, in its tar order, written atomically (a killed pass leaves no half file).

    A sample without a readable caption gets a zero block (an empty caption's block): the loader skips it
    anyway, as it would without blocks."""
    keys, captions = [], []
    fields = sample_fields(cfg.data.train_shards)
    with open_shard(shard) as f:
        for sample in tar_samples(f, max_member_bytes=cfg.data.max_member_bytes):
            keys.append(sample["__key__"])
            captions.append(_caption(fields, sample, cfg.data.max_caption_bytes))
    grid = grid_size(cfg.model)
    blocks = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        ids, mask = tokenize(resolve_text_model(cfg.model.text_model), cfg.model.seq_len,
                             [c or "" for c in chunk])
        mask[[i for i, c in enumerate(chunk) if c is None]] = 0
        with autocast(cfg, device):  # the arithmetic of the token path, which encodes under the same autocast
            blocks.append(encode_blocks(encoder, torch.from_numpy(ids).to(device),
                                        torch.from_numpy(mask).to(device), grid).cpu())
    save_blocks(path, keys, torch.cat(blocks) if blocks else torch.zeros(0, encoder.hidden_size, *grid,
                                                                         dtype=DTYPE),
                expected)


@torch.no_grad()
def encode_blocks(encoder: TextBlockEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  grid: tuple[int, int]) -> torch.Tensor:
    """What is stored for a batch of tokenized captions: the encoder's blocks pooled to the image grid, in
    DTYPE."""
    return F.adaptive_avg_pool2d(encoder.encode(input_ids, attention_mask).float(), grid).to(DTYPE)



def _caption(fields: SampleFields, sample: dict, max_bytes: int) -> str | None:
    try:
        return cap_caption(fields.caption(sample), max_bytes)
    except ValueError:  # SampleFieldError among them: no caption where the card says
        return None
