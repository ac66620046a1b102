"""The distributed reader, shards -> batches: equal batches on every rank for training, every test sample once
for eval.

Which samples each rank and worker reads is the epoch plan (mgn/data/epoch_plan.py); what a sample becomes is
the decoder (mgn/data/decode.py). This module runs them: each training worker (mgn/data/worker.py) reads its
range of raw samples (mgn/io/tar.py), shuffles them in a buffer, decodes to RGB, applies the train transform,
batches and tokenizes, and its range holds exactly its batches' worth of samples; the rank's shortfall in the
last global batch is filled by reading the range again, reshuffled. `TrainLoader.balance` reports the repeated
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
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from mgn.config import Config, DataConfig, resolve_text_model
from mgn.data.decode import Decoder, image_normalisation
from mgn.data.epoch_plan import Piece, plan_epoch, round_robin, split_samples
from mgn.data.worker import MAX_EXAMPLES, BadDataError, SampleLimits, ShardStream, ignore_run_signals
from mgn.io.shard_sets import expand_shards, read_sizes, sample_fields
from mgn.data.block_files import TextBlockReader
from mgn.data.tokens import preload_tokenizer

log = logging.getLogger(__name__)



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
    dataset = ShardStream(plan, decoder, batch_size=batch_size, shuffle_buffer=data_cfg.shuffle_buffer,
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
    dataset = ShardStream(EvalAssignment(split_samples(mine, workers) if workers else []), decoder,
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
    (ignore_run_signals), and waits for them."""
    for iterator in list(_open_iterators):
        iterator._shutdown_workers()


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


class _Loader:
    """Runs a DataLoader over the stream and peels the skip counts off the batches."""

    def __init__(self, dataset: "ShardStream", num_workers: int, max_skip_fraction: float, *,
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
                                worker_init_fn=ignore_run_signals if self.num_workers else None)
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
