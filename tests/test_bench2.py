"""The second bench (issue 36): 128 px data without the badge, reachable controls, worst-group accuracy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mgn.compare.plan import DATASETS
from mgn.compare.significance import group_accuracy, group_gains, judge, keys_digest, pack_bits


def test_the_first_benchs_data_keep_their_folders_and_the_new_sets_are_drawn_at_128_px():
    # the folder names of the committed verdict's data (its results.jsonl names them)
    assert DATASETS["clean"].folder == "clean-df3de098" and DATASETS["clean"].image_size == 64
    for name in ("plain", "noisy-pi"):
        knobs = dict(DATASETS[name].knobs)
        assert DATASETS[name].image_size == 128 and knobs["spurious_train"] == 0 == knobs["spurious_test"]
    assert dict(DATASETS["noisy-pi"].knobs)["label_noise"] == 0.3


def test_a_bound_no_method_can_reach_neither_judges_a_setting_nor_divides_a_share():
    def arm(mean, control=False, reachable=True):
        reading = "better" if mean > 0.01 else "no different"
        return {"control": control, "reachable": reachable,
                "vs_baseline": {"accuracy": {"mean": mean, "reading": reading}}}

    entry = {"arms": {"guided": arm(0.01), "oracle-attention": arm(0.0, True),
                      "oracle-teacher": arm(0.18, True, reachable=False)}}
    judge(entry)
    assert entry["can_judge"] is False and entry["best_control"] is None
    assert "share_of_control" not in entry["arms"]["guided"]
    entry["arms"]["oracle-caption"] = arm(0.04, True)
    judge(entry)
    assert entry["best_control"] == "oracle-caption"
    assert entry["arms"]["guided"]["share_of_control"] == pytest.approx(0.25)


def test_worst_group_accuracy_and_gains_by_group_come_from_the_per_sample_records():
    keys = [f"k{i}" for i in range(8)]
    groups = {"keys_sha256": keys_digest(keys), "of_sample": ["safe, badge"] * 4 + ["violent, no badge"] * 4}

    def row(seed, correct):
        return {"seed": seed, "per_sample": {"test": {"n": 8, "keys_sha256": keys_digest(keys),
                                                      "correct": pack_bits(np.array(correct, dtype=bool))}}}

    baseline = group_accuracy([row(0, [1, 1, 1, 1, 0, 0, 1, 1]), row(1, [1, 1, 1, 0, 0, 0, 0, 1])], groups)
    arm = group_accuracy([row(0, [1, 1, 0, 0, 1, 1, 1, 1]), row(1, [1, 1, 1, 0, 1, 1, 0, 1])], groups)
    assert baseline["groups"]["safe, badge"]["mean"] == pytest.approx(0.875)
    assert baseline["worst_group"]["mean"] == pytest.approx((0.5 + 0.25) / 2)
    gains = group_gains(arm["per_seed"], baseline["per_seed"])
    # the arm gains on violent frames what it loses on safe ones: both show
    assert gains["groups"]["violent, no badge"] == pytest.approx(((1 - 0.5) + (0.75 - 0.25)) / 2)
    assert gains["groups"]["safe, badge"] == pytest.approx(((0.5 - 1) + (0.75 - 0.75)) / 2)
    assert gains["worst_group"]["mean"] == pytest.approx(((0.5 - 0.5) + (0.75 - 0.25)) / 2)
    other_keys = {"keys_sha256": keys_digest(["x"] * 8), "of_sample": groups["of_sample"]}
    assert group_accuracy([row(0, [1] * 8)], other_keys) is None  # another test set: no groups read


def test_the_reachable_controls_read_the_splats_body_and_the_captions_label(tmp_path):
    from mgn.config import preset_config
    from mgn.data.loader import build_loader
    from mgn.data.writer import write_synthetic
    from mgn.model.objectives import build_objective

    write_synthetic(tmp_path, samples=64, image_size=64, seed=0, ground_truth=True, label_noise=0.3,
                    caption_info=0.5)
    metas = {}
    from mgn.io.tar import tar_samples

    for shard in tmp_path.glob("train-*.tar"):
        with open(shard, "rb") as f:
            for sample in tar_samples(f):
                metas[sample["__key__"]] = (json.loads(sample["json"]), int(sample["cls"]))
    for name in ("oracle_attention", "oracle_caption"):
        cfg = preset_config("tiny", {"objective": {"name": name}, "data": {
            "train_shards": str(tmp_path / "train-*.tar"), "test_shards": str(tmp_path / "test-*.tar"),
            "synthetic_samples": 0}})
        batch = next(iter(build_loader(cfg, "train")))
        if name == "oracle_caption":
            for key, given in zip(batch["key"], batch["caption_label"]):
                meta, stored = metas[key]
                assert given == (meta["true_label"] if meta["caption_informative"] else stored)
            assert any(meta["label_flipped"] and meta["caption_informative"] for meta, _ in metas.values())
        else:
            boxes = torch.as_tensor(batch["splat_box"])
            reach = torch.as_tensor(np.asarray(batch["cue_box"])) if "cue_box" in batch else None
            assert reach is None and boxes.shape == (len(batch["key"]), 4)
            side = (boxes[:, 2] - boxes[:, 0])[boxes[:, 2] > boxes[:, 0]]
            assert side.max() < 0.45  # the body, centre +- radius (<= 0.15 of the frame each way, cropped)
        objective = build_objective(cfg)
        inputs = {k: torch.as_tensor(np.asarray(batch[k])) for k in cfg.ground_truth_fields}
        out = objective(batch["image"], batch["label"], **inputs)
        assert torch.isfinite(out.loss)


def test_a_pilot_on_your_shards_says_how_much_spread_its_validation_size_explains():
    from mgn.compare.pilot import outcome
    from mgn.compare.plan import Options, Setting

    setting = Setting("yours", "scratch", "train.tar", "test.tar", 300)
    rows = [{"setting": "yours/scratch", "arm": "baseline", "seed": seed,
             "validation": {"samples": 100, "student": {"accuracy": accuracy}}}
            for seed, accuracy in enumerate((0.70, 0.74, 0.78, 0.72, 0.76))]
    result = outcome(rows, setting, None, Options())
    assert not result.passed and result.split_sd == pytest.approx((0.74 * 0.26 / 100) ** 0.5)
    # 4.4 points from 100 samples alone; 0.75 points would need 0.74 * 0.26 / 0.0075^2 = 3421 samples
    assert "its 100 validation samples alone can explain up to 4.4" in result.reason
    assert "pass --validation-shards holding at least 3421 samples" in result.reason


def test_the_group_table_shows_the_worst_group_and_where_each_gain_comes_from():
    from mgn.compare.tables import group_table

    stats = lambda mean: {"mean": mean, "std": 0.01, "n": 2}  # noqa: E731
    entry = {"arms": {
        "baseline": {"groups": {"safe, badge": stats(0.9), "violent, no badge": stats(0.4)},
                     "worst_group": stats(0.4)},
        "tram": {"groups": {"safe, badge": stats(0.8), "violent, no badge": stats(0.6)},
                 "worst_group": stats(0.6),
                 "vs_baseline": {"groups": {"safe, badge": -0.1, "violent, no badge": 0.2},
                                 "worst_group": {"mean": 0.2, "ci95": (0.1, 0.3), "seeds": [0, 1]}}}}}
    lines = group_table(entry)
    assert lines[1] == ("| arm | worst group acc | Δworst group [95% CI, seeds] | Δ safe, badge | "
                        "Δ violent, no badge |")
    assert lines[-1] == "| tram | 0.600 ± 0.010 | +20.0 [+10.0, +30.0] | -10.0 | +20.0 |"
    assert group_table({"arms": {"baseline": {}}}) == []  # no groups kept: no table


def test_noisy_pi_s_pilot_reads_the_true_labels_and_their_ceiling():
    from mgn.compare.pilot import outcome
    from mgn.compare.plan import Options, settings_for

    settings = settings_for(Options())
    assert settings["noisy-pi/standin"].true_labels and not settings["plain/standin"].true_labels
    rows = [{"setting": "noisy-pi/standin", "arm": "baseline", "seed": seed,
             "validation": {"samples": 1000, "student": {"accuracy": 0.55 + seed / 1000},
                            "student_true": {"accuracy": 0.70 + seed / 1000}}} for seed in range(5)]
    result = outcome(rows, settings["noisy-pi/standin"], 0.858, Options())  # the true labels' ceiling
    assert result.accuracy == pytest.approx(0.702) and result.passed


def test_a_noisy_label_setting_is_judged_on_its_true_labels():
    # noisy-pi's stored labels are 30% flips by design: an arm that sees through them loses stored-label
    # accuracy while it gains on the true labels, and the verdict must read the latter
    from mgn.compare.arms import Arm
    from mgn.compare.significance import summarize
    from mgn.compare.tables import markdown

    arms = {name: Arm(name, name, (), control=name == "oracle-caption") for name in
            ("baseline", "guided", "oracle-caption")}
    gain = {"baseline": 0.0, "guided": 0.02, "oracle-caption": 0.06}
    rows = [{"setting": "noisy-pi/imagenet", "arm": arm, "seed": seed, "train_seconds": 1.0,
             "student": {"accuracy": 0.62 - gain[arm] / 4 - 0.002 * seed * (arm != "baseline"),
                         "precision": 0.5, "recall": 0.5, "f1": 0.5, "auroc": 0.6, "pr_auc": 0.6},
             "student_true": {"accuracy": 0.78 + gain[arm] + 0.003 * seed * (arm != "baseline")}}
            for arm in arms for seed in range(5)]
    for true_labels, reading in ((True, "better"), (False, "worse")):
        summary = summarize(rows, arms, ["noisy-pi/imagenet"], {}, {},
                            {"noisy-pi/imagenet": {"true_labels": true_labels}})
        entry = summary["settings"]["noisy-pi/imagenet"]
        assert entry["arms"]["guided"]["vs_baseline"]["accuracy_true"]["reading"] == "better"
        assert entry["arms"]["guided"]["vs_baseline"]["accuracy"]["reading"] == "worse"
        assert entry["can_judge"] is true_labels
        assert f"guided student (paper's MGN + image-only term) is {reading} than" in summary["finding"]
    table = markdown(summarize(rows, arms, ["noisy-pi/imagenet"], {}, {},
                               {"noisy-pi/imagenet": {"true_labels": True}}), "header")
    assert "Judged on the true labels" in table and "on the true labels, 95% CI" in table
    guided = next(line for line in table.splitlines() if line.startswith("| guided |"))
    assert "| 5/0/0 |" in guided and "| better †" in guided and "| 39% |" in guided
