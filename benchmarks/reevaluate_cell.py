"""Evaluate a recorded comparison run again and compare every figure with its row in results.jsonl.

Why: a row must be reproducible from its run folders (the trained checkpoints), and a change to the
evaluation code (such as `teacher_and_reliance` encoding each test image once for its three captions instead
of four times) must leave every figure of every row as it was. Prints the seconds the evaluation took against
the row's `eval_seconds`, writes a JSON report, and exits 1 when a figure differs.

    python benchmarks/reevaluate_cell.py /work/compare-work2/cells/plain-decoys-imagenet-guided-seed0.json \\
        --results benchmarks/results/bench2-plain-decoys/results.jsonl --out reevaluate.json

Run it alone (or with the study's runner paused: `kill -STOP -PGID`): the seconds are the point.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgn.compare.cell import evaluate_cell  # noqa: E402
from mgn.compare.ledger import read_results  # noqa: E402

FIGURES = ("test_samples", "student", "student_true", "validation", "teacher", "reliance", "per_sample")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cell", type=Path, help="the cell's spec, <work>/cells/<key>.json")
    parser.add_argument("--results", type=Path, required=True, help="the results.jsonl holding its row")
    parser.add_argument("--out", type=Path, default=Path("reevaluate.json"))
    args = parser.parse_args()
    spec = json.loads(args.cell.read_text())
    rows = [r for r in read_results(args.results) if r["key"] == spec["key"]]
    if not rows:
        print(f"reevaluate_cell.py: error: {args.results} has no row {spec['key']!r}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    again = evaluate_cell(spec)
    seconds = time.perf_counter() - start
    # compared as JSON text, as results.jsonl holds them: NaN (an AUROC with one class) equals NaN
    differ = [k for k in FIGURES if k in rows[0]
              and json.dumps(again.get(k), sort_keys=True) != json.dumps(rows[0][k], sort_keys=True)]
    compared = [k for k in FIGURES if k in rows[0]]
    report = {"key": spec["key"], "eval_seconds": round(seconds, 1),
              "row_eval_seconds": rows[0]["eval_seconds"], "row_code": rows[0]["code"],
              "figures_compared": compared, "differ": differ}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{spec['key']}: evaluated in {seconds:.1f} s (the row, code {rows[0]['code']}: "
          f"{rows[0]['eval_seconds']} s); " + (f"DIFFERENT: {', '.join(differ)}" if differ
                                               else f"every figure as recorded ({', '.join(compared)})"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
