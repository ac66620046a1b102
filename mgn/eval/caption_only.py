"""How much the captions alone say: a bag-of-words logistic regression, train shards -> test shards.

A guided teacher that scores near this number is reading the captions, not the images. The comparison
runner reports it beside every table; `benchmarks/caption_baseline.py` runs it alone.
"""
from __future__ import annotations

import tarfile

from mgn.io.manifest import MAX_CAPTION_BYTES
from mgn.io.images import cap_caption
from mgn.io.sources import open_shard
from mgn.io.shard_sets import expand_shards, sample_fields
from mgn.io.tar import tar_samples


def captions_and_labels(spec: str) -> tuple[list[str], list[int]]:
    """Every sample's caption and label, from shards given as in `data.train_shards`; images are read past and
    dropped as they stream by, a damaged shard contributes what it holds before the damage."""
    captions, labels, fields = [], [], sample_fields(spec)
    for shard in expand_shards(spec):
        try:
            with open_shard(shard) as f:
                for sample in tar_samples(f):
                    try:
                        label, caption = fields.label(sample), cap_caption(fields.caption(sample),
                                                                           MAX_CAPTION_BYTES)
                    except ValueError:  # no label or caption where the card says, or bad UTF-8
                        continue
                    captions.append(caption)
                    labels.append(label)
        except (OSError, tarfile.TarError):
            continue
    if not captions:
        raise ValueError(f"no captioned, labelled samples in {spec!r}")
    return captions, labels


def caption_only_metrics(train_shards: str, test_shards: str) -> dict:
    """Fit on the train captions, score the test captions: accuracy and (binary) AUROC."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    train_text, train_y = captions_and_labels(train_shards)
    test_text, test_y = captions_and_labels(test_shards)
    words = CountVectorizer().fit(train_text)
    classifier = LogisticRegression(max_iter=2000).fit(words.transform(train_text), train_y)
    test_x = words.transform(test_text)
    result = {"train": len(train_y), "test": len(test_y), "accuracy": float(classifier.score(test_x, test_y))}
    if len(set(test_y)) == 2 and len(classifier.classes_) == 2:
        result["auroc"] = float(roc_auc_score(test_y, classifier.predict_proba(test_x)[:, 1]))
    return result
