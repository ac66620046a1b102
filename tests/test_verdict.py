"""The verdict's arithmetic on hand-made results: paired differences, t intervals, readings, the table."""
import math

import pytest

from mgn.compare.arms import Arm
from mgn.compare.significance import paired, reading, summarize, t_interval
from mgn.compare.tables import markdown

ARMS = {name: Arm(name, f"about {name}", ()) for name in ("baseline", "guided", "tram")}


def row(arm: str, seed: int, accuracy: float, auroc: float = 0.7, setting: str = "scarce/scratch",
        **extra) -> dict:
    student = {"accuracy": accuracy, "precision": 0.5, "recall": 0.5, "f1": 0.5, "auroc": auroc,
               "pr_auc": 0.6}
    start = {"student_sha256": f"init-{seed}", "first_batch_keys": [f"k{seed}"]}
    return {"setting": setting, "arm": arm, "seed": seed, "student": student, "train_seconds": 10.0,
            "start": start,
            **extra}


def test_t_interval_matches_a_hand_computed_case():
    # diffs 1, 2, 3: mean 2, sd 1, n 3; t(0.975, 2) = 4.302653 -> half width 4.302653 / sqrt(3) = 2.484138
    low, high = t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 2.484138, abs=1e-6) and high == pytest.approx(2 + 2.484138, abs=1e-6)
    assert t_interval([1.0]) is None and t_interval([1.0, 1.0]) is None  # no reading from two seeds


def test_paired_differences_use_only_seeds_both_arms_have_and_count_wins_ties_losses():
    rows = [row("baseline", s, a) for s, a in enumerate([0.60, 0.70, 0.50, 0.65])]
    rows += [row("guided", s, a) for s, a in enumerate([0.62, 0.70, 0.45])]  # seed 3 missing: not paired
    p = paired(rows, "scarce/scratch", "guided", "accuracy")
    assert p["seeds"] == [0, 1, 2]
    assert p["diffs"] == pytest.approx([0.02, 0.0, -0.05])
    assert (p["wins"], p["ties"], p["losses"]) == (1, 1, 1)
    sd = math.sqrt(((0.02 + 0.01) ** 2 + 0.01 ** 2 + (-0.05 + 0.01) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert p["mean"] == pytest.approx(-0.01) and p["ci95"] == pytest.approx((-0.01 - half, -0.01 + half),
                                                                            abs=1e-6)
    assert p["reading"] == "no different"


def test_readings_follow_the_side_of_zero_the_whole_interval_is_on():
    assert reading((0.01, 0.05)) == "better"
    assert reading((-0.05, -0.01)) == "worse"
    assert reading((-0.01, 0.05)) == "no different"
    assert reading(None).startswith("fewer than 3 seeds")


def test_summary_table_and_finding_name_each_arm_and_the_baseline_reference():
    rows = []
    for seed in range(5):
        rows.append(row("baseline", seed, 0.60 + 0.01 * seed))
        rows.append(row("guided", seed, 0.60 + 0.01 * seed - 0.03 - 0.002 * seed,
                        teacher={"accuracy": 0.95, "auroc": 0.99},
                        reliance={"teacher_accuracy": 0.95, "swapped_caption_accuracy": 0.1,
                                  "empty_caption_accuracy": 0.5, "changed_by_swap": 0.85}))
        rows.append(row("tram", seed, 0.60 + 0.01 * seed + 0.02 + 0.001 * seed))
    summary = summarize(rows, ARMS, ["scarce/scratch"],
                        {"scarce/scratch": {"caption_only": {"accuracy": 0.8}}},
                        {"guided": {"latency_ratio": 1.01, "flops_equal": True}})
    arms = summary["settings"]["scarce/scratch"]["arms"]
    assert arms["guided"]["vs_baseline"]["accuracy"]["reading"] == "worse"
    assert arms["tram"]["vs_baseline"]["accuracy"]["reading"] == "better"
    assert "vs_baseline" not in arms["baseline"]
    assert arms["guided"]["reliance"]["swapped_caption_accuracy"]["mean"] == pytest.approx(0.1)
    table = markdown(summary, "header")
    assert "| guided | 5 |" in table and "0/0/5" in table and "5/0/0" in table
    assert "caption-only bag-of-words classifier, accuracy 0.800" in table and "| 1.01 | yes |" in table
    last = table.strip().splitlines()[-1]
    assert last.startswith("Finding:") and "better: tram" in last
    assert "guided student (paper's MGN + image-only term) is worse than the plain fine-tune" in last


def test_pairing_is_verified_seed_by_seed_and_a_mismatch_is_named():
    from mgn.compare.significance import pairing

    rows = [row(arm, seed, 0.6) for arm in ("baseline", "guided") for seed in range(3)]
    assert pairing(rows) == {"verified": True, "seeds": [0, 1, 2], "mismatches": []}
    rows[-1]["start"] = {"student_sha256": "other", "first_batch_keys": ["k2"]}
    result = pairing(rows)
    assert not result["verified"] and result["mismatches"] == ["seed 2: guided vs baseline"]


def test_the_finding_names_the_largest_gain_a_tie_leaves_possible_and_the_arms_that_reach_half_the_control():
    arms = {**ARMS, "oracle-caption": Arm("oracle-caption", "a control", (), control=True),
            "distill": Arm("distill", "about distill", ())}
    rows = []
    for seed in range(5):
        base = 0.60 + 0.01 * seed
        rows += [row("baseline", seed, base), row("oracle-caption", seed, base + 0.04 + 0.002 * seed),
                 row("guided", seed, base + (0.004 if seed % 2 else -0.004)),  # a tie
                 row("tram", seed, base + 0.03 + 0.001 * seed),  # 3 of the control's 4.4 points: over half
                 row("distill", seed, base + 0.01 + 0.001 * seed)]  # better, but under half
    summary = summarize(rows, arms, ["scarce/scratch"], {}, {})
    guided = summary["settings"]["scarce/scratch"]["arms"]["guided"]["vs_baseline"]["accuracy"]
    assert guided["reading"] == "no different"
    finding = summary["finding"]
    assert f"gains above {100 * guided['ci95'][1]:+.1f} points are ruled out" in finding
    assert "better: tram, distill" in finding
    assert "at least half of oracle-caption's gain with the interval above zero: tram." in finding
