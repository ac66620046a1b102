"""The image-only ceiling of a synthetic shard set: the best accuracy any image-only model can reach on it.

The synthetic generator knows, for every sample, what decided its label (mgn/io/synthetic.py `posterior`
derives the Bayes posterior from the generator's code). The Bayes rule, "violent" when that posterior is above
1/2, is the best image-only decision; its accuracy on a set's own samples is that set's ceiling, on the stored
labels (label noise included: no model can predict the flips) and on the true labels. Beside it: the expected
accuracy of the rule (mean of max(P, 1 - P), what another draw of the same size would give on average) and the
ceiling with the deciding splat known, i.e. what a perfect reading of the caption's `focus` field would add.

Only sets written with the generator's `ground_truth` option carry what this needs (every splat's cue in each
sample's json); for any other set (a user's own data) there is no ceiling: `ground_truth` returns None.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from mgn.io import synthetic
from mgn.io.shard_sets import expand_shards
from mgn.io.tar import tar_samples


def generator_spec(shards: str) -> synthetic.SyntheticSpec | None:
    """The generator's settings from the dataset_card.json beside the shards; None for other data."""
    try:
        card = json.loads((Path(expand_shards(shards)[0]).parent / "dataset_card.json").read_text())
        raw = dict(card["generator"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    known = set(synthetic.SyntheticSpec.__dataclass_fields__)
    return synthetic.SyntheticSpec(**{k: v for k, v in raw.items() if k in known})


def ground_truth(shards: str) -> dict | None:
    """Per sample key: stored and true label, the Bayes posterior of the true label (badge included, with the
    correlation of the sample's split), the same with the deciding splat known, the deciding region and
    whether the badge is drawn.
    None unless every sample is from the violence generator with `ground_truth` on."""
    spec = generator_spec(shards)
    if spec is None or spec.target != "violence" or not spec.ground_truth:
        return None
    out = {}
    for shard in expand_shards(shards):
        correlation = spec.spurious_test if Path(shard).name.startswith("test-") else spec.spurious_train
        try:
            with open(shard, "rb") as f:
                samples = list(tar_samples(f))
        except (OSError, tarfile.TarError):
            return None
        for sample in samples:
            meta = json.loads(sample["json"])
            if "cues" not in meta:
                return None
            out[sample["__key__"]] = {
                "label": int(sample["cls"]), "true_label": int(meta["true_label"]),
                "posterior": synthetic.posterior(spec, meta["cues"], badge=meta["badge"],
                                                 correlation=correlation),
                "posterior_deciding_known": synthetic.posterior(spec, meta["cues"], badge=meta["badge"],
                                                                correlation=correlation, deciding_known=True),
                "cue_quadrant": meta["cue_quadrant"], "badge": bool(meta["badge"])}
    return out


def ceiling(shards: str) -> dict | None:
    """The ceiling of a shard set (see the module's docstring); None without ground truth."""
    truth = ground_truth(shards)
    if not truth:
        return None
    spec = generator_spec(shards)
    return ceiling_of(list(truth.values()), spec.label_noise)


def ceiling_of(samples: list[dict], label_noise: float) -> dict:
    """From per-sample {label, true_label, posterior, posterior_deciding_known}: the Bayes rule's accuracy on
    stored and true labels, its expected accuracy, and the same with the deciding splat known."""
    stored = np.array([s["label"] for s in samples])
    true = np.array([s["true_label"] for s in samples])

    def scores(p: np.ndarray) -> dict:
        decision = (p > 0.5).astype(int)
        q = label_noise + (1 - 2 * label_noise) * p  # P(stored label = violent | frame)
        return {"stored": float(np.mean(decision == stored)), "true": float(np.mean(decision == true)),
                "expected_stored": float(np.mean(np.maximum(q, 1 - q))),
                "expected_true": float(np.mean(np.maximum(p, 1 - p)))}

    return {"samples": len(samples), "label_noise": label_noise, "flipped": float(np.mean(stored != true)),
            **scores(np.array([s["posterior"] for s in samples])),
            "deciding_known": scores(np.array([s["posterior_deciding_known"] for s in samples]))}

