"""Seconds a training or evaluation process spends importing the package before its first step.

Why: every `train.py`, `evaluate.py` and comparison cell pays it once, the test suite a few hundred times.
Each round starts a fresh interpreter that imports what those processes import; with `--against DIR` (another
checkout of this project, e.g. a `git worktree` of an older commit) the two checkouts alternate within each
round, and the figure is the median of the paired per-round ratios with its range (this machine is shared).

    python benchmarks/startup_imports.py --rounds 10 --against /work/wt-old --out startup.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import mgn.train.loop, mgn.eval.evaluate"  # what train.py and evaluate.py import before any work


def seconds_to_import(checkout: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], cwd=checkout, env=env, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--against", type=Path, help="another checkout, timed alternately in each round")
    parser.add_argument("--out", type=Path, default=Path("startup_imports.json"))
    args = parser.parse_args()
    checkouts = {"this": ROOT, **({"against": args.against.resolve()} if args.against else {})}
    times: dict[str, list[float]] = {name: [] for name in checkouts}
    for index in range(args.rounds):
        names = list(checkouts) if index % 2 == 0 else list(reversed(checkouts))  # neither always first
        for name in names:
            times[name].append(seconds_to_import(checkouts[name]))
    result = {"imports": IMPORTS, "rounds": args.rounds, "python": platform.python_version(),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "checkouts": {name: str(path) for name, path in checkouts.items()},
              "median_seconds": {name: statistics.median(values) for name, values in times.items()},
              "seconds": times}
    line = f"import ({IMPORTS}): this checkout median {result['median_seconds']['this']:.2f} s"
    if args.against:
        ratios = [mine / theirs for mine, theirs in zip(times["this"], times["against"])]
        result["paired_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        line += (f", {args.against} {result['median_seconds']['against']:.2f} s; paired ratio this/against "
                 f"median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}) over "
                 f"{args.rounds} rounds")
    print(line)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
