"""WebDataset input pipelines: equal batches on every rank for training, every test sample once for eval.

Training, per epoch: the shard list is shuffled with (seed, epoch), identically on every rank, and its
samples, concatenated in that order, are cut into one contiguous range per rank and then per DataLoader
worker, balanced by sample count (`sizes.json`), not by shard: a rank or worker may read part of a
shard, so uneven shards neither idle a rank nor make it repeat a small shard many times. Each worker
reads its range, shuffles raw samples in a buffer, decodes to RGB, applies the train transform, batches
and tokenizes. The number of batches per rank is fixed up front: ceil(samples / (batch_size x world_size)),
the same on every rank and for any `num_workers`; each worker's range holds exactly its batches' worth of
samples, so only the last global batch of an epoch can be short: its missing places (fewer than batch_size x
world_size) are filled by reading the rank's range again, reshuffled. `TrainLoader.balance` reports the
repeated and never-seen shares per epoch.

The order is a function of (seed, epoch, rank, num_workers), and augmentation is seeded per sample (seed,
epoch, key, pass), so a resumed run skips what it already consumed as raw samples, before any decoding
or tokenization (`skip_batches`), and continues with exactly the batches an uninterrupted run would have
seen (unless undecodable samples lie in the skipped part: each one shifts the rest of the stream by a
sample); batches come out in a fixed round-robin order of the workers, whatever the resume point.

Evaluation reads the samples in order, split the same way but without repetition or shuffling, and keeps
the last partial batch: every test sample is read exactly once across all ranks.

Bad samples (truncated tar, undecodable image, missing field, duplicate key) are skipped and counted
per shard; samples lost to a truncated tar are counted from `sizes.json`. The counts travel with the
batches and the loader aggregates them: `loader.skipped()`. More than `max_skip_fraction` of the
samples skipped stops the run with an error naming the shards.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mgn.config import Config, DataConfig, resolve_text_model
from mgn.images import DEFAULT_MAX_PIXELS, cap_caption, open_capped, to_rgb
from mgn.model import image_normalisation
from mgn.tar import tar_samples

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
TRAIN_SCALE, TRAIN_RATIO = (0.6, 1.0), (3 / 4, 4 / 3)
EVAL_CROP_PCT = 0.875  # timm's default for MobileOne: resize to size/0.875, centre-crop size
MAX_EXAMPLES = 20  # skip reasons kept for the report
BALANCE_WARNING = 0.05  # warn when more than this share of an epoch repeats or is never seen


# ---------------------------------------------------------------------------------------------- shard lists

def expand_shards(spec: str) -> list[str]:
    """Brace pattern, glob, or a .txt file listing shards (relative to the file); '::' joins several."""
    shards: list[str] = []
    for part in spec.split("::"):
        if part.endswith(".txt"):
            listing = Path(part)
            if not listing.is_file():
                raise FileNotFoundError(f"shard list {part!r} (from {spec!r}) does not exist")
            lines = [x.strip() for x in listing.read_text().splitlines()]
            found = [str(listing.parent / x) for x in lines if x and not x.startswith("#")]
        else:
            found = []
            for pattern in braceexpand.braceexpand(part):
                found += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        shards += found
    if not shards:
        raise FileNotFoundError(f"no shards match {spec!r}")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards from {spec!r} do not exist, "
                                f"e.g. {missing[:3]}")
    repeated = [s for s, n in Counter(shards).items() if n > 1]
    if repeated:
        raise ValueError(f"shards listed more than once in {spec!r}: {repeated[:3]}")
    return shards


def class_names(spec: str) -> list[str]:
    """The label names of a shard set, from the `dataset_card.json` beside its first shard ([] if there is none)."""
    try:
        card = Path(expand_shards(spec)[0]).parent / "dataset_card.json"
        return [str(x) for x in json.loads(card.read_text())["labels"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def read_sizes(shards: list[str]) -> dict[str, int]:
    """Samples per shard from the `sizes.json` beside each shard (written by mgn.shards)."""
    tables: dict[Path, dict] = {}
    sizes, missing = {}, []
    for shard in shards:
        folder = Path(shard).parent
        if folder not in tables:
            path = folder / "sizes.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the loader needs samples per shard to give every rank the same "
                    f"number of batches (write shards with `python -m mgn.shards`, which writes it last)")
            tables[folder] = json.loads(path.read_text())
        count = tables[folder].get(Path(shard).name)
        if count is None:
            missing.append(shard)
        else:
            sizes[shard] = int(count)
    if missing:
        raise ValueError(f"sizes.json lacks {len(missing)} shard(s), e.g. {missing[:3]}; "
                         f"was the shard set rewritten or interrupted?")
    return sizes


# ---------------------------------------------------------------------------------------------- splitting

@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, counted in the order the shard holds them."""
    shard: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_samples(pieces: list[Piece], parts: int) -> list[list[Piece]]:
    """Cut the samples of `pieces` (in order) into `parts` contiguous ranges of near-equal size.

    Part i gets samples [floor(i T / parts), floor((i + 1) T / parts)) of the T samples, so sizes differ
    by at most one, whatever the shard sizes.
    """
    total = sum(p.size for p in pieces)
    return cut_samples(pieces, [i * total // parts for i in range(parts + 1)])


def cut_samples(pieces: list[Piece], bounds: list[int]) -> list[list[Piece]]:
    """Part i holds samples [bounds[i], bounds[i + 1]) of the pieces' samples, counted in order."""
    out: list[list[Piece]] = [[] for _ in range(len(bounds) - 1)]
    offset = 0
    for piece in pieces:
        for part in range(len(out)):
            low, high = max(bounds[part], offset), min(bounds[part + 1], offset + piece.size)
            if low < high:
                out[part].append(Piece(piece.shard, piece.start + low - offset, piece.start + high - offset))
        offset += piece.size
    return out


def batches_per_epoch(total_samples: int, batch_size: int, world_size: int) -> int:
    return max(1, math.ceil(total_samples / (batch_size * world_size)))


def worker_quotas(num_batches: int, samples: list[int]) -> list[int]:
    """Split a rank's batches among its workers in proportion to the samples each one holds.

    Largest remainders, ties to the lower worker: a worker with little data repeats little and a
    worker with much data drops little.
    """
    total = sum(samples)
    if total == 0:
        raise ValueError("the shards hold no samples (sizes.json says 0)")
    exact = [num_batches * n / total for n in samples]
    quotas = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(samples)), key=lambda w: (quotas[w] - exact[w], w))
    for w in by_remainder[: num_batches - sum(quotas)]:
        quotas[w] += 1
    return quotas


