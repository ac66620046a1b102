"""What a loader worker runs: its pieces of shards -> raw samples -> shuffle -> (resume skip) -> decode ->
batches, each batch carrying the skip counts since the last (mgn/data/loader.py, the main process's side,
adds them up and stops a run with too many bad samples).

The pipeline is `ShardStream`, the DataLoader's dataset: in every pass it reads what its assignment's current
`Work` names (mgn/data/loader.py), one stream per worker. Bad samples (a duplicate key, too many bytes, an
unreadable tar, an image that does not decode) are skipped and counted per shard, never raised, unless a
worker's whole range is unreadable (`BadDataError`) or a URL shard gives no byte at all (ShardOpenError,
mgn/io/sources.py): either ends the run.
"""
from __future__ import annotations

import random
import signal
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mgn.cli import REQUEUE_SIGNALS, STOP_SIGNALS, UserError
from mgn.data.decode import BadSample, Decoder
from mgn.data.epoch_plan import Piece
from mgn.io.sources import ShardOpenError, open_shard
from mgn.io.tar import tar_samples


class BadDataError(UserError, RuntimeError):
    """The shards cannot feed the run: too many bad samples, or none readable in a worker's range."""

MAX_EXAMPLES = 20  # skip reasons kept for the report


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


class ShardStream(IterableDataset):
    """One worker's pipeline: its pieces -> raw samples -> shuffle -> (skip) -> decode -> batches (+ skip
    counts). What it reads in a pass is its assignment's current `Work`."""

    def __init__(self, assignment, decoder: Decoder, *, batch_size: int,
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


def ignore_run_signals(_worker_id: int = 0) -> None:
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
