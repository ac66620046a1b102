"""Resume start-up: time until the first batch after resuming at 10% and at 90% of an epoch.

    python benchmarks/resume_startup.py                  # 20,000 synthetic 96 px samples, 2 loader workers

A resumed run skips what the epoch already consumed as raw samples (tar bytes through the shuffle buffer,
no JPEG decode, no tokenization), so starting at 90% should cost about what starting at 10% costs. For
comparison the benchmark also times the old way, decoding and discarding the consumed batches.
Writes benchmarks/results/resume_startup.json.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgn.config import preset_config  # noqa: E402
from mgn.data.loader import build_loader  # noqa: E402
from mgn.shards import write_synthetic  # noqa: E402


def first_batch_seconds(cfg, skip: int, decode_and_discard: bool) -> float:
    start = time.perf_counter()
    batches = iter(build_loader(cfg, "train", skip_batches=0 if decode_and_discard else skip))
    for _ in range(skip if decode_and_discard else 0):
        next(batches)
    next(batches)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--shards", default="/tmp/mgn-resume-bench", help="where the synthetic shards are "
                                                                          "written")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/resume_startup.json")
    args = parser.parse_args()
    folder = Path(args.shards)
    if not (folder / "sizes.json").exists():
        write_synthetic(folder, samples=args.samples, image_size=96, seed=0, max_samples=1000, workers=2)
    cfg = preset_config("demo", {"data": {"train_shards": str(folder / "train-*.tar"),
                                          "test_shards": str(folder / "test-*.tar"),
                                          "num_workers": args.workers}})
    batches = len(build_loader(cfg, "train"))
    result = {"samples_per_epoch": batches * cfg.train.micro_batch, "batches_per_epoch": batches,
              "workers": args.workers, "cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()}
    for share in (0.1, 0.9):
        skip = int(share * batches)
        result[f"raw_skip_{share:.0%}_s"] = first_batch_seconds(cfg, skip, decode_and_discard=False)
        result[f"decode_and_discard_{share:.0%}_s"] = first_batch_seconds(cfg, skip, decode_and_discard=True)
    result["raw_skip_90_over_10"] = result["raw_skip_90%_s"] / result["raw_skip_10%_s"]
    print(f"resume start-up, {batches} batches an epoch, {args.workers} workers: skipping raw samples "
          f"{result['raw_skip_10%_s']:.2f} s at 10%, {result['raw_skip_90%_s']:.2f} s at 90% "
          f"(ratio {result['raw_skip_90_over_10']:.2f}); decoding and discarding "
          f"{result['decode_and_discard_10%_s']:.2f} s and {result['decode_and_discard_90%_s']:.2f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
