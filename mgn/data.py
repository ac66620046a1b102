"""WebDataset input pipelines: equal batches on every rank for training, every test sample once for eval.

Training, per epoch: the shard list is shuffled with (seed, epoch), identically on every rank;
`split_by_node` gives rank r the shards r, r+W, ...; `split_by_worker` deals those out to the
DataLoader workers. Each worker reads its tars, shuffles samples in a buffer, decodes to RGB,
applies the train transform, batches and tokenizes. The number of batches per rank is fixed up
front from `sizes.json`: ceil(samples / (batch_size * world_size)), the same on every rank and
for any `num_workers`, split among the workers in proportion to the samples their shards hold.
A worker whose shards hold fewer samples than its share reads them again, reshuffled (a few
samples repeat, as in open_clip); one with more stops early (the rest are seen in other epochs,
since the shard shuffle changes). So no rank waits at a collective for a rank that ran out of
data. A rank with fewer shards than `num_workers` runs fewer workers (logged); fewer shards than
ranks is an error. The order is a function of (seed, epoch, rank, num_workers), so a resumed
run can skip the batches it already consumed.

Evaluation reads shards in order, split the same way but without repetition or shuffling, and
keeps the last partial batch: every test sample is read exactly once across all ranks.

Bad samples (truncated tar, undecodable image, missing field, duplicate key) are skipped and
counted per shard; samples lost to a truncated tar are counted from `sizes.json`. The counts
travel with the batches and the loader aggregates them: `loader.skipped()`. More than
`max_skip_fraction` of the samples skipped stops the run with an error naming the shards.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mgn.config import DataConfig, resolve_text_model

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
TRAIN_SCALE, TRAIN_RATIO = (0.6, 1.0), (3 / 4, 4 / 3)
EVAL_CROP_PCT = 0.875  # timm's default for MobileOne: resize to size/0.875, centre-crop size
MAX_EXAMPLES = 20  # skip reasons kept for the report


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


def split_by_node(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Explicit rank arguments instead of webdataset's environment lookup: the caller knows them."""
    return list(shards[rank::world_size])


def split_by_worker(shards: Sequence[str], worker: int, num_workers: int) -> list[str]:
    return list(shards[worker::num_workers])


def batches_per_epoch(total_samples: int, batch_size: int, world_size: int) -> int:
    return max(1, math.ceil(total_samples / (batch_size * world_size)))


