"""The distributed reader, shards -> batches: equal batches on every rank for training, every test sample once
for eval.

Which samples each rank and worker reads is the epoch plan (mgn/data/epoch_plan.py); what a sample becomes is
the decoder (mgn/data/decode.py). This module runs them: each training worker reads its range of raw samples
(mgn/io/tar.py), shuffles them in a buffer, decodes to RGB, applies the train transform, batches and
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

import atexit
import logging
import multiprocessing.util  # noqa: F401 - registers its exit handler before ours (below)
import random
import signal
import weakref
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mgn.cli import REQUEUE_SIGNALS, STOP_SIGNALS, UserError
from mgn.config import Config, DataConfig, resolve_text_model
from mgn.data.decode import BadSample, Decoder, image_normalisation
from mgn.data.epoch_plan import Piece, plan_epoch, round_robin, split_samples
from mgn.io.sources import ShardOpenError, open_shard
from mgn.io.shard_sets import expand_shards, read_sizes, sample_fields
from mgn.io.tar import tar_samples
from mgn.data.block_files import TextBlockReader
from mgn.data.tokens import preload_tokenizer

log = logging.getLogger(__name__)


class BadDataError(UserError, RuntimeError):
    """The shards cannot feed the run: too many bad samples, or none readable in a worker's range."""

MAX_EXAMPLES = 20  # skip reasons kept for the report


# ---------------------------------------------------------------------------------------------- public
# loaders

def build_loader(cfg: Config, split: str, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 skip_batches: int = 0, captions: bool | None = None, batch_size: int | None = None,
                 data: DataConfig | None = None, batch_form: str = "float", pin: bool = False,
                 persistent: bool = False) -> "TrainLoader | EvalLoader":
    """The `train` or `test` loader of a run's config: its shards, image size, normalisation (the image
    encoder's), tokenizer and micro-batch. `captions` defaults to whether the objective reads them; `data`
    replaces the config's data section (other shards, other workers). `batch_form` is 'float' or 'uint8'
    (mgn.devices.batch_form resolves `data.batch_form`); `pin`: batches pinned by the DataLoader's pin thread
    (a GPU run, mgn.devices.pins_batches). `persistent`: the worker processes live as long as the loader,
    across epochs (training) or evaluations (the test loader); `close()` ends them. The train loader starts at
    (`epoch`, `skip_batches`); `loader.epoch(e, skip_batches=s)` moves it to another epoch."""
    mean, std = image_normalisation(cfg.model)
    captions = cfg.uses_captions if captions is None else captions
    common = dict(image_size=cfg.model.image_size, mean=mean, std=std,
                  tokenizer_name=resolve_text_model(cfg.model.text_model) if captions else None,
                  seq_len=cfg.model.seq_len, batch_size=batch_size or cfg.train.micro_batch, rank=rank,
                  world_size=world_size, batch_form=batch_form, pin=pin, persistent=persistent)
    # the positive controls' ground truth and the precomputed captions: training batches only
    if split == "train":
        text_blocks = (data or cfg.data).text_blocks if captions else ""
        if text_blocks:
            common["tokenizer_name"] = None
        return train_loader(data or cfg.data, **common, seed=cfg.train.seed, epoch=epoch,
                            skip_batches=skip_batches,
                            ground_truth=cfg.ground_truth_fields, text_blocks=text_blocks)
    if split == "test":
        return eval_loader(data or cfg.data, **common)
    raise ValueError(f"split={split!r}: expected 'train' or 'test'")