def round_robin(quotas: list[int]) -> list[tuple[int, int]]:
    """(worker, batch index) in the order the DataLoader delivers them: one batch from each worker that
    has any left, in worker order, round after round."""
    order, taken = [], [0] * len(quotas)
    while len(order) < sum(quotas):
        for worker, quota in enumerate(quotas):
            if taken[worker] < quota:
                order.append((worker, taken[worker]))
                taken[worker] += 1
    return order


@dataclass(frozen=True)
class EpochPlan:
    """What every rank and worker reads in one training epoch; the same arithmetic on every rank."""
    num_batches: int  # per rank
    ranks: list[list[list[Piece]]]  # rank -> worker -> pieces
    quotas: list[list[int]]  # rank -> worker -> batches

    def balance(self, batch_size: int) -> dict:
        """Shares of the epoch's samples read twice and never read, over all ranks."""
        repeated = unseen = 0
        for workers, quotas in zip(self.ranks, self.quotas):
            for pieces, quota in zip(workers, quotas):
                held, need = sum(p.size for p in pieces), quota * batch_size
                repeated += max(0, need - held)
                unseen += max(0, held - need)
        total_read = self.num_batches * batch_size * len(self.ranks)
        total = sum(p.size for workers in self.ranks for pieces in workers for p in pieces)
        return {"repeated_fraction": repeated / total_read, "unseen_fraction": unseen / max(total, 1)}


