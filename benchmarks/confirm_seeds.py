"""A lead confirmed on fresh seeds: an arm against its baseline on only the seeds that were not looked at
before.

    python benchmarks/confirm_seeds.py benchmarks/results/verdict-tram-10/results.jsonl \
        --setting clean/standin --arms tram,oracle-attention,oracle-teacher --seeds 5-9 \
        --out benchmarks/results/verdict-tram-10/confirm.json

A lead found among many comparisons (here `tram`, one of 9 arms at seeds 0-4) is confirmed or not by the same
comparison on seeds chosen after it was found, and by nothing else: this reads a comparison's results.jsonl
(compare.py), keeps the rows of `--seeds`, and prints per arm the paired difference from the baseline (mean,
95% t interval over seeds, wins/ties/losses) and the paired bootstrap over seeds x test samples
(mgn/compare/significance.py), the same statistics the comparison's table gives over all its seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgn.compare import significance  # noqa: E402


def seed_range(text: str) -> list[int]:
    """`5-9` or `5,6,7`."""
    if "-" in text:
        first, last = (int(v) for v in text.split("-"))
        return list(range(first, last + 1))
    return [int(v) for v in text.split(",")]


def confirm(rows: list[dict], setting: str, arms: list[str], seeds: list[int]) -> dict:
    """{arm: {'paired': ..., 'sample_level': ...}} over `seeds` only."""
    kept = [r for r in rows if r["seed"] in seeds]
    out = {}
    for arm in arms:
        paired = significance.paired(kept, setting, arm, "accuracy")
        if paired is None:
            raise ValueError(f"no {arm} and baseline rows of {setting} at seeds {seeds}")
        out[arm] = {"paired": paired, "sample_level": significance.sample_level(kept, setting, arm)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a comparison's results.jsonl")
    p.add_argument("--setting", required=True)
    p.add_argument("--arms", required=True, help="comma-separated arms to compare with the baseline")
    p.add_argument("--seeds", required=True, type=seed_range, help="the fresh seeds, e.g. 5-9")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    result = confirm(rows, args.setting, args.arms.split(","), args.seeds)
    print(f"{args.setting}, seeds {args.seeds} only, accuracy, arm - baseline in points:")
    for arm, figures in result.items():
        paired, level = figures["paired"], figures["sample_level"]
        bootstrap = f"; bootstrap over seeds x samples {significance.interval_text(level)}" if level else ""
        print(f"  {arm:20s} {significance.interval_text(paired)} over {len(paired['seeds'])} seeds, "
              f"{paired['wins']}/{paired['ties']}/{paired['losses']}{bootstrap}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": args.results, "setting": args.setting,
                                              "seeds": args.seeds,
                                              "arms": result}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
