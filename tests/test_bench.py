"""The comparison's bench (issue 26): the image-only ceiling, the positive controls' targets, the pilot rule,
per-sample predictions and the sample-level test, the validation split. Hand-worked cases; nothing trains."""
import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mgn.io import synthetic
from mgn.eval.ceiling import ceiling_of
from mgn.data.decode import Decoder, box_in_crop
from mgn.model.objectives import box_map

# --- the ceiling
# ----------------------------------------------------------------------------------------------

def test_the_bayes_posterior_matches_a_hand_worked_case():
    spec = synthetic.SyntheticSpec(cue_strength=0.5, decoys=1, positive_fraction=0.5)
    # mu_0 = 0.3, mu_1 = 0.7, sd 0.16:
    # r(c) = exp(((c - 0.3)^2 - (c - 0.7)^2) / (2 * 0.16^2)) = exp((0.8 c - 0.4) / 0.0512)
    r = lambda c: math.exp((0.8 * c - 0.4) / 0.0512)  # noqa: E731
    assert synthetic.cue_likelihood_ratio(0.5, 0.5) == pytest.approx(1.0)
    assert synthetic.cue_likelihood_ratio(0.6, 0.5) == pytest.approx(r(0.6))
    # two splats, deciding one unknown: LR = mean of the two ratios; prior odds 1
    lr = (r(0.6) + r(0.3)) / 2
    assert synthetic.posterior(spec, [0.6, 0.3]) == pytest.approx(lr / (1 + lr))
    assert synthetic.posterior(spec, [0.6, 0.3], deciding_known=True) == pytest.approx(r(0.6) / (1 + r(0.6)))
    # the badge at correlation 0.5 multiplies the odds by 1.5 / 0.5 = 3 (or 1/3 without it); a prior of 0.8 by
    # 4
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
    assert (result["deciding_known"]["true"] == 1.0
            and result["deciding_known"]["stored"] == pytest.approx(3 / 4))


def test_ground_truth_adds_fields_to_the_json_and_changes_nothing_else():
    plain, full = synthetic.SyntheticSpec(image_size=64), synthetic.SyntheticSpec(image_size=64,
                                                                                  ground_truth=True)
    for index in range(3):
        a, b = synthetic.render(plain, (index, "train")), synthetic.render(full, (index, "train"))
        assert (a.jpeg, a.label, a.caption) == (b.jpeg, b.label, b.caption)
        added = ("cues", "frame_size", "posterior", "splat_box")
        assert {k: v for k, v in b.meta.items() if k not in added} == a.meta
        assert b.meta["cues"][0] == b.meta["cue"] and b.meta["posterior"] == synthetic.posterior(full,
                                                                                                 b.meta["cues"])
    assert "ground_truth" not in plain.to_dict()  # a default set's dataset card is as it was


# --- the controls' targets
# ------------------------------------------------------------------------------------

def _sample(meta: dict, size: int = 64) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 90, 90)).save(buffer, format="JPEG")
    return {"__key__": "k", "jpg": buffer.getvalue(), "txt": b"caption", "cls": b"1",
            "json": json.dumps(meta).encode()}


def test_oracle_targets_are_built_from_a_known_cue_box_through_the_crop():
    # the eval crop of a 64 px frame keeps the centre 56 px (offset 4): the box (4, 4)-(32, 32) is its
    # top-left half
    decoder = Decoder(64, (0.5,) * 3, (0.5,) * 3, None, 16, train=False, ground_truth=("cue_box",
                                                                                       "posterior"))
    key, _, _, label, truth = decoder.decode(_sample({"cue_box": [4, 4, 32, 32], "frame_size": 64,
                                                      "posterior": 0.8}))
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
    from mgn.data.decode import BadSample

    with pytest.raises(BadSample, match="ground_truth option"):
        decoder.decode(_sample({"cue_box": [4, 4, 32, 32]}))


# --- the pilot rule and seeds from power
# ------------------------------------------------------------------------