def plan_epoch(shards: list[str], sizes: dict[str, int], *, batch_size: int, world_size: int, num_workers: int,
               seed: int, epoch: int) -> EpochPlan:
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)  # same on every rank
    pieces = [Piece(s, 0, sizes[s]) for s in order if sizes[s] > 0]
    num_batches = batches_per_epoch(sum(p.size for p in pieces), batch_size, world_size)
    ranks, quotas = [], []
    for rank_pieces in split_samples(pieces, world_size):
        held = sum(p.size for p in rank_pieces)
        if held == 0:
            raise ValueError(f"{sum(sizes.values())} training samples cannot feed {world_size} ranks")
        # Each worker gets exactly its batches' worth of samples, so only the rank's own shortfall (the last
        # global batch) repeats; a worker that would get nothing is not started.
        workers = max(1, min(num_workers, num_batches))
        while True:
            shares = worker_quotas(num_batches, [1] * workers)
            ends = [min(held, batch_size * sum(shares[:w + 1])) for w in range(workers)]
            bounds = [0, *ends[:-1], held]
            if workers == 1 or all(low < high for low, high in zip(bounds, bounds[1:])):
                break
            workers -= 1
        ranks.append(cut_samples(rank_pieces, bounds))
        quotas.append(shares)
    return EpochPlan(num_batches, ranks, quotas)


# ---------------------------------------------------------------------------------------------- public loaders

def build_loader(cfg: Config, split: str, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 skip_batches: int = 0, captions: bool | None = None, batch_size: int | None = None,
                 data: DataConfig | None = None) -> "TrainLoader | EvalLoader":
    """The `train` or `test` loader of a run's config: its shards, image size, normalisation (the image
    encoder's), tokenizer and micro-batch. `captions` defaults to whether the objective reads them; `data`
    replaces the config's data section (other shards, other workers)."""
    mean, std = image_normalisation(cfg.model.image_model)
    captions = cfg.uses_captions if captions is None else captions
    common = dict(image_size=cfg.model.image_size, mean=mean, std=std,
                  tokenizer_name=resolve_text_model(cfg.model.text_model) if captions else None,
                  seq_len=cfg.model.seq_len, batch_size=batch_size or cfg.train.micro_batch, rank=rank,
                  world_size=world_size)
    if split == "train":
        return train_loader(data or cfg.data, **common, seed=cfg.train.seed, epoch=epoch, skip_batches=skip_batches)
    if split == "test":
        return eval_loader(data or cfg.data, **common)
    raise ValueError(f"split={split!r}: expected 'train' or 'test'")


def train_loader(data_cfg: DataConfig, *, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int,
                 batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 skip_batches: int = 0) -> "TrainLoader":
    """This rank's batches of one epoch; `skip_batches` leaves out the first ones without decoding them."""
    shards = expand_shards(data_cfg.train_shards)
    sizes = read_sizes(shards)
    plan = plan_epoch(shards, sizes, batch_size=batch_size, world_size=world_size,
                      num_workers=max(data_cfg.num_workers, 1), seed=seed, epoch=epoch)
    if not 0 <= skip_batches <= plan.num_batches:
        raise ValueError(f"cannot skip {skip_batches} of {plan.num_batches} batches")
    _preload(tokenizer_name, seq_len)
    quotas = plan.quotas[rank]
    order = round_robin(quotas)
    skips = [sum(1 for w, _ in order[:skip_batches] if w == worker) for worker in range(len(quotas))]
    decoder = Decoder(image_size, mean, std, tokenizer_name, seq_len, train=True, seed=f"{seed}/{epoch}",
                      max_pixels=data_cfg.max_image_pixels, max_caption_bytes=data_cfg.max_caption_bytes)
    dataset = _ShardStream(plan.ranks[rank], decoder, batch_size=batch_size, quotas=quotas, skips=skips,
                           shuffle_buffer=data_cfg.shuffle_buffer, seed=f"{seed}/{epoch}/{rank}",
                           max_member_bytes=data_cfg.max_member_bytes)
    workers = len(quotas) if data_cfg.num_workers > 0 else 0
    return TrainLoader(dataset, workers, data_cfg.max_skip_fraction, order[skip_batches:], plan.num_batches,
                       plan.balance(batch_size))


