"""Loader throughput against the bare decode-and-transform rate of the same images, in one run.

    python benchmarks/loader_throughput.py                                  # synthetic 96 px shards
    python benchmarks/loader_throughput.py --image-size 224 --workers 1 2
    python benchmarks/loader_throughput.py --image-size 224 --workers 1 --captions ids tokens none \
        --out loader.json
    python benchmarks/loader_throughput.py --shards 'shards/demo/train-*.tar' --out loader.json

"bare" is one process doing only JPEG decode to RGB, the train transform (random resized crop +
flip) and normalisation into a batch tensor, with the image bytes already in memory: the work a
worker cannot avoid. The loader adds tar reading, the shuffle buffer, the captions (`--captions
ids`: token ids the shard writer stored, padded (mgn/data/tokens.py), what the guided objectives read by
default from shards written here; `tokens`: tokenized by the worker, from shards written without ids
(`--tokenizer none`, or by other tools); `blocks`: each sample's precomputed text block read instead,
`data.text_blocks`, here random bf16 blocks of `--block-shape`; `none`: an image-only objective), batching and
the hand-over to the main process (which normalises). The synthetic shards are written twice, with and without
ids, the same images in both; with `--shards`, every mode reads the given shards as they are (`tokens` and
`ids` alike read stored ids if any).

Cores per GPU: the CPU-seconds per sample of a worker and of the main process, times a GPU's rate
(`--gpu-rate`, default 3,000 samples/s), is how many cores a rank's loader needs to keep up.

Two ratios, goal >= 0.9:
- wall: loader samples/s / (workers x bare samples/s), what a training loop sees; on a small
  machine the main process and anything else running compete with the workers for cores;
- cpu: bare CPU-us per sample / worker CPU-us per sample (psutil), the efficiency of one
  worker, which holds still when other jobs load the machine.
Bare is measured before and after the loader runs; a gap between the two shows load drift.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgn.config import PACKAGED_MINILM, DataConfig  # noqa: E402
from mgn.data.loader import train_loader  # noqa: E402
from mgn.data.decode import Decoder  # noqa: E402
from mgn.data import block_files  # noqa: E402
from mgn.io.shard_sets import expand_shards  # noqa: E402
from mgn.io.tar import tar_samples  # noqa: E402
from mgn.data.writer import write_synthetic  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def bare_rate(images: list[bytes], decoder: Decoder, batch_size: int, min_seconds: float) -> tuple[float,
                                                                                                   float]:
    """(samples/s, CPU-us per sample) of decode + transform + normalise in this process."""
    rng = random.Random(0)
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < min_seconds:
        for i in range(0, len(images) - batch_size + 1, batch_size):
            items = [(str(j), decoder.transform(decoder.load_rgb(images[j]), rng), "", 0)
                     for j in range(i, i + batch_size)]
            decoder.normalise(decoder.collate(items, {}, (0, 0)))
            done += batch_size
    return done / (time.perf_counter() - start), (time.process_time() - cpu) / done * 1e6


def _children_cpu(children) -> float | None:
    try:
        return sum(sum(c.cpu_times()[:2]) for c in children)
    except psutil.Error:  # a worker already finished: keep the last complete reading
        return None


def write_random_blocks(shards: str, folder: str, shape: tuple[int, ...]) -> None:
    """A `data.text_blocks` folder for `shards` with random bf16 blocks: what the loader reads costs the
    same."""
    generator = torch.Generator().manual_seed(0)
    for shard in expand_shards(shards):
        with open(shard, "rb") as f:
            keys = [sample["__key__"] for sample in tar_samples(f)]  # in tar order, as the loader counts them
        blocks = torch.randn(len(keys), *shape, generator=generator)
        block_files.save_blocks(block_files.sidecar(folder, shard), keys, blocks, "benchmark")


def loader_epoch(cfg: DataConfig, args, workers: int, tokenizer: str | None, epoch: int) -> dict:
    """One epoch's counters. Steady state: clocks start at the first batch, so worker start-up is counted
    apart."""
    cfg = DataConfig(**{**cfg.__dict__, "num_workers": workers})
    me = psutil.Process()
    start = time.perf_counter()
    loader = train_loader(cfg, image_size=args.image_size, mean=MEAN, std=STD, tokenizer_name=tokenizer,
                          seq_len=args.seq_len, batch_size=args.batch_size, rank=0, world_size=1, seed=0,
                          epoch=epoch, text_blocks=cfg.text_blocks)
    batches = iter(loader)
    first_batch = len(next(batches)["key"])
    first, cpu0 = time.perf_counter(), time.process_time()
    children = me.children()
    kids0, kids, kid_samples, n = _children_cpu(children) or 0.0, None, 0, 0
    for batch in batches:
        n += len(batch["key"])
        reading = _children_cpu(children)
        if reading is not None:
            kids, kid_samples = reading, n
    end = time.perf_counter()
    counted = workers > 0 and kids is not None
    return {"samples": first_batch + n, "steady": n, "steady_s": end - first, "total_s": end - start,
            "main_cpu_s": time.process_time() - cpu0, "worker_cpu_s": kids - kids0 if counted else 0.0,
            "worker_samples": kid_samples if counted else 0}


def loader_rate(epochs: list[dict], workers: int) -> dict:
    """The figures of one (captions, workers) pair from its epochs' counters."""
    total = {k: sum(e[k] for e in epochs) for k in epochs[0]}
    result = {"workers": workers, "samples": total["samples"],
              "samples_per_s": total["steady"] / total["steady_s"],
              "samples_per_s_with_startup": total["samples"] / total["total_s"],
              "main_cpu_us_per_sample": total["main_cpu_s"] / total["steady"] * 1e6}
    if total["worker_samples"]:
        result["worker_cpu_us_per_sample"] = total["worker_cpu_s"] / total["worker_samples"] * 1e6
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="train shard spec (default: synthetic shards in a temporary folder)")
    p.add_argument("--samples", type=int, default=4096, help="synthetic samples to generate")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=2, help="loader epochs per measurement")
    p.add_argument("--captions", nargs="+", default=["ids"], choices=["ids", "tokens", "blocks", "none"],
                   help="what the loader does with the captions (see above); several are measured in turn, "
                        "one epoch each per round, so load drift hits them alike")
    p.add_argument("--block-shape", default="768,7,7", help="--captions blocks: H,g,g of each block (the "
                                                            "paper's)")
    p.add_argument("--gpu-rate", type=float, default=3000.0, help="samples/s one GPU trains, for cores per "
                                                                  "GPU")
    p.add_argument("--bare-seconds", type=float, default=5.0)
    p.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    args = p.parse_args()

    tmp, shards_with_ids = None, args.shards
    if args.shards is None:
        tmp = tempfile.TemporaryDirectory()
        for folder, tokenizer in (("plain", None), ("ids", PACKAGED_MINILM)):
            if folder == "plain" or "ids" in args.captions:
                write_synthetic(f"{tmp.name}/{folder}", samples=args.samples, image_size=args.image_size,
                                seed=0,
                                test_fraction=0.0, workers=os.cpu_count() or 1, tokenizer=tokenizer)
        args.shards, shards_with_ids = f"{tmp.name}/plain/train-*.tar", f"{tmp.name}/ids/train-*.tar"
    setups = {}  # captions -> (data config, tokenizer)
    for captions in dict.fromkeys(args.captions):
        spec = shards_with_ids if captions == "ids" else args.shards
        cfg = DataConfig(train_shards=spec, test_shards=spec)
        if captions == "blocks":
            blocks_dir = tempfile.TemporaryDirectory()
            write_random_blocks(args.shards, blocks_dir.name,
                                tuple(int(v) for v in args.block_shape.split(",")))
            cfg.text_blocks = blocks_dir.name
        setups[captions] = (cfg, PACKAGED_MINILM if captions in ("ids", "tokens") else None)
    images = []
    for shard in expand_shards(args.shards):
        with tarfile.open(shard) as tar:
            images += [tar.extractfile(m).read() for m in tar if m.name.endswith((".jpg", ".jpeg", ".png"))]
    decoder = Decoder(args.image_size, MEAN, STD, None, args.seq_len, train=True)

    (before, cpu_before) = bare_rate(images, decoder, args.batch_size, args.bare_seconds)
    epochs: dict[tuple[str, int], list[dict]] = {(c, w): [] for c in setups for w in args.workers}
    order = list(epochs)
    for epoch in range(args.epochs):  # rounds: every setup once, the order rotated each round
        for captions, workers in order[epoch % len(order):] + order[:epoch % len(order)]:
            cfg, tokenizer = setups[captions]
            epochs[captions, workers].append(loader_epoch(cfg, args, workers, tokenizer, epoch))
    (after, cpu_after) = bare_rate(images, decoder, args.batch_size, args.bare_seconds)
    bare, bare_cpu = (before + after) / 2, (cpu_before + cpu_after) / 2
    runs = []
    for (captions, workers), counters in epochs.items():
        run = {"captions": captions, **loader_rate(counters, workers)}
        run["ratio_wall_per_worker"] = run["samples_per_s"] / (max(workers, 1) * bare)
        if "worker_cpu_us_per_sample" in run:
            run["ratio_cpu_per_worker"] = bare_cpu / run["worker_cpu_us_per_sample"]
            run["cores_per_gpu"] = (args.gpu_rate * (run["worker_cpu_us_per_sample"]
                                                     + run["main_cpu_us_per_sample"])
                                    / 1e6)
        runs.append(run)

    result = {"image_size": args.image_size, "batch_size": args.batch_size, "images": len(images),
              "epochs": args.epochs, "captions": list(setups), "seq_len": args.seq_len,
              "tokenizer": PACKAGED_MINILM if {"ids", "tokens"} & set(setups) else None,
              "block_shape": args.block_shape if "blocks" in setups else None, "gpu_rate": args.gpu_rate,
              "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
              "bare": {"samples_per_s_before": before, "samples_per_s_after": after, "samples_per_s": bare,
                       "cpu_us_per_sample": bare_cpu},
              "loader": runs}
    print(f"{len(images)} images at {args.image_size} px, batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"bare decode+transform, 1 process: {bare:7.0f} samples/s (before {before:.0f}, after "
          f"{after:.0f}), "
          f"{bare_cpu:.0f} CPU-us/sample")
    for run in runs:
        cpu = (f", worker {run['worker_cpu_us_per_sample']:.0f} CPU-us/sample -> cpu ratio "
               f"{run['ratio_cpu_per_worker']:.2f}, {run['cores_per_gpu']:.1f} cores per GPU at "
               f"{args.gpu_rate:.0f} samples/s") if "ratio_cpu_per_worker" in run else ""
        print(f"train_loader, captions {run['captions']}, {run['workers']} worker(s): "
              f"{run['samples_per_s']:7.0f} "
              f"samples/s ({run['samples_per_s_with_startup']:.0f} with start-up) -> wall ratio per worker "
              f"{run['ratio_wall_per_worker']:.2f}; main {run['main_cpu_us_per_sample']:.0f} "
              f"CPU-us/sample{cpu}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
