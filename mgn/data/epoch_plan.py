"""Who reads what in an epoch: a shard set's samples cut into one contiguous range per rank, then per worker.

Training, per epoch: the shard list is shuffled with (seed, epoch), identically on every rank, and its
samples, concatenated in that order, are cut into one contiguous range per rank and then per DataLoader
worker, balanced by sample count (`sizes.json`), not by shard: a rank or worker may read part of a
shard, so uneven shards neither idle a rank nor make it repeat a small shard many times. The number of
batches per rank is fixed up front: ceil(samples / (batch_size x world_size)), the same on every rank and
for any `num_workers`; each worker's range holds exactly its batches' worth of samples, so only the last
global batch of an epoch can be short: its missing places (fewer than batch_size x world_size) are filled
by reading the rank's range again (mgn/data/worker.py, `_read_pieces`). `EpochPlan.balance` gives the
repeated and never-seen shares. Evaluation uses `split_samples` alone: the same cut, in order, without
shuffling or repetition.

Plain arithmetic on (shards, sizes, seed, epoch, world size, workers), no I/O and no torch: every rank
computes the same plan without talking to the others, and a resumed run computes the one it left.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

BALANCE_WARNING = 0.05  # warn when more than this share of an epoch repeats or is never seen


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
    """Batches per rank: enough global batches to read every sample once (at least one)."""
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


def plan_epoch(shards: list[str], sizes: dict[str, int], *, batch_size: int, world_size: int,
               num_workers: int,
               seed: int, epoch: int) -> EpochPlan:
    """The epoch's shard order, each rank's range and each worker's share of it with its number of batches."""
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