def eval_loader(data_cfg: DataConfig, *, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int,
                batch_size: int, rank: int, world_size: int) -> "EvalLoader":
    shards = expand_shards(data_cfg.test_shards)
    sizes = read_sizes(shards)
    mine = split_samples([Piece(s, 0, sizes[s]) for s in shards if sizes[s] > 0], world_size)[rank]
    held = sum(p.size for p in mine)
    workers = max(1, min(data_cfg.num_workers, held)) if held else 0
    _preload(tokenizer_name, seq_len)
    dataset = _ShardStream(split_samples(mine, workers) if workers else [],
                           Decoder(image_size, mean, std, tokenizer_name, seq_len, train=False,
                                   max_pixels=data_cfg.max_image_pixels, max_caption_bytes=data_cfg.max_caption_bytes),
                           batch_size=batch_size, quotas=None, skips=None, shuffle_buffer=0, seed="eval",
                           max_member_bytes=data_cfg.max_member_bytes)
    return EvalLoader(dataset, workers if data_cfg.num_workers > 0 else 0, data_cfg.max_skip_fraction, held)


class _Loader:
    """Runs a DataLoader over the stream and peels the skip counts off the batches."""

    def __init__(self, dataset: "_ShardStream", num_workers: int, max_skip_fraction: float):
        self.dataset, self.num_workers, self.max_skip_fraction = dataset, num_workers, max_skip_fraction
        self._seen: Counter = Counter()
        self._skipped: Counter = Counter()
        self._examples: list = []

    def skipped(self) -> dict[str, int]:
        """Bad samples per shard in the current (or last) pass over this loader."""
        return dict(self._skipped)

    def seen(self) -> dict[str, int]:
        return dict(self._seen)

    def _items(self) -> Iterator[dict]:
        self._seen, self._skipped, self._examples = Counter(), Counter(), []
        if not self.dataset.workers:
            return
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                            collate_fn=_keep)
        expected = sum(p.size for pieces in self.dataset.workers for p in pieces)
        for item in loader:
            stats = item.pop("_stats")
            self._seen.update(stats["seen"])
            self._skipped.update(stats["skipped"])
            self._examples = (self._examples + stats["examples"])[:MAX_EXAMPLES]
            # Fail fast once the epoch can no longer end under the limit.
            if sum(self._skipped.values()) > self.max_skip_fraction * max(expected, sum(self._seen.values())):
                self._check()
            if "image" in item:
                yield item
        if self._skipped:
            log.warning("skipped %d of %d samples: %s", sum(self._skipped.values()), sum(self._seen.values()),
                        self._report())
        self._check()

    def _check(self) -> None:
        skipped, seen = sum(self._skipped.values()), sum(self._seen.values())
        if skipped > self.max_skip_fraction * max(seen, 1):
            raise RuntimeError(f"{skipped} of {seen} samples were bad (more than max_skip_fraction="
                               f"{self.max_skip_fraction}): {self._report()}")

    def _report(self) -> str:
        shards = ", ".join(f"{s}: {n}/{self._seen[s]}" for s, n in sorted(self._skipped.items()))
        examples = "; ".join(f"{Path(s).name}/{k}: {why}" for s, k, why in self._examples[:5])
        return f"per shard {{{shards}}}; e.g. {examples}"