def train_loader(data_cfg: DataConfig, *, image_size: int, mean, std, tokenizer_name: str | None,
                 seq_len: int,
                 batch_size: int, rank: int, world_size: int, seed: int, epoch: int = 0,
                 skip_batches: int = 0,
                 batch_form: str = "float", pin: bool = False, persistent: bool = False,
                 ground_truth: tuple[str, ...] = (), text_blocks: str = "") -> "TrainLoader":
    """This rank's batches, at (`epoch`, `skip_batches`) until `.epoch(...)` moves it; skipped batches are
    left out without decoding them. `text_blocks`: the folder of the captions' precomputed blocks
    (mgn/train/text_blocks.py), read instead of tokens."""
    shards = expand_shards(data_cfg.train_shards)
    plan = TrainAssignment(shards, read_sizes(shards), batch_size=batch_size, world_size=world_size,
                           rank=rank,
                           num_workers=max(data_cfg.num_workers, 1), seed=seed)
    preload_tokenizer(tokenizer_name, seq_len)
    decoder = Decoder(image_size, mean, std, tokenizer_name, seq_len, train=True,
                      fields=sample_fields(data_cfg.train_shards),
                      max_pixels=data_cfg.max_image_pixels, max_caption_bytes=data_cfg.max_caption_bytes,
                      batch_form=batch_form, pin=pin, ground_truth=ground_truth,
                      text_blocks=TextBlockReader(text_blocks) if text_blocks else None)
    dataset = _ShardStream(plan, decoder, batch_size=batch_size, shuffle_buffer=data_cfg.shuffle_buffer,
                           limits=SampleLimits(data_cfg.max_member_bytes, data_cfg.max_sample_bytes))
    workers = plan.workers() if data_cfg.num_workers > 0 else 0
    loader = TrainLoader(dataset, workers, data_cfg.max_skip_fraction, pin=pin, persistent=persistent)
    return loader.epoch(epoch, skip_batches)


def eval_loader(data_cfg: DataConfig, *, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int,
                batch_size: int, rank: int, world_size: int, batch_form: str = "float", pin: bool = False,
                persistent: bool = False) -> "EvalLoader":
    """This rank's share of the test samples, in order, each read once; the last batch may be short."""
    shards = expand_shards(data_cfg.test_shards)
    sizes = read_sizes(shards)
    mine = split_samples([Piece(s, 0, sizes[s]) for s in shards if sizes[s] > 0], world_size)[rank]
    held = sum(p.size for p in mine)
    workers = max(1, min(data_cfg.num_workers, held)) if held else 0
    preload_tokenizer(tokenizer_name, seq_len)
    decoder = Decoder(image_size, mean, std, tokenizer_name, seq_len, train=False,
                      fields=sample_fields(data_cfg.test_shards),
                      max_pixels=data_cfg.max_image_pixels, max_caption_bytes=data_cfg.max_caption_bytes,
                      batch_form=batch_form, pin=pin)
    dataset = _ShardStream(EvalAssignment(split_samples(mine, workers) if workers else []), decoder,
                           batch_size=batch_size, shuffle_buffer=0,
                           limits=SampleLimits(data_cfg.max_member_bytes, data_cfg.max_sample_bytes))
    return EvalLoader(dataset, workers if data_cfg.num_workers > 0 else 0, data_cfg.max_skip_fraction, held,
                      pin=pin, persistent=persistent)


# ---------------------------------------------------------------------------------------------- who reads
# what

@dataclass
class Work:
    """What one pass of a loader reads: per stream (a worker's share) its pieces, and for training its number
    of batches (quota) and the batches a resume skips; the seeds of its shuffle and of its augmentation."""
    streams: list[list[Piece]]
    quotas: list[int] | None  # None: evaluation (every sample once, the last batch may be short)
    skips: list[int] | None
    seed: str
    augment_seed: str = ""


class EvalAssignment:
    """Evaluation reads the same samples, in order, at every pass."""

    def __init__(self, streams: list[list[Piece]]):
        self.work = Work(streams, quotas=None, skips=None, seed="eval")

    def current(self) -> Work:
        return self.work