def _pilot_ledger(tmp_path, accuracies: dict[str, list[float]], ceilings: dict[str, float]):
    """A fake results.jsonl of pilot baselines (their real keys and fingerprints) and the ceilings prepare()
    would have written: no data, no training."""
    from mgn.compare.arms import load_arms
    from mgn.compare.ledger import append_result
    from mgn.compare.plan import Cell, Options, choose_settings, settings_for

    options = Options(work=tmp_path / "work", out=tmp_path / "out", settings=list(accuracies))
    settings = choose_settings(settings_for(options), options.settings)
    baseline = load_arms()["baseline"]
    for name, values in accuracies.items():
        folder = tmp_path / "work" / "data" / settings[name].train_shards.split("/")[-2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ceiling.json").write_text(json.dumps({"validation": {"stored": ceilings[name]},
                                                         "test": None}))
        for seed, accuracy in enumerate(values):
            cell = Cell(settings[name], baseline, seed, options.base)
            append_result(options.out / "results.jsonl", {
                "key": cell.key, "fingerprint": cell.fingerprint(options.work), "setting": name,
                "arm": "baseline",
                "seed": seed, "validation": {"student": {"accuracy": accuracy}}, "train_seconds": 100.0,
                "train_samples_seen": 15000})
    return options, settings


def test_a_setting_that_fails_the_pilot_runs_no_other_arm(tmp_path, capsys):
    from mgn.compare import pilot
    from mgn.compare.arms import load_arms
    from mgn.compare.plan import plan
    from mgn.compare.ledger import read_results
    from mgn.compare.runner import pilot_outcomes, run

    # 5.8 points below 0.86, SD 0.57: passes
    accuracies = {"clean/standin": [0.800, 0.810, 0.805, 0.795, 0.800],
                  "noisy/standin": [0.840, 0.845, 0.850, 0.835, 0.840],  # 1.8 points below: fails on headroom
                  "decoys/standin": [0.70, 0.74, 0.72, 0.68, 0.76]}  # SD 3.2 points: fails on spread
    options, settings = _pilot_ledger(tmp_path, accuracies, {"clean/standin": 0.858, "noisy/standin": 0.86,
                                                               "decoys/standin": 0.80})
    outcomes = pilot_outcomes(options, settings, read_results(options.out / "results.jsonl"))
    assert [outcomes[n].passed for n in accuracies] == [True, False, False]
    assert outcomes["clean/standin"].headroom == pytest.approx(0.858 - 0.802)
    assert "only 1.8 points below the ceiling" in outcomes["noisy/standin"].reason
    assert "SD 3.2 points" in outcomes["decoys/standin"].reason
    go = pilot.decide(outcomes, options)
    cells = plan(options, load_arms(), settings, go)
    arms_by_setting = {n: {c.arm.name for c in cells if c.setting.name == n} for n in accuracies}
    # no stored label is flipped in clean: oracle-caption would train the baseline again
    assert arms_by_setting["clean/standin"] == {"baseline", "guided", "oracle-attention", "oracle-teacher"}
    assert arms_by_setting["noisy/standin"] == arms_by_setting["decoys/standin"] == {"baseline"}
    # seeds from power: the pilot's SD x sqrt(2) as the paired SD, the fewest seeds whose MDE is at most 1.5
    # points
    clean = outcomes["clean/standin"]
    assert clean.paired_sd == pytest.approx(math.sqrt(2) * np.std(accuracies["clean/standin"], ddof=1))
    assert go["clean/standin"] == clean.seeds_to_run == pilot.seeds_for(clean.paired_sd, 5, 10)
    assert clean.mde <= 0.015
    # the dry run prints the rule and each outcome; the failing settings say they run no arm
    assert run(dataclasses.replace(options, dry_run=True)) == {}
    printed = capsys.readouterr().out
    assert pilot.RULE in printed and printed.count("arms: none (the pilot did not pass") == 2
    arms = "baseline, guided, oracle-attention, oracle-teacher"
    assert f"arms: {arms} x {clean.seeds_to_run} seeds" in printed
    # --ignore-pilot REASON runs them anyway, and says why
    forced = dataclasses.replace(options, ignore_pilot="to see the controls fail")
    assert set(pilot.decide(outcomes, forced)) == set(accuracies)
    assert "runs its arms anyway: --ignore-pilot 'to see the controls fail'" in pilot.describe(outcomes,
                                                                                               forced)