class TrainLoader(_Loader):
    """`len(self)` full batches per epoch, the same number on every rank, in a fixed worker order.

    After `skip_batches` it yields the rest of the epoch only, in the order an uninterrupted pass would
    have: the DataLoader restarts its round-robin at worker 0, so early arrivals wait (a few batches).
    `balance` holds the epoch's repeated and never-seen shares (EpochPlan.balance).
    """

    def __init__(self, dataset, num_workers, max_skip_fraction, order: list[tuple[int, int]], num_batches: int,
                 balance: dict):
        super().__init__(dataset, num_workers, max_skip_fraction)
        self.order, self.num_batches, self.balance = order, num_batches, balance

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        waiting: dict[tuple[int, int], dict] = {}
        next_index = 0
        for batch in self._items():
            waiting[batch.pop("_index")] = batch
            while next_index < len(self.order) and self.order[next_index] in waiting:
                yield self.dataset.decoder.normalise(waiting.pop(self.order[next_index]))
                next_index += 1
        if next_index != len(self.order) or waiting:  # would desynchronise the ranks: never let it pass silently
            raise RuntimeError(f"produced {next_index} of the {len(self.order)} batches expected "
                               f"({len(waiting)} out of order)")


class EvalLoader(_Loader):
    """This rank's share of the test set, each sample once; `num_samples` is the count sizes.json promises."""

    def __init__(self, dataset, num_workers, max_skip_fraction, num_samples):
        super().__init__(dataset, num_workers, max_skip_fraction)
        self.num_samples = num_samples

    def __iter__(self) -> Iterator[dict]:
        for batch in self._items():
            batch.pop("_index")
            yield self.dataset.decoder.normalise(batch)


# ---------------------------------------------------------------------------------------------- worker side

class _Stats:
    """Per-worker counts, handed to the main process as deltas riding on the batches."""

    def __init__(self):
        self.seen, self.skipped, self.examples = Counter(), Counter(), []

    def skip(self, shard: str, key: str, reason: str, n: int = 1) -> None:
        self.skipped[shard] += n
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((shard, key, reason))

    def take(self) -> dict:
        out = {"seen": dict(self.seen), "skipped": dict(self.skipped), "examples": self.examples}
        self.__init__()
        return out

    def skipped_report(self) -> str:
        return "; ".join(f"{Path(s).name}/{k}: {why}" for s, k, why in self.examples[:5]) or "no reasons recorded"


class _ShardStream(IterableDataset):
    """One worker's pipeline: its pieces -> raw samples -> shuffle -> (skip) -> decode -> batches (+ skip counts)."""

    def __init__(self, workers: list[list[Piece]], decoder: "Decoder", *, batch_size: int,
                 quotas: list[int] | None, skips: list[int] | None, shuffle_buffer: int, seed: str,
                 max_member_bytes: int):
        self.workers, self.decoder = workers, decoder
        self.batch_size, self.quotas, self.skips = batch_size, quotas, skips
        self.shuffle_buffer, self.seed, self.max_member_bytes = shuffle_buffer, seed, max_member_bytes

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if len(self.workers) % num_workers:
            raise RuntimeError(f"planned for {len(self.workers)} workers, running with {num_workers}")
        stats = _Stats()
        train = self.quotas is not None
        streams = range(worker, len(self.workers), num_workers)  # one stream each, unless workers = 0 (in-process)
        for stream in streams:
            seed = f"{self.seed}/{stream}"
            samples = _read_pieces(self.workers[stream], stats, repeat=train,
                                   shuffle_buffer=self.shuffle_buffer if train else 0, seed=seed,
                                   max_member_bytes=self.max_member_bytes)
            skip = self.skips[stream] * self.batch_size if train else 0
            yield from _batches(stream, self.batch_size, self.quotas[stream] if train else None,
                                self.skips[stream] if train else 0, self.decoder,
                                self.decoder.stage(_drop(samples, skip), stats), stats)


def _drop(samples: Iterator[dict], count: int) -> Iterator[dict]:
    """The stream after its first `count` raw samples: a resume skips them without decoding anything."""
    for index, sample in enumerate(samples):
        if index >= count:
            yield sample