class TrainAssignment:
    """Training reads another epoch plan at every pass (mgn/data/epoch_plan.py). The epoch and the resume
    point sit in shared memory, so worker processes that live across epochs (persistent workers) read the pass
    the main process set before it started them on it."""

    def __init__(self, shards: list[str], sizes: dict[str, int], *, batch_size: int, world_size: int,
                 rank: int,
                 num_workers: int, seed: int):
        self.shards, self.sizes, self.batch_size, self.world_size = shards, sizes, batch_size, world_size
        self.rank, self.num_workers, self.seed = rank, num_workers, seed
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, batches to skip

    def plan(self, epoch: int):
        return plan_epoch(self.shards, self.sizes, batch_size=self.batch_size, world_size=self.world_size,
                          num_workers=self.num_workers, seed=self.seed, epoch=epoch)

    def workers(self) -> int:
        """Worker processes this rank's plan uses (the same every epoch: ranges are cut by sample counts)."""
        return len(self.plan(0).quotas[self.rank])

    def move_to(self, epoch: int, skip_batches: int) -> tuple[list[tuple[int, int]], int, dict]:
        """Set the pass: returns the batches' (stream, index) order after the skipped ones, the epoch's number
        of batches and its balance (EpochPlan.balance)."""
        plan = self.plan(epoch)
        if not 0 <= skip_batches <= plan.num_batches:
            raise ValueError(f"cannot skip {skip_batches} of {plan.num_batches} batches")
        self.position[0], self.position[1] = epoch, skip_batches
        return (round_robin(plan.quotas[self.rank])[skip_batches:], plan.num_batches,
                plan.balance(self.batch_size))

    def current(self) -> Work:
        epoch, skip = self.position.tolist()
        plan = self.plan(epoch)
        quotas = plan.quotas[self.rank]
        skipped = round_robin(quotas)[:skip]
        return Work(plan.ranks[self.rank], quotas,
                    [sum(1 for w, _ in skipped if w == worker) for worker in range(len(quotas))],
                    seed=f"{self.seed}/{epoch}/{self.rank}", augment_seed=f"{self.seed}/{epoch}")


# ---------------------------------------------------------------------------------------------- main-process
# side

_open_iterators: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators: each owns its worker processes


@atexit.register  # after multiprocessing.util's own (imported above), so that it runs before it
def _close_open_loaders() -> None:
    """At exit, end the worker processes of every DataLoader iterator still alive (one that an error left, in
    a traceback's frames, or a persistent one nobody closed). Registered after multiprocessing's own exit
    handler, so it runs first: that handler terminates workers with SIGTERM, which they outlive for a while
    (_ignore_run_signals), and waits for them."""
    for iterator in list(_open_iterators):
        iterator._shutdown_workers()


class _Loader:
    """Runs a DataLoader over the stream and peels the skip counts off the batches."""

    def __init__(self, dataset: "_ShardStream", num_workers: int, max_skip_fraction: float, *,
                 pin: bool = False,
                 persistent: bool = False):
        self.dataset, self.num_workers, self.max_skip_fraction = dataset, num_workers, max_skip_fraction
        self.pin = pin
        self.persistent = persistent and num_workers > 0
        self._loader: DataLoader | None = None
        self._iterator = None  # the DataLoader's iterator of the current pass: it owns the worker processes
        self._seen: Counter = Counter()
        self._skipped: Counter = Counter()
        self._examples: list = []

    def skipped(self) -> dict[str, int]:
        """Bad samples per shard in the current (or last) pass over this loader."""
        return dict(self._skipped)

    def seen(self) -> dict[str, int]:
        return dict(self._seen)

    def close(self) -> None:
        """End the worker processes now (persistent ones, or those of a pass an error left), rather than when
        the loader is collected."""
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._loader = self._iterator = None

    def _items(self) -> Iterator[dict]:
        self._seen, self._skipped, self._examples = Counter(), Counter(), []
        streams = self.dataset.assignment.current().streams
        if not streams:
            return
        loader = self._loader
        if loader is None:
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                persistent_workers=self.persistent, collate_fn=_keep, pin_memory=self.pin,
                                worker_init_fn=_ignore_run_signals if self.num_workers else None)
            self._loader = loader if self.persistent else None
        expected = sum(p.size for pieces in streams for p in pieces)
        self._iterator = iter(loader)
        if self.num_workers:
            _open_iterators.add(self._iterator)
        for item in _worker_errors_told_plainly(self._iterator):
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

    `epoch(e, skip_batches)` sets the pass: after `skip_batches` it yields the rest of the epoch only, in the
    order an uninterrupted pass would have: the DataLoader restarts its round-robin at worker 0, so early
    arrivals wait (a few batches). `balance` holds the epoch's repeated and never-seen shares
    (EpochPlan.balance).
    """

    def epoch(self, epoch: int, skip_batches: int = 0) -> "TrainLoader":
        self.order, self.num_batches, self.balance = self.dataset.assignment.move_to(epoch, skip_batches)
        return self

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
        # would desynchronise the ranks: never let it pass silently
        if next_index != len(self.order) or waiting:
            raise RuntimeError(f"produced {next_index} of the {len(self.order)} batches expected "
                               f"({len(waiting)} out of order)")


class EvalLoader(_Loader):
    """This rank's share of the test set, each sample once; `num_samples` is the count sizes.json promises."""

    def __init__(self, dataset, num_workers, max_skip_fraction, num_samples, *, pin: bool = False,
                 persistent: bool = False):
        super().__init__(dataset, num_workers, max_skip_fraction, pin=pin, persistent=persistent)
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
        return "; ".join(f"{Path(s).name}/{k}: {why}" for s, k,
                         why in self.examples[:5]) or "no reasons recorded"