def test_the_estimate_takes_the_medians_of_the_setting_and_arms_recorded_runs(tmp_path):
    from mgn.compare.arms import load_arms
    from mgn.compare.estimate import STARTUP, estimate
    from mgn.compare.ledger import append_result, read_results
    from mgn.compare.plan import Cell, samples_seen

    options, settings = _pilot_ledger(tmp_path, {"clean/standin": [0.8] * 3, "noisy/standin": [0.8]},
                                      {"clean/standin": 0.86, "noisy/standin": 0.86})
    ledger = options.out / "results.jsonl"
    for row, seconds in zip(read_results(ledger)[:3], (100.0, 900.0, 120.0)):  # one run slowed by a neighbour
        append_result(ledger, {**row, "key": row["key"] + "-timed", "train_seconds": seconds,
                               "eval_seconds": 30.0})
    clean = Cell(settings["clean/standin"], load_arms()["baseline"], 7, options.base)
    # rates: the median of 100, 100, 100 (the pilot rows), 100, 120, 900 s for 15,000 samples seen; the
    # evaluation: the median of the rows that timed it
    seen = samples_seen(clean, options.work)
    assert estimate([clean], options) == pytest.approx(100.0 / 15000 * seen + STARTUP + 30.0)
    longer = dataclasses.replace(options, base={**options.base,
                                                "train": {**options.base["train"], "epochs": 40}})
    clean_longer = Cell(settings["clean/standin"], load_arms()["baseline"], 7, longer.base)
    assert samples_seen(clean_longer, options.work) == 4 * seen  # 40 epochs instead of 10: a rate follows
    assert estimate([clean_longer], longer) == pytest.approx(100.0 / 15000 * 4 * seen + STARTUP + 30.0)
    guided = Cell(settings["clean/standin"], load_arms()["guided"], 0, options.base)
    assert estimate([guided], options) > estimate([clean], options)  # no guided run yet: the built-in rates


def test_the_table_names_each_settings_feature_grid(tmp_path):
    from mgn.compare.arms import load_arms
    from mgn.compare.ledger import read_results
    from mgn.compare.runner import bench, pilot_outcomes
    from mgn.compare.significance import summarize
    from mgn.compare.tables import markdown

    options, settings = _pilot_ledger(tmp_path, {"clean/standin": [0.80, 0.81, 0.79]},
                                      {"clean/standin": 0.86})
    rows = read_results(options.out / "results.jsonl")
    for row in rows:  # what the runs record beside the validation score
        row["student"] = {m: 0.8 for m in ("accuracy", "precision", "recall", "f1", "auroc", "pr_auc")}
    info = bench(options, settings, pilot_outcomes(options, settings, rows))
    assert info["clean/standin"]["model"] == {"image_model": "mobileone_s0", "image_size": 64, "grid": [2, 2]}
    table = markdown(summarize(rows, load_arms(), ["clean/standin"], {}, {}, bench=info), "header")
    assert "Image encoder mobileone_s0 at 64 px: a 2 × 2 feature grid, the 4 cells" in table
    assert "`oracle-caption` would train the baseline again and is not run" in table  # clean: none flipped


def test_seeds_from_power_follow_the_noncentral_t():
    from mgn.compare.pilot import seeds_for
    from mgn.compare.significance import mde

    # the textbook effect sizes of a paired t test, 80% power, two-sided 5%: d = 1.68 at n = 5, 0.996 at n =
    # 10
    assert mde(1.0, 5) == pytest.approx(1.682, abs=0.002) and mde(1.0, 10) == pytest.approx(0.996, abs=0.002)
    assert seeds_for(0.008, 5, 10) == 5  # MDE 1.35 points at 5 seeds
    assert seeds_for(0.012, 5, 10) == next(n for n in range(5, 11) if mde(0.012, n) <= 0.015)
    assert seeds_for(0.03, 5, 10) == 10  # unreachable: the most seeds allowed


# --- per-sample predictions and the test over samples
# ------------------------------------------------------------