def _read_pieces(pieces: list[Piece], stats: _Stats, *, repeat: bool, shuffle_buffer: int,
                 seed: str, max_member_bytes: int) -> Iterator[dict]:
    """Raw samples of the pieces, shuffled within each pass; training passes repeat until the quota is met.

    Repetition wraps the shuffle buffer rather than feeding it, so no sample comes back before the whole
    pass has been used. Skips are counted on the first pass only; `__pass__` tells the passes apart.
    """
    rng = random.Random(f"pass/{seed}")
    order, number = list(pieces), 0
    while True:
        samples = (dict(sample, __pass__=number) for piece in order
                   for sample in _piece_samples(piece, stats if number == 0 else _Stats(), max_member_bytes))
        if shuffle_buffer > 1:
            samples = wds.shuffle(shuffle_buffer, shuffle_buffer, rng=rng)(samples)
        produced = 0
        for sample in samples:
            produced += 1
            yield sample
        if not repeat:
            return
        if produced == 0:
            raise RuntimeError(f"no readable samples in {[p.shard for p in pieces]}: cannot fill this worker's batches "
                               f"({stats.skipped_report()})")
        number += 1
        rng.shuffle(order)


def _piece_samples(piece: Piece, stats: _Stats, max_member_bytes: int) -> Iterator[dict]:
    """Samples [start, stop) of a shard; a repeated key within them is a bad sample. A shard that cannot be
    read on (mgn.tar.ShardError, a tarfile.TarError) loses the rest of the piece, counted as skipped."""
    keys: set[str] = set()
    count = 0  # samples of the piece met, good or bad
    error = None
    try:
        with open(piece.shard, "rb", buffering=1 << 20) as f:
            for index, sample in enumerate(tar_samples(f, max_member_bytes=max_member_bytes)):
                if index < piece.start:
                    continue
                if index >= piece.stop:
                    break
                count += 1
                stats.seen[piece.shard] += 1
                if sample["__key__"] in keys:
                    stats.skip(piece.shard, sample["__key__"], "duplicate key in shard")
                    continue
                keys.add(sample["__key__"])
                sample["__url__"] = piece.shard
                yield sample
    except (tarfile.TarError, OSError) as exc:
        reason = str(exc).removeprefix(f"{piece.shard}, ")  # mgn.tar names the shard first; the report has it
        error = f"unreadable tar after {piece.start + count} samples: {reason}"
    lost = piece.size - count
    if error or lost > 0:
        lost = max(lost, 1)
        stats.seen[piece.shard] += lost
        stats.skip(piece.shard, "*", error or f"shard ended after {piece.start + count} of {piece.stop} samples",
                   lost)


def _batches(stream: int, batch_size: int, quota: int | None, first: int, decoder: "Decoder", items, stats: _Stats):
    """Training stops at the stream's quota of full batches (numbered from `first`, the resume point);
    evaluation keeps the last partial batch. Each batch carries its (stream, index) for the ordering."""
    buf, index = [], first
    if quota is None or index < quota:
        for item in items:
            buf.append(item)
            if len(buf) == batch_size:
                yield decoder.collate(buf, stats.take(), (stream, index))
                buf, index = [], index + 1
                if quota is not None and index >= quota:
                    break
        if buf and quota is None:
            yield decoder.collate(buf, stats.take(), (stream, index))
    yield {"_stats": stats.take()}  # counts from after the last batch, or from a stream with no batches