class _ShardStream(IterableDataset):
    """One worker's pipeline: its pieces -> raw samples -> shuffle -> (skip) -> decode -> batches (+ skip
    counts). What it reads in a pass is its assignment's current `Work`."""

    def __init__(self, assignment: EvalAssignment | TrainAssignment, decoder: Decoder, *, batch_size: int,
                 shuffle_buffer: int, limits: "SampleLimits"):
        self.assignment, self.decoder = assignment, decoder
        self.batch_size, self.shuffle_buffer, self.limits = batch_size, shuffle_buffer, limits

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        work = self.assignment.current()
        if len(work.streams) % num_workers:
            raise RuntimeError(f"planned for {len(work.streams)} workers, running with {num_workers}")
        self.decoder.seed = work.augment_seed
        stats = _Stats()
        train = work.quotas is not None
        # one stream each, unless workers = 0 (in-process)
        streams = range(worker, len(work.streams), num_workers)
        for stream in streams:
            seed = f"{work.seed}/{stream}"
            samples = _read_pieces(work.streams[stream], stats, repeat=train,
                                   shuffle_buffer=self.shuffle_buffer if train else 0, seed=seed,
                                   limits=self.limits, keep=self.decoder.reads)
            skip = work.skips[stream] * self.batch_size if train else 0
            yield from _batches(stream, self.batch_size, work.quotas[stream] if train else None,
                                work.skips[stream] if train else 0, self.decoder,
                                _decoded(self.decoder, _drop(samples, skip), stats), stats)


def _drop(samples: Iterator[dict], count: int) -> Iterator[dict]:
    """The stream after its first `count` raw samples: a resume skips them without decoding anything."""
    for index, sample in enumerate(samples):
        if index >= count:
            yield sample


def _read_pieces(pieces: list[Piece], stats: _Stats, *, repeat: bool, shuffle_buffer: int,
                 seed: str, limits: "SampleLimits", keep) -> Iterator[dict]:
    """Raw samples of the pieces, shuffled within each pass; training passes repeat until the quota is met.

    Repetition wraps the shuffle buffer rather than feeding it, so no sample comes back before the whole
    pass has been used. Skips are counted on the first pass only; `__pass__` tells the passes apart.
    """
    rng = random.Random(f"pass/{seed}")
    order, number = list(pieces), 0
    while True:
        samples = (dict(sample, __pass__=number) for piece in order
                   for sample in _piece_samples(piece, stats if number == 0 else _Stats(), limits, keep))
        if shuffle_buffer > 1:
            samples = wds.shuffle(shuffle_buffer, shuffle_buffer, rng=rng)(samples)
        produced = 0
        for sample in samples:
            produced += 1
            yield sample
        if not repeat:
            return
        if produced == 0:
            raise BadDataError(f"no readable samples in {[p.shard for p in pieces]}: cannot fill this "
                               "worker's "
                               f"batches "
                               f"({stats.skipped_report()})")
        number += 1
        rng.shuffle(order)


@dataclass(frozen=True)
class SampleLimits:
    """What one sample may cost a worker: bytes per tar member (above it, the rest of the shard is unreadable)
    and bytes per sample in the members the run reads (above it, the sample is skipped and counted): a
    worker's shuffle buffer then holds at most shuffle_buffer x max_sample_bytes."""
    max_member_bytes: int
    max_sample_bytes: int