def test_per_sample_predictions_are_written_and_recorded_in_key_order(tmp_path):
    from mgn.compare.cell import write_predictions
    from mgn.eval.predictions import Predictions
    from mgn.compare.significance import sample_record, unpack_bits

    keys, labels = ["b", "a", "c"], np.array([1, 0, 1])
    probs = np.array([[0.2, 0.8], [0.3, 0.7], [0.9, 0.1]])  # predicts 1, 1, 0: right, wrong, wrong
    true = np.array([1, 1, 0])  # against the true labels: right, right, right
    record = sample_record(keys, labels, probs, true)
    assert record["n"] == 3 and unpack_bits(record["correct"], 3).tolist() == [False, True, False]  # a, b, c
    assert unpack_bits(record["correct_true"], 3).tolist() == [True, True, True]
    write_predictions(tmp_path / "p.jsonl", Predictions(keys=keys, labels=labels, student=probs), true)
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(x["key"], x["label"], x["true_label"]) for x in lines] == [("b", 1, 1), ("a", 0, 1), ("c", 1, 0)]
    assert lines[0]["log_probs"] == pytest.approx([math.log(0.2), math.log(0.8)], abs=1e-6)


def test_the_sample_level_test_against_a_hand_computed_case():
    from mgn.compare.significance import bootstrap_means, mcnemar, pack_bits, sample_level

    # McNemar, exact: 8 samples only the arm got right, 2 only the baseline: p = 2 P(X <= 2 | 10, 1/2) = 112 /
    # 1024
    assert mcnemar(8, 2) == pytest.approx(112 / 1024) and mcnemar(2, 8) == mcnemar(8, 2)
    assert mcnemar(0, 0) == 1.0 and mcnemar(10, 0) == pytest.approx(2 / 1024)

    def row(arm, seed, bits):
        record = {"n": len(bits), "keys_sha256": "same", "correct": pack_bits(np.array(bits, dtype=bool))}
        return {"setting": "s", "arm": arm, "seed": seed, "per_sample": {"test": record}}

    base = [1, 1, 0, 0, 1, 0, 1, 0, 0, 0]
    arm0 = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # seed 0: +6 samples, -0: diff 0.6
    arm1 = [0, 1, 0, 0, 1, 0, 1, 0, 0, 1]  # seed 1: +1, -1: diff 0
    rows = [row("baseline", 0, base), row("baseline", 1, base), row("x", 0, arm0), row("x", 1, arm1)]
    result = sample_level(rows, "s", "x")
    assert result["mean"] == pytest.approx(0.3) and result["samples"] == 10
    assert [(m["arm_only"], m["baseline_only"]) for m in result["mcnemar"]] == [(6, 0), (1, 1)]
    assert result["mcnemar"][0]["p"] == pytest.approx(2 / 64) and result["mcnemar_for"] == 1
    low, high = result["ci95"]
    assert low < 0.3 < high and result["reading"] == ("better" if low > 0 else "no different")
    # the bootstrap is centred on the observed difference (each replicate's expectation is the mean of D)
    diffs = np.array([np.array(arm0) - base, np.array(arm1) - base], dtype=np.int8)
    assert bootstrap_means(diffs, 4000).mean() == pytest.approx(0.3, abs=0.02)
    # a constant difference has nothing to resample: the interval is that difference exactly
    assert set(np.round(bootstrap_means(np.full((3, 5), 1, dtype=np.int8), 50), 12)) == {1.0}
    # runs on other samples (another key digest) are not compared
    rows[2]["per_sample"]["test"]["keys_sha256"] = "other"
    assert sample_level(rows, "s", "x")["seeds"] == [1]


# --- the validation split
# ---------------------------------------------------------------------------------------

