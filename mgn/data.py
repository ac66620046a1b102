"""The distributed reader, shards -> batches: equal batches on every rank for training, every test sample once for eval.

Which samples each rank and worker reads is the epoch plan (mgn/epoch_plan.py); what a sample becomes is
the decoder (mgn/decode.py). This module runs them: each training worker reads its range of raw samples
(mgn/tar.py), shuffles them in a buffer, decodes to RGB, applies the train transform, batches and
tokenizes, and its range holds exactly its batches' worth of samples; the rank's shortfall in the last
global batch is filled by reading the range again, reshuffled. `TrainLoader.balance` reports the repeated
and never-seen shares per epoch.

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

import logging
import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mgn.config import Config, DataConfig, resolve_text_model
from mgn.decode import BadSample, Decoder
from mgn.tokens import preload_tokenizer
from mgn.epoch_plan import Piece, plan_epoch, round_robin, split_samples
from mgn.model import image_normalisation
from mgn.shard_io import ShardOpenError, open_shard
from mgn.shard_sets import expand_shards, read_sizes
from mgn.tar import tar_samples
from mgn.text_blocks import TextBlockReader

log = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """The shards cannot feed the run: too many bad samples, or none readable in a worker's range."""

MAX_EXAMPLES = 20  # skip reasons kept for the report


# ---------------------------------------------------------------------------------------------- public loaders

def build_loader(cfg: Config, split: str, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 skip_batches: int = 0, captions: bool | None = None, batch_size: int | None = None,
                 data: DataConfig | None = None, on_device: bool = False,
                 persistent: bool = False) -> "TrainLoader | EvalLoader":
    """The `train` or `test` loader of a run's config: its shards, image size, normalisation (the image
    encoder's), tokenizer and micro-batch. `captions` defaults to whether the objective reads them; `data`
    replaces the config's data section (other shards, other workers). `on_device`: uint8 batches, pinned, for
    `mgn.decode.DeviceNormaliser` on a GPU. `persistent`: a test loader read again at every evaluation keeps
    its worker processes (the training loader's plan changes every epoch, so its workers do not persist)."""
    mean, std = image_normalisation(cfg.model.image_model)
    captions = cfg.uses_captions if captions is None else captions
    common = dict(image_size=cfg.model.image_size, mean=mean, std=std,
                  tokenizer_name=resolve_text_model(cfg.model.text_model) if captions else None,
                  seq_len=cfg.model.seq_len, batch_size=batch_size or cfg.train.micro_batch, rank=rank,
                  world_size=world_size, on_device=on_device)
    if split == "train":  # the positive controls' ground truth and the precomputed captions: training batches only
        text_blocks = (data or cfg.data).text_blocks if captions else ""
        if text_blocks:
            common["tokenizer_name"] = None
        return train_loader(data or cfg.data, **common, seed=cfg.train.seed, epoch=epoch, skip_batches=skip_batches,
                            ground_truth=cfg.ground_truth_fields, text_blocks=text_blocks)
    if split == "test":
        return eval_loader(data or cfg.data, **common, persistent=persistent)
    raise ValueError(f"split={split!r}: expected 'train' or 'test'")


def train_loader(data_cfg: DataConfig, *, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int,
                 batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 skip_batches: int = 0, on_device: bool = False, ground_truth: tuple[str, ...] = (),
                 text_blocks: str = "") -> "TrainLoader":
    """This rank's batches of one epoch; `skip_batches` leaves out the first ones without decoding them.
    `text_blocks`: the folder of the captions' precomputed blocks (mgn/text_blocks.py), read instead of tokens."""
    shards = expand_shards(data_cfg.train_shards)
    sizes = read_sizes(shards)
    plan = plan_epoch(shards, sizes, batch_size=batch_size, world_size=world_size,
                      num_workers=max(data_cfg.num_workers, 1), seed=seed, epoch=epoch)
    if not 0 <= skip_batches <= plan.num_batches:
        raise ValueError(f"cannot skip {skip_batches} of {plan.num_batches} batches")
    preload_tokenizer(tokenizer_name, seq_len)
    quotas = plan.quotas[rank]
    order = round_robin(quotas)
    skips = [sum(1 for w, _ in order[:skip_batches] if w == worker) for worker in range(len(quotas))]
    decoder = Decoder(image_size, mean, std, tokenizer_name, seq_len, train=True, seed=f"{seed}/{epoch}",
                      max_pixels=data_cfg.max_image_pixels, max_caption_bytes=data_cfg.max_caption_bytes,
                      on_device=on_device, ground_truth=ground_truth,
                      text_blocks=TextBlockReader(text_blocks) if text_blocks else None)
    dataset = _ShardStream(plan.ranks[rank], decoder, batch_size=batch_size, quotas=quotas, skips=skips,
                           shuffle_buffer=data_cfg.shuffle_buffer, seed=f"{seed}/{epoch}/{rank}",
                           max_member_bytes=data_cfg.max_member_bytes)
    workers = len(quotas) if data_cfg.num_workers > 0 else 0
    return TrainLoader(dataset, workers, data_cfg.max_skip_fraction, order[skip_batches:], plan.num_batches,
                       plan.balance(batch_size))


