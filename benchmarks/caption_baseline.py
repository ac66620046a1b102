"""How much the captions alone say: a bag-of-words logistic regression, train shards -> test shards.

    python benchmarks/caption_baseline.py                        # the demo shards
    python benchmarks/caption_baseline.py --shards /data/shards  # your own: train-*.tar, test-*.tar

A guided teacher that scores near this number is reading the captions, not the images.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgn.eval.caption_only import caption_only_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="shards/demo", help="folder with train-*.tar and test-*.tar")
    parser.add_argument("--out", default="benchmarks/results/caption_baseline.json")
    args = parser.parse_args()
    result = {"shards": args.shards, **caption_only_metrics(f"{args.shards}/train-*.tar",
                                                            f"{args.shards}/test-*.tar")}
    print(f"caption-only bag of words: {result['train']} train / {result['test']} test captions, "
          f"accuracy {result['accuracy']:.3f}, AUROC {result.get('auroc', float('nan')):.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