def test_the_validation_split_is_disjoint_from_train_and_test(tmp_path):
    from mgn.eval.ceiling import ceiling
    from mgn.compare.plan import DataSet, synthetic_shards
    from mgn.compare.prepare import prepare_data
    from mgn.io.shard_sets import expand_shards
    from mgn.io.tar import tar_samples

    data = DataSet("t", 200, 100, 200, (("decoys", 1), ("label_noise", 0.1), ("spurious_train", 0.9)))
    prepare_data(data, tmp_path)
    keys = {}
    for split, pattern in synthetic_shards(tmp_path, data).items():
        keys[split] = []
        for shard in expand_shards(pattern):
            with open(shard, "rb") as f:
                keys[split] += [s["__key__"] for s in tar_samples(f)]
    assert {k: len(v) for k, v in keys.items()} == {"train": 200, "validation": 100, "test": 200}
    assert (not set(keys["validation"]) & set(keys["train"])
            and not set(keys["validation"]) & set(keys["test"]))
    assert not set(keys["train"]) & set(keys["test"])
    written = json.loads((tmp_path / "ceiling.json").read_text())
    assert written["test"] == ceiling(synthetic_shards(tmp_path,
                                                       data)["test"]) and written["test"]["samples"] == 200
    assert 0.5 < written["validation"]["true"] <= 1 and written["validation"]["label_noise"] == 0.1


def test_a_knob_is_chosen_on_the_validation_split_only():
    from mgn.compare.arms import load_arms
    from mgn.compare.choose import candidate_arms, report
    from mgn.compare.plan import Setting

    arms = candidate_arms(load_arms()["baseline"], ["train.lr_image=1e-3,3e-3", "train.epochs=10,15"])
    assert list(arms) == ["train.lr_image=0.001,train.epochs=10", "train.lr_image=0.001,train.epochs=15",
                          "train.lr_image=0.003,train.epochs=10", "train.lr_image=0.003,train.epochs=15"]
    first = arms["train.lr_image=0.001,train.epochs=10"]
    assert first.name == "choose-train.lr_image-0.001-train.epochs-10"
    assert first.stages[0].overrides == {"objective": {"name": "baseline"}, "train": {"lr_image": 0.001,
                                                                                      "epochs": 10}}
    with pytest.raises(ValueError, match="no config field 'train.lr'"):
        candidate_arms(load_arms()["baseline"], ["train.lr=1"])
    settings = {"clean/standin": Setting("clean", "standin", "t", "x", 1)}
    rows = [{"setting": "clean/standin", "arm": arms[label].name, "seed": seed,
             # the test: never read
             "validation": {"student": {"accuracy": accuracy}}, "student": {"accuracy": 0.99}}
            for label, values in (("train.lr_image=0.001,train.epochs=10", (0.80, 0.82)),
                                  ("train.lr_image=0.003,train.epochs=15", (0.84, 0.84)))
            for seed, accuracy in enumerate(values)]
    text, result = report(rows, arms, settings)
    assert result["clean/standin"]["best"] == "train.lr_image=0.003,train.epochs=15"
    assert (result["clean/standin"]["candidates"]["train.lr_image=0.001,train.epochs=10"]["mean"]
            == pytest.approx(0.81))
    assert "0.990" not in text and "<- best" in text


def test_a_knob_for_a_noisy_label_setting_is_chosen_on_its_true_validation_labels():
    # noisy-pi's stored labels are the noise the captions should see through; its pilot reads the true labels,
    # and a knob chosen on the stored ones would reward fitting the noise
    from mgn.compare.arms import load_arms
    from mgn.compare.choose import candidate_arms, report
    from mgn.compare.plan import Setting

    arms = candidate_arms(load_arms()["baseline"], ["train.epochs=3,10"])
    settings = {"noisy-pi/imagenet": Setting("noisy-pi", "imagenet", "t", "x", 1, synthetic=True)}
    rows = [{"setting": "noisy-pi/imagenet", "arm": arms[label].name, "seed": seed,
             "validation": {"student": {"accuracy": stored}, "student_true": {"accuracy": true}}}
            for label, stored, true in (("train.epochs=3", 0.60, 0.85), ("train.epochs=10", 0.65, 0.78))
            for seed in range(2)]
    text, result = report(rows, arms, settings)
    assert result["noisy-pi/imagenet"]["best"] == "train.epochs=3"
    assert result["noisy-pi/imagenet"]["labels"] == "true" and "(true labels)" in text