def eval_loader(data_cfg: DataConfig, *, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int,
                batch_size: int, rank: int, world_size: int, on_device: bool = False,
                persistent: bool = False) -> "EvalLoader":
    """This rank's share of the test samples, in order, each read once; the last batch may be short."""
    shards = expand_shards(data_cfg.test_shards)
    sizes = read_sizes(shards)
    mine = split_samples([Piece(s, 0, sizes[s]) for s in shards if sizes[s] > 0], world_size)[rank]
    held = sum(p.size for p in mine)
    workers = max(1, min(data_cfg.num_workers, held)) if held else 0
    preload_tokenizer(tokenizer_name, seq_len)
    dataset = _ShardStream(split_samples(mine, workers) if workers else [],
                           Decoder(image_size, mean, std, tokenizer_name, seq_len, train=False,
                                   max_pixels=data_cfg.max_image_pixels, max_caption_bytes=data_cfg.max_caption_bytes,
                                   on_device=on_device),
                           batch_size=batch_size, quotas=None, skips=None, shuffle_buffer=0, seed="eval",
                           max_member_bytes=data_cfg.max_member_bytes)
    return EvalLoader(dataset, workers if data_cfg.num_workers > 0 else 0, data_cfg.max_skip_fraction, held,
                      persistent=persistent)


class _Loader:
    """Runs a DataLoader over the stream and peels the skip counts off the batches."""

    def __init__(self, dataset: "_ShardStream", num_workers: int, max_skip_fraction: float, persistent: bool = False):
        self.dataset, self.num_workers, self.max_skip_fraction = dataset, num_workers, max_skip_fraction
        self.persistent = persistent and num_workers > 0
        self._loader: DataLoader | None = None
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
        loader = self._loader
        if loader is None:
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                persistent_workers=self.persistent, collate_fn=_keep)
            self._loader = loader if self.persistent else None
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
            raise BadDataError(f"{skipped} of {seen} samples were bad (more than max_skip_fraction="
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

    def __init__(self, dataset, num_workers, max_skip_fraction, num_samples, persistent: bool = False):
        super().__init__(dataset, num_workers, max_skip_fraction, persistent)
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

    def __init__(self, workers: list[list[Piece]], decoder: Decoder, *, batch_size: int,
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
                                _decoded(self.decoder, _drop(samples, skip), stats), stats)


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
            raise BadDataError(f"no readable samples in {[p.shard for p in pieces]}: cannot fill this worker's "
                               f"batches "
                               f"({stats.skipped_report()})")
        number += 1
        rng.shuffle(order)


def _piece_samples(piece: Piece, stats: _Stats, max_member_bytes: int) -> Iterator[dict]:
    """Samples [start, stop) of a shard; a repeated key within them is a bad sample. A shard that cannot be
    read on (mgn.tar.ShardError, a tarfile.TarError, a URL stream that fails) loses the rest of the piece,
    counted as skipped; a URL that gives no byte at all stops the run (ShardOpenError: mgn/shard_io.py says why).

    A URL shard is a stream without byte ranges: a piece starting mid-shard reads the samples before it and
    drops them. Kept rather than giving streams whole shards, so that a URL set is cut exactly as the same
    files on disk (same batches, same balance by sizes.json); the cost is at most one partial shard read
    twice per rank and worker per epoch (each range starts mid-shard at most once), half a shard on average,
    and a resume re-reads what it skips (`_drop`). A piece that ends mid-shard closes the stream there."""
    keys: set[str] = set()
    count = 0  # samples of the piece met, good or bad
    error = None
    try:
        with open_shard(piece.shard) as f:
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
                sample["__url__"], sample["__index__"] = piece.shard, index  # where its text block is
                yield sample
    except ShardOpenError:
        raise
    except (tarfile.TarError, OSError) as exc:
        reason = str(exc).removeprefix(f"{piece.shard}, ")  # mgn.tar names the shard first; the report has it
        error = f"unreadable tar after {piece.start + count} samples: {reason}"
    lost = piece.size - count
    if error or lost > 0:
        lost = max(lost, 1)
        stats.seen[piece.shard] += lost
        stats.skip(piece.shard, "*", error or f"shard ended after {piece.start + count} of {piece.stop} samples",
                   lost)


def _decoded(decoder: Decoder, samples: Iterator[dict], stats: _Stats) -> Iterator[tuple]:
    """Decoded samples; training augmentation is seeded per sample (run seed, epoch, key, pass), so it does
    not depend on what came before: skipping samples on resume leaves every later crop unchanged.

    A pass over a worker's range in which not one sample decodes would repeat forever without filling a
    batch: it stops the run instead, with the skip report."""
    current_pass, decoded = 0, 0
    for sample in samples:
        if sample["__pass__"] != current_pass:
            if decoded == 0:
                raise BadDataError(f"not one sample of this worker's range decodes (e.g. {sample['__url__']}): "
                                   f"{stats.skipped_report()}")
            current_pass, decoded = sample["__pass__"], 0
        rng = random.Random(f"aug/{decoder.seed}/{sample['__key__']}/{sample['__pass__']}") if decoder.train else None
        try:
            item = decoder.decode(sample, rng)
        except BadSample as exc:
            if sample["__pass__"] == 0:
                stats.skip(sample["__url__"], sample["__key__"], str(exc))
            continue
        decoded += 1
        yield item


def _batches(stream: int, batch_size: int, quota: int | None, first: int, decoder: Decoder, items, stats: _Stats):
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


def _keep(item):
    """collate_fn that leaves numpy arrays alone (the default would turn each into a shared tensor)."""
    return item