def _piece_samples(piece: Piece, stats: _Stats, limits: SampleLimits, keep=None) -> Iterator[dict]:
    """Samples [start, stop) of a shard; a repeated key within them is a bad sample. A shard that cannot be
    read on (mgn.io.tar.ShardError, a tarfile.TarError, a URL stream that fails) loses the rest of the piece,
    counted as skipped; a URL that gives no byte at all stops the run (ShardOpenError: mgn/io/sources.py says
    why).

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
            for index, sample in enumerate(tar_samples(f, max_member_bytes=limits.max_member_bytes,
                                                       keep=keep)):
                if index < piece.start:
                    continue
                if index >= piece.stop:
                    break
                count += 1
                stats.seen[piece.shard] += 1
                if sample["__key__"] in keys:
                    stats.skip(piece.shard, sample["__key__"], "duplicate key in shard")
                    continue
                held = sum(len(value) for value in sample.values() if isinstance(value, bytes))
                if held > limits.max_sample_bytes:
                    stats.skip(piece.shard, sample["__key__"], f"{held:,} bytes in the members the run "
                                                               "reads, "
                                                               f"over data.max_sample_bytes")
                    continue
                keys.add(sample["__key__"])
                sample["__url__"], sample["__index__"] = piece.shard, index  # where its text block is
                yield sample
    except ShardOpenError:
        raise
    except (tarfile.TarError, OSError) as exc:
        # mgn.io.tar names the shard first; the report has it
        reason = str(exc).removeprefix(f"{piece.shard}, ")
        error = f"unreadable tar after {piece.start + count} samples: {reason}"
    lost = piece.size - count
    if error or lost > 0:
        lost = max(lost, 1)
        stats.seen[piece.shard] += lost
        stats.skip(piece.shard, "*", error or f"shard ended after {piece.start + count} of {piece.stop} "
                                              "samples",
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
                raise BadDataError("not one sample of this worker's range decodes (e.g. "
                                   f"{sample['__url__']}): "
                                   f"{stats.skipped_report()}")
            current_pass, decoded = sample["__pass__"], 0
        rng = (random.Random(f"aug/{decoder.seed}/{sample['__key__']}/{sample['__pass__']}")
               if decoder.train else None)
        try:
            item = decoder.decode(sample, rng)
        except BadSample as exc:
            if sample["__pass__"] == 0:
                stats.skip(sample["__url__"], sample["__key__"], str(exc))
            continue
        decoded += 1
        yield item


def _batches(stream: int, batch_size: int, quota: int | None, first: int, decoder: Decoder, items,
             stats: _Stats):
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


# How long a loader worker outlives a SIGTERM (Slurm's default KillWait): the main process, signalled too, may
# still need a batch or two to reach its update's end and save; anyone else who sends it (multiprocessing at
# exit, torch ending a stuck worker) waits no longer than this.
WORKER_TERM_GRACE_S = 30


def _ignore_run_signals(_worker_id: int = 0) -> None:
    """A loader worker's start (DataLoader's worker_init_fn): it leaves the run's signals to the main process.
    Slurm signals every process of the step and Ctrl-C reaches the whole foreground process group, yet only
    the main process can act on them (the ranks agree, then save). A worker started by forkserver or spawn
    (Python 3.14's default) would die of the default action, and a forked one would raise KeyboardInterrupt:
    either ends the run with a traceback instead of a save. SIGTERM alone is not ignored but deferred
    (WORKER_TERM_GRACE_S): it is also how a worker is told to go."""
    for name in REQUEUE_SIGNALS + STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(WORKER_TERM_GRACE_S))  # then SIGALRM ends it
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _worker_errors_told_plainly(items: Iterator[dict]) -> Iterator[dict]:
    """`items`, with a worker's exception raised again as itself: torch raises it in the main process with the
    worker's whole traceback as its message, and a user needs the message's last line (what the error
    says)."""
    try:
        yield from items
    except Exception as error:  # re-raised as the same type, with the worker's own message
        text = str(error)
        if not text.startswith("Caught ") or "Original Traceback" not in text:
            raise
        last = text.rstrip().splitlines()[-1]
        try:
            plain = type(error)(last.split(": ", 1)[1] if ": " in last else last)
        except Exception:  # a type that wants other arguments: as torch raised it
            raise error from None
        raise plain from error  # MGN_TRACEBACK=1 still shows the worker's traceback


def _keep(item):
    """collate_fn that leaves numpy arrays alone (the default would turn each into a shared tensor)."""
    return item