class Decoder:
    """Bytes -> RGB crops -> uint8 batches with tokens (workers) -> normalised float batches (main process)."""

    def __init__(self, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int, *, train: bool,
                 seed: str = "", max_pixels: int = DEFAULT_MAX_PIXELS, max_caption_bytes: int = 4096):
        self.size, self.train, self.seed = image_size, train, seed
        self.max_pixels, self.max_caption_bytes = max_pixels, max_caption_bytes
        self.tokenizer_name, self.seq_len = tokenizer_name, seq_len
        std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) / std

    def stage(self, samples: Iterator[dict], stats: _Stats) -> Iterator[tuple]:
        """Decoded samples; training augmentation is seeded per sample (run seed, epoch, key, pass), so it does
        not depend on what came before: skipping samples on resume leaves every later crop unchanged.

        A pass over a worker's range in which not one sample decodes would repeat forever without filling a
        batch: it stops the run instead, with the skip report."""
        current_pass, decoded = 0, 0
        for sample in samples:
            if sample["__pass__"] != current_pass:
                if decoded == 0:
                    raise RuntimeError(f"not one sample of this worker's range decodes (e.g. {sample['__url__']}): "
                                       f"{stats.skipped_report()}")
                current_pass, decoded = sample["__pass__"], 0
            rng = random.Random(f"aug/{self.seed}/{sample['__key__']}/{sample['__pass__']}") if self.train else None
            try:
                item = self.decode(sample, rng)
            except _BadSample as exc:
                if sample["__pass__"] == 0:
                    stats.skip(sample["__url__"], sample["__key__"], str(exc))
                continue
            decoded += 1
            yield item

    def decode(self, sample: dict, rng: random.Random | None = None) -> tuple[str, np.ndarray, str, int]:
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        for name, value in (("image (jpg/png/webp)", field), ("txt", "txt" in sample), ("cls", "cls" in sample)):
            if not value:
                raise _BadSample(f"missing {name}")
        try:
            caption = cap_caption(sample["txt"], self.max_caption_bytes)  # before tokenizing: bounded cost
            label = int(sample["cls"].decode("ascii").strip())
        except ValueError as exc:
            raise _BadSample(f"bad txt/cls: {exc}") from None
        try:
            image = self.load_rgb(sample[field])
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken data
            raise _BadSample(f"undecodable image: {exc}") from None
        return sample["__key__"], self.transform(image, rng), caption, label

    def load_rgb(self, data: bytes) -> Image.Image:
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; keep enough pixels for the crop. Past the pixel cap
        # (read from the header) anything that cannot be decoded reduced is a bad sample, not a memory spike.
        need = math.ceil(self.size * (1.5 if self.train else 1 / EVAL_CROP_PCT))
        return to_rgb(open_capped(data, self.max_pixels, need, reduce=True), upright=False)  # RGB always: the normalisation constants are RGB

    def transform(self, image: Image.Image, rng: random.Random | None) -> np.ndarray:
        """Crop and resize in one PIL call; train: random resized crop + flip, eval: centre crop."""
        w, h = image.size
        box = _random_crop(w, h, rng) if self.train else _centre_crop(w, h)
        out = np.asarray(image.resize((self.size, self.size), Image.BILINEAR, box=box))
        if self.train and rng.random() < 0.5:
            out = out[:, ::-1]
        return out

    def collate(self, items: list, stats: dict, index: tuple[int, int]) -> dict:
        """Pixels stay uint8 (a quarter of float32) and are written straight into shared memory.

        Handing a batch from a worker to the main process costs about as much as decoding it
        when it is float32 (measured: 3.4 ms per 32 x 96 px batch, 18 ms at 224 px; uint8: 1.2 and
        4.8 ms), so the main process normalises (`normalise`). Labels and tokens stay numpy:
        pickled through the pipe they cost less than a shared segment each.
        """
        shape = (len(items), self.size, self.size, 3)
        pixels = _empty_shared(shape) if get_worker_info() is not None else torch.empty(shape, dtype=torch.uint8)
        np.stack([item[1] for item in items], out=pixels.numpy())
        batch = {"image": pixels, "_stats": stats, "_index": index,
                 "label": np.array([item[3] for item in items], dtype=np.int64), "key": [item[0] for item in items]}
        if self.tokenizer_name is not None:
            batch["caption"] = [item[2] for item in items]  # for the attention picture
            batch["input_ids"], batch["attention_mask"] = tokenize(self.tokenizer_name, self.seq_len,
                                                                   [item[2] for item in items])
        return batch

    def normalise(self, batch: dict) -> dict:
        """Main process: uint8 NHWC -> normalised float32 NCHW, numpy -> LongTensor.

        numpy, not torch: it is single-threaded, while torch's intra-op threads on a busy CPU
        were measured to wait ~20 ms per batch for a free core (0.3 ms single-threaded at 96 px).
        """
        pixels = batch["image"].numpy().transpose(0, 3, 1, 2)
        image = np.empty(pixels.shape, dtype=np.float32)
        np.multiply(pixels, self.scale, out=image)
        np.add(image, self.shift, out=image)
        batch["image"] = torch.from_numpy(image)
        for name in ("label", "input_ids", "attention_mask"):
            if name in batch:
                batch[name] = torch.from_numpy(batch[name])
        return batch