def worker_quotas(num_batches: int, samples: list[int]) -> list[int]:
    """Split a rank's batches among its workers in proportion to the samples each one holds.

    Largest remainders, ties to the lower worker: a worker with little data repeats little and a
    worker with much data drops little. The DataLoader interleaves whatever the quotas are.
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


# ---------------------------------------------------------------------------------------------- public loaders

def train_loader(data_cfg: DataConfig, *, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int,
                 batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> "TrainLoader":
    shards = expand_shards(data_cfg.train_shards)
    sizes = read_sizes(shards)
    if len(shards) < world_size:
        raise ValueError(f"{len(shards)} train shards cannot feed {world_size} ranks (shards are the unit of "
                         f"splitting): write at least {world_size} shards, e.g. mgn.shards --max-samples-per-shard")
    num_batches = batches_per_epoch(sum(sizes.values()), batch_size, world_size)
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)  # same on every rank
    mine = split_by_node(order, rank, world_size)
    workers = min(max(data_cfg.num_workers, 1), len(mine), num_batches)
    if workers < data_cfg.num_workers:
        log.warning("rank %d: %d shards for %d workers; using %d workers (epoch length is unchanged)",
                    rank, len(mine), data_cfg.num_workers, workers)
    _preload(tokenizer_name, seq_len)
    held = [sum(sizes[s] for s in split_by_worker(mine, w, workers)) for w in range(workers)]
    dataset = _ShardStream(mine, sizes, Decoder(image_size, mean, std, tokenizer_name, seq_len, train=True),
                           batch_size=batch_size, quotas=worker_quotas(num_batches, held),
                           shuffle_buffer=data_cfg.shuffle_buffer, seed=f"{seed}/{epoch}/{rank}")
    return TrainLoader(dataset, workers if data_cfg.num_workers > 0 else 0, num_batches, data_cfg.max_skip_fraction)


def eval_loader(data_cfg: DataConfig, *, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int,
                batch_size: int, rank: int, world_size: int) -> "EvalLoader":
    shards = expand_shards(data_cfg.test_shards)
    sizes = read_sizes(shards)
    mine = split_by_node(shards, rank, world_size)  # ranks beyond the shard count get no batches
    workers = min(data_cfg.num_workers, len(mine))
    _preload(tokenizer_name, seq_len)
    dataset = _ShardStream(mine, sizes, Decoder(image_size, mean, std, tokenizer_name, seq_len, train=False),
                           batch_size=batch_size, quotas=None, shuffle_buffer=0, seed="eval")
    return EvalLoader(dataset, workers, data_cfg.max_skip_fraction, sum(sizes[s] for s in mine))


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

    def _batches(self) -> Iterator[dict]:
        self._seen, self._skipped, self._examples = Counter(), Counter(), []
        if not self.dataset.shards:
            return
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                            collate_fn=_keep)
        expected = sum(self.dataset.sizes[s] for s in self.dataset.shards)
        for item in loader:
            stats = item.pop("_stats")
            self._seen.update(stats["seen"])
            self._skipped.update(stats["skipped"])
            self._examples = (self._examples + stats["examples"])[:MAX_EXAMPLES]
            # Fail fast once the epoch can no longer end under the limit.
            if sum(self._skipped.values()) > self.max_skip_fraction * max(expected, sum(self._seen.values())):
                self._check()
            if "image" in item:
                yield self.dataset.decoder.normalise(item)
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
    """Exactly `len(self)` full batches, the same number on every rank."""

    def __init__(self, dataset, num_workers, num_batches, max_skip_fraction):
        super().__init__(dataset, num_workers, max_skip_fraction)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        count = 0
        for batch in self._batches():
            count += 1
            yield batch
        if count != self.num_batches:  # would desynchronise the ranks: never let it pass silently
            raise RuntimeError(f"produced {count} batches instead of {self.num_batches}")


class EvalLoader(_Loader):
    """This rank's share of the test set, each sample once; `num_samples` is the count sizes.json promises."""

    def __init__(self, dataset, num_workers, max_skip_fraction, num_samples):
        super().__init__(dataset, num_workers, max_skip_fraction)
        self.num_samples = num_samples

    def __iter__(self) -> Iterator[dict]:
        return self._batches()


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


class _ShardStream(IterableDataset):
    """One worker's pipeline: its shards -> samples -> shuffle -> decode -> batches (+ skip counts)."""

    def __init__(self, shards: list[str], sizes: dict[str, int], decoder: "Decoder", *, batch_size: int,
                 quotas: list[int] | None, shuffle_buffer: int, seed: str):
        self.shards, self.sizes, self.decoder = shards, sizes, decoder
        self.batch_size, self.quotas, self.shuffle_buffer, self.seed = batch_size, quotas, shuffle_buffer, seed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.quotas is not None and len(self.quotas) != num_workers:
            raise RuntimeError(f"planned for {len(self.quotas)} workers, running with {num_workers}")
        shards = split_by_worker(self.shards, worker, num_workers)
        stats = _Stats()
        seed = f"{self.seed}/{worker}"
        train = self.quotas is not None
        buffer = self.shuffle_buffer if train else 0
        quota = self.quotas[worker] if train else None
        return iter(wds.DataPipeline(
            _read_tars(shards, self.sizes, stats, repeat=train, shuffle_buffer=buffer, seed=seed),
            self.decoder.stage(stats, random.Random(f"aug/{seed}")),
            _batches(self.batch_size, quota, self.decoder, stats),
        ))


