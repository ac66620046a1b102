"""The comparison's bench (issue 26): the image-only ceiling, the positive controls' targets, the pilot rule, per-sample
predictions and the sample-level test, the validation split. Hand-worked cases; nothing trains."""
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mgn import synthetic
from mgn.ceiling import ceiling_of
from mgn.decode import Decoder, box_in_crop
from mgn.objectives import box_map

# --- the ceiling ----------------------------------------------------------------------------------------------

def test_the_bayes_posterior_matches_a_hand_worked_case():
    spec = synthetic.SyntheticSpec(cue_strength=0.5, decoys=1, positive_fraction=0.5)
    # mu_0 = 0.3, mu_1 = 0.7, sd 0.16: r(c) = exp(((c - 0.3)^2 - (c - 0.7)^2) / (2 * 0.16^2)) = exp((0.8 c - 0.4) / 0.0512)
    r = lambda c: math.exp((0.8 * c - 0.4) / 0.0512)  # noqa: E731
    assert synthetic.cue_likelihood_ratio(0.5, 0.5) == pytest.approx(1.0)
    assert synthetic.cue_likelihood_ratio(0.6, 0.5) == pytest.approx(r(0.6))
    # two splats, deciding one unknown: LR = mean of the two ratios; prior odds 1
    lr = (r(0.6) + r(0.3)) / 2
    assert synthetic.posterior(spec, [0.6, 0.3]) == pytest.approx(lr / (1 + lr))
    assert synthetic.posterior(spec, [0.6, 0.3], deciding_known=True) == pytest.approx(r(0.6) / (1 + r(0.6)))
    # the badge at correlation 0.5 multiplies the odds by 1.5 / 0.5 = 3 (or 1/3 without it); a prior of 0.8 by 4
    assert synthetic.posterior(spec, [0.5, 0.5], badge=True, correlation=0.5) == pytest.approx(0.75)
    assert synthetic.posterior(spec, [0.5, 0.5], badge=False, correlation=0.5) == pytest.approx(0.25)
    prior = synthetic.SyntheticSpec(positive_fraction=0.8)
    assert synthetic.posterior(prior, [0.5]) == pytest.approx(0.8)
    # a clipped cue is a point mass: at 1.0, P(N(0.7, .16) >= 1) / P(N(0.3, .16) >= 1)
    tail = lambda mu: 0.5 * math.erfc((1 - mu) / (0.16 * math.sqrt(2)))  # noqa: E731
    assert synthetic.cue_likelihood_ratio(1.0, 0.5) == pytest.approx(tail(0.7) / tail(0.3))


def test_the_ceiling_of_a_hand_worked_set_on_stored_and_true_labels():
    samples = [  # posterior of the true label, true label, stored label (the last one flipped)
        {"posterior": 0.9, "posterior_deciding_known": 0.95, "true_label": 1, "label": 1},
        {"posterior": 0.6, "posterior_deciding_known": 0.3, "true_label": 0, "label": 0},  # the rule errs
        {"posterior": 0.2, "posterior_deciding_known": 0.1, "true_label": 0, "label": 0},
        {"posterior": 0.3, "posterior_deciding_known": 0.2, "true_label": 0, "label": 1},  # flipped
    ]
    result = ceiling_of(samples, label_noise=0.1)
    assert result["true"] == pytest.approx(3 / 4) and result["stored"] == pytest.approx(2 / 4)
    assert result["flipped"] == pytest.approx(1 / 4)
    assert result["expected_true"] == pytest.approx((0.9 + 0.6 + 0.8 + 0.7) / 4)
    # stored: q = 0.1 + 0.8 p -> 0.82, 0.58, 0.26, 0.34 -> max(q, 1 - q) = 0.82, 0.58, 0.74, 0.66
    assert result["expected_stored"] == pytest.approx((0.82 + 0.58 + 0.74 + 0.66) / 4)
    assert result["deciding_known"]["true"] == 1.0 and result["deciding_known"]["stored"] == pytest.approx(3 / 4)


def test_ground_truth_adds_fields_to_the_json_and_changes_nothing_else():
    plain, full = synthetic.SyntheticSpec(image_size=64), synthetic.SyntheticSpec(image_size=64, ground_truth=True)
    for index in range(3):
        a, b = synthetic.render(plain, (index, "train")), synthetic.render(full, (index, "train"))
        assert (a.jpeg, a.label, a.caption) == (b.jpeg, b.label, b.caption)
        assert {k: v for k, v in b.meta.items() if k not in ("cues", "frame_size", "posterior")} == a.meta
        assert b.meta["cues"][0] == b.meta["cue"] and b.meta["posterior"] == synthetic.posterior(full, b.meta["cues"])
    assert "ground_truth" not in plain.to_dict()  # a default set's dataset card is as it was


# --- the controls' targets ------------------------------------------------------------------------------------

def _sample(meta: dict, size: int = 64) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 90, 90)).save(buffer, format="JPEG")
    return {"__key__": "k", "jpg": buffer.getvalue(), "txt": b"caption", "cls": b"1", "json": json.dumps(meta).encode()}


def test_oracle_targets_are_built_from_a_known_cue_box_through_the_crop():
    # the eval crop of a 64 px frame keeps the centre 56 px (offset 4): the box (4, 4)-(32, 32) is its top-left half
    decoder = Decoder(64, (0.5,) * 3, (0.5,) * 3, None, 16, train=False, ground_truth=("cue_box", "posterior"))
    key, _, _, label, truth = decoder.decode(_sample({"cue_box": [4, 4, 32, 32], "frame_size": 64, "posterior": 0.8}))
    assert truth["cue_box"] == pytest.approx([0.0, 0.0, 0.5, 0.5]) and truth["posterior"] == 0.8
    torch.testing.assert_close(box_map(torch.tensor([truth["cue_box"]]), 2, 2)[0],
                               torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    batch = decoder.collate([(key, np.zeros((64, 64, 3), np.uint8), "c", label, truth)] * 2, {}, (0, 0))
    assert batch["cue_box"].shape == (2, 4) and batch["posterior"].tolist() == pytest.approx([0.8, 0.8])
    # a flipped crop mirrors the box; a frame decoded at half scale scales it; a box outside the crop vanishes
    assert box_in_crop([0, 0, 32, 32], (0, 0, 64, 64), True) == [0.5, 0.0, 1.0, 0.5]
    assert box_in_crop([0, 0, 16, 16], (0, 0, 32, 32), False) == [0.0, 0.0, 0.5, 0.5]
    cut = box_in_crop([0, 0, 10, 10], (20, 20, 60, 60), False)
    assert cut[2] - cut[0] == 0 and box_map(torch.tensor([cut]), 2, 2).sum() == 0
    # a sample without ground truth is a bad sample, with the reason
    from mgn.decode import BadSample

    with pytest.raises(BadSample, match="ground_truth option"):
        decoder.decode(_sample({"cue_box": [4, 4, 32, 32]}))