def _empty_shared(shape) -> torch.Tensor:
    """What torch's default_collate does in workers: the batch is born shared, no copy on hand-over."""
    elem = torch.empty(0, dtype=torch.uint8)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(*shape)


def _keep(item):
    """collate_fn that leaves numpy arrays alone (the default would turn each into a shared tensor)."""
    return item


class _BadSample(Exception):
    pass


@lru_cache(maxsize=4)
def _tokenizer(name: str):
    """Built lazily in each worker process; Rust threads inside forked workers only oversubscribe."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer  # noqa: PLC0415 - slow import, only where captions are used

    return AutoTokenizer.from_pretrained(resolve_text_model(name))


@lru_cache(maxsize=4)
def _fixed_length_backend(name: str, seq_len: int):
    """The tokenizer's own Rust `tokenizers` object, set to truncate and pad to `seq_len`.

    transformers' Python wrapper around it costs ~4x the tokenization itself on short captions
    (measured: 155 vs 40 us a caption), a large share of a loader worker's time. A copy, so the
    wrapper's own settings are untouched. None for tokenizers without a Rust backend.
    """
    wrapper = _tokenizer(name)
    backend = getattr(wrapper, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer  # noqa: PLC0415 - installed with transformers

    fixed = Tokenizer.from_str(backend.to_str())
    fixed.enable_truncation(max_length=seq_len)
    fixed.enable_padding(length=seq_len, pad_id=wrapper.pad_token_id, pad_token=wrapper.pad_token)
    return fixed


def tokenize(name: str, seq_len: int, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [len(captions), seq_len]: what the wrapper gives with
    padding="max_length", truncation=True (tests/test_data.py checks they agree)."""
    backend = _fixed_length_backend(name, seq_len)
    if backend is None:
        tokens = _tokenizer(name)(captions, padding="max_length", truncation=True, max_length=seq_len,
                                  return_tensors="np")
        return tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)
    encodings = backend.encode_batch_fast(captions)  # no character offsets: we never use them
    return (np.array([e.ids for e in encodings], dtype=np.int64),
            np.array([e.attention_mask for e in encodings], dtype=np.int64))


def _preload(tokenizer_name: str | None, seq_len: int) -> None:
    """Load (never run) the tokenizer here: a bad name fails now, and forked workers inherit it
    instead of loading it again every epoch. Spawned workers still load it lazily."""
    if tokenizer_name is not None:
        _fixed_length_backend(tokenizer_name, seq_len)


def _random_crop(w: int, h: int, rng: random.Random) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop parameters, drawn from our own seeded generator."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*TRAIN_SCALE)
        ratio = math.exp(rng.uniform(math.log(TRAIN_RATIO[0]), math.log(TRAIN_RATIO[1])))
        cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if cw <= w and ch <= h:
            x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return x, y, x + cw, y + ch
    return _centre_crop(w, h, 1.0)


def _centre_crop(w: int, h: int, crop_pct: float = EVAL_CROP_PCT) -> tuple[float, float, float, float]:
    side = min(w, h) * crop_pct
    x, y = (w - side) / 2, (h - side) / 2
    return x, y, x + side, y + side
