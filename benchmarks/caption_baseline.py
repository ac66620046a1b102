"""How much the captions alone say: a bag-of-words logistic regression, train shards -> test shards.

    python benchmarks/caption_baseline.py                        # the demo shards
    python benchmarks/caption_baseline.py --shards /data/shards  # your own: train-*.tar, test-*.tar

A guided teacher that scores near this number is reading the captions, not the images.
"""
import argparse
import glob
import json
import tarfile
from pathlib import Path

from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def captions_and_labels(pattern: str) -> tuple[list[str], list[int]]:
    samples: dict[str, dict[str, str]] = {}
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext in ("txt", "cls"):
                    samples.setdefault(f"{path}/{key}", {})[ext] = tar.extractfile(member).read().decode()
    if not samples:
        raise SystemExit(f"no samples in {pattern}")
    return [s["txt"] for s in samples.values()], [int(s["cls"]) for s in samples.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="shards/demo", help="folder with train-*.tar and test-*.tar")
    parser.add_argument("--out", default="benchmarks/results/caption_baseline.json")
    args = parser.parse_args()
    train_text, train_y = captions_and_labels(f"{args.shards}/train-*.tar")
    test_text, test_y = captions_and_labels(f"{args.shards}/test-*.tar")
    words = CountVectorizer().fit(train_text)
    classifier = LogisticRegression(max_iter=2000).fit(words.transform(train_text), train_y)
    test_x = words.transform(test_text)
    result = {"shards": args.shards, "train": len(train_y), "test": len(test_y),
              "accuracy": classifier.score(test_x, test_y),
              "auroc": roc_auc_score(test_y, classifier.predict_proba(test_x)[:, 1])}
    print(f"caption-only bag of words: {result['train']} train / {result['test']} test captions, "
          f"accuracy {result['accuracy']:.3f}, AUROC {result['auroc']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