def _read_tars(shards: list[str], sizes: dict[str, int], stats: _Stats, *, repeat: bool, shuffle_buffer: int,
               seed: str):
    """Samples from tar files, shuffled within each pass over the worker's shards.

    Repetition wraps the shuffle buffer rather than feeding it, so no sample comes back before
    the whole pass has been used. Skips are counted on the first pass only.
    """

    def one_pass(order: list[str], first: bool) -> Iterator[dict]:
        for shard in order:
            for sample in _tar_samples(shard, sizes.get(shard, 0), stats if first else _Stats()):
                sample["__first__"] = first
                yield sample

    def source() -> Iterator[dict]:
        rng = random.Random(f"pass/{seed}")
        order, first = list(shards), True
        while True:
            samples = one_pass(order, first)
            if shuffle_buffer > 1:
                samples = wds.shuffle(shuffle_buffer, shuffle_buffer, rng=rng)(samples)
            produced = 0
            for sample in samples:
                produced += 1
                yield sample
            if not repeat:
                return
            if produced == 0:
                raise RuntimeError(f"no readable samples in shards {shards}: cannot fill this worker's batches")
            first = False
            rng.shuffle(order)

    return source


def _tar_samples(shard: str, expected: int, stats: _Stats) -> Iterator[dict]:
    """Group a tar's files by key; a repeated key within the shard is a bad sample."""
    keys: set[str] = set()
    count = 0  # samples met in this shard, good or bad

    def finish(sample):
        nonlocal count
        count += 1
        stats.seen[shard] += 1
        if sample["__key__"] in keys:
            stats.skip(shard, sample["__key__"], "duplicate key in shard")
            return None
        keys.add(sample["__key__"])
        return sample

    current, error = None, None
    try:
        with open(shard, "rb", buffering=1 << 20) as f:
            for name, data in tar_files(f):
                key, ext = _split_name(name)
                if key is None:
                    continue
                if current is not None and (key != current["__key__"] or ext in current):
                    if (done := finish(current)) is not None:
                        yield done
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": shard}
                current[ext] = data
        if current is not None and (done := finish(current)) is not None:
            yield done
    except (tarfile.TarError, OSError) as exc:
        error = f"unreadable tar after {count} samples: {exc}"
    lost = expected - count
    if error or lost > 0:
        lost = max(lost, 1)
        stats.seen[shard] += lost
        stats.skip(shard, "*", error or f"shard ended after {count} of {expected} samples", lost)


def tar_files(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files in a tar stream.

    A few lines of header parsing instead of `tarfile`, whose per-member objects cost more than
    decoding a small JPEG. Handles ustar (what webdataset and mgn.shards write), GNU long names
    and pax paths; checksums are verified (a few us a header, a few percent of decoding a small
    JPEG: worth it to catch a corrupt shard), and a short read raises `tarfile.ReadError`.
    """
    long_name = None
    while True:
        header = f.read(512)
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (a missing end marker is left to the sizes.json check)
        if len(header) < 512:
            raise tarfile.ReadError("unexpected end of data in a header")
        if not _checksum_ok(header):
            raise tarfile.ReadError("bad header checksum")
        try:
            size = _tar_number(header[124:136])
        except ValueError:
            raise tarfile.ReadError("bad header (size field)") from None
        data = f.read(size)
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        f.read(-size % 512)
        kind = header[156:157]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":  # pax extended header: only the path matters here
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):
            name = long_name or _tar_name(header)
            long_name = None
            yield name, data
        else:  # directories, links, global pax headers: nothing to read
            long_name = None


_ZERO_BLOCK = bytes(512)


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].strip(b"\0 ")
    # The checksum field counts as eight spaces (8 * 32 = 256); one pass over the header is ~3x faster than two slices.
    return stored.isdigit() and int(stored, 8) == sum(header) - sum(header[148:156]) + 256


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256, for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _tar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8")


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, item = record.partition(b" ")
        if item.startswith(b"path="):
            return item[5:].decode("utf-8")
    return None


def _split_name(name: str) -> tuple[str | None, str]:
    """webdataset's rule: the key is everything up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None, ""
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _batches(batch_size: int, quota: int | None, decoder: "Decoder", stats: _Stats):
    """Training stops at the worker's quota of full batches; evaluation keeps the last partial batch."""

    def run(items):
        buf, made = [], 0
        if quota == 0:  # a worker with very little data may get no batch at all
            items = ()
        for item in items:
            buf.append(item)
            if len(buf) == batch_size:
                yield decoder.collate(buf, stats.take())
                buf, made = [], made + 1
                if quota is not None and made >= quota:
                    break
        if buf and quota is None:
            yield decoder.collate(buf, stats.take())
        yield {"_stats": stats.take()}  # counts from after the last batch, or from a worker with no batches

    return run


class Decoder:
    """Bytes -> RGB crops -> uint8 batches with tokens (workers) -> normalised float batches (main process)."""

    def __init__(self, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int, *, train: bool):
        self.size, self.train = image_size, train
        self.tokenizer_name, self.seq_len = tokenizer_name, seq_len
        std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) / std

    def stage(self, stats: _Stats, rng: random.Random):
        def run(samples):
            for sample in samples:
                try:
                    yield self.decode(sample, rng)
                except _BadSample as exc:
                    if sample["__first__"]:
                        stats.skip(sample["__url__"], sample["__key__"], str(exc))

        return run

    def decode(self, sample: dict, rng: random.Random | None = None) -> tuple[str, np.ndarray, str, int]:
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        for name, value in (("image (jpg/png/webp)", field), ("txt", "txt" in sample), ("cls", "cls" in sample)):
            if not value:
                raise _BadSample(f"missing {name}")
        try:
            caption = sample["txt"].decode("utf-8")
            label = int(sample["cls"].decode("ascii").strip())
        except ValueError as exc:
            raise _BadSample(f"bad txt/cls: {exc}") from None
        try:
            image = self.load_rgb(sample[field])
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken data
            raise _BadSample(f"undecodable image: {exc}") from None
        return sample["__key__"], self.transform(image, rng), caption, label

    def load_rgb(self, data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; keep enough pixels for the crop.
        need = math.ceil(self.size * (1.5 if self.train else 1 / EVAL_CROP_PCT))
        image.draft("RGB", (need, need))
        return image.convert("RGB")  # RGB always: the normalisation constants are RGB

    def transform(self, image: Image.Image, rng: random.Random | None) -> np.ndarray:
        """Crop and resize in one PIL call; train: random resized crop + flip, eval: centre crop."""
        w, h = image.size
        box = _random_crop(w, h, rng) if self.train else _centre_crop(w, h)
        out = np.asarray(image.resize((self.size, self.size), Image.BILINEAR, box=box))
        if self.train and rng.random() < 0.5:
            out = out[:, ::-1]
        return out

    def collate(self, items: list, stats: dict) -> dict:
        """Pixels stay uint8 (a quarter of float32) and are written straight into shared memory.

        Handing a batch from a worker to the main process costs about as much as decoding it
        when it is float32 (measured: 3.4 ms per 32 x 96 px batch, 18 ms at 224 px; uint8: 1.2 and
        4.8 ms), so the main process normalises (`normalise`). Labels and tokens stay numpy:
        pickled through the pipe they cost less than a shared segment each.
        """
        shape = (len(items), self.size, self.size, 3)
        pixels = _empty_shared(shape) if get_worker_info() is not None else torch.empty(shape, dtype=torch.uint8)
        np.stack([item[1] for item in items], out=pixels.numpy())
        batch = {"image": pixels, "_stats": stats,
                 "label": np.array([item[3] for item in items], dtype=np.int64), "key": [item[0] for item in items]}
        if self.tokenizer_name is not None:
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
