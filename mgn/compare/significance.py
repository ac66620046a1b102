"""The comparison's verdict in numbers: paired differences with their intervals, the tests, readings and a
sentence.

`summarize` computes everything the verdict shows; mgn/compare/tables.py lays it out as a table, a JSON file
and a picture.

Arms are compared with the baseline seed by seed: for seed s, d_s = metric(arm, s) - metric(baseline, s),
both runs having started from the same image encoder and head and read the same samples in the same
order. The interval is the t interval of the mean of the d_s (n - 1 degrees of freedom): with 5 seeds
it is wide, on purpose, because the seed-to-seed spread of a from-scratch fine-tune is wide. An arm is
"better" or "worse" only when its whole 95% interval lies on one side of zero; otherwise "no different",
and the interval says how large a difference the data cannot rule out. All arms share one test set, so
these intervals cover the spread over seeds, not the sampling of that test set.

The test over samples as well as seeds: each run records which test samples its student got right
(sample_record: a bit per sample, in key order). For an arm and the baseline, a paired bootstrap resamples the
seeds and, within a replicate, one shared draw of the test samples (the same samples for every seed and both
arms: the design is seeds crossed with samples), and takes the 2.5 and 97.5 percentiles of the mean difference
(sample_level); per seed pair an exact McNemar test on the samples only one of the two got right says where
the difference on this very test set is beyond chance. The table says how many comparisons it makes: with a
95% interval each, about one in twenty comparisons of arms that do not differ reads "better" or "worse" by
chance; readings that hold at the Bonferroni level (0.05 / comparisons) are marked.

Positive controls (arms that train on the synthetic generator's ground truth) show whether a setting can
detect a transfer of privileged information at all: a setting "can judge" the other arms only where a control
is better than the baseline (its whole interval above zero); elsewhere a null result says nothing about the
method. Each arm's gain is also given as a share of the best control's.
"""
from __future__ import annotations

import base64
import hashlib
import math

import numpy as np

METRICS = ("accuracy", "precision", "recall", "f1", "auroc", "pr_auc")
BASELINE = "baseline"


MIN_SEEDS = 3  # fewer paired seeds give no reading: two equal differences would make a zero-width interval
BOOTSTRAP = 2000  # replicates of the sample-level bootstrap


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t interval of the mean; None with fewer than MIN_SEEDS values."""
    from scipy import stats

    n = len(values)
    if n < MIN_SEEDS:
        return None
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def t_test_p(values: list[float]) -> float | None:
    """Two-sided p of the one-sample t test of mean 0 (None with fewer than MIN_SEEDS values)."""
    from scipy import stats

    if len(values) < MIN_SEEDS:
        return None
    sd = float(np.std(values, ddof=1))
    if sd == 0:
        return 1.0 if float(np.mean(values)) == 0 else 0.0
    t = float(np.mean(values)) / (sd / math.sqrt(len(values)))
    return float(2 * stats.t.sf(abs(t), len(values) - 1))


def mde(paired_sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect: the smallest mean paired difference a two-sided paired t test at level
    `alpha` detects with `power` over n seeds whose differences have SD `paired_sd` (noncentral t)."""
    from scipy import optimize, stats

    if n < 2:
        return math.inf
    if paired_sd <= 0:
        return 0.0
    df, crit = n - 1, float(stats.t.ppf(1 - alpha / 2, n - 1))

    def shortfall(nc: float) -> float:
        achieved = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
        # NaN only far out in the tail, where power ~ 1
        return (1.0 if math.isnan(achieved) else achieved) - power

    return float(optimize.brentq(shortfall, 0.0, 60.0)) * paired_sd / math.sqrt(n)


def paired(rows: list[dict], setting: str, arm: str, metric: str, role: str = "student") -> dict | None:
    """Per-seed differences arm - baseline in one setting, over the seeds both have; None if none."""
    def by_seed(name):
        return {r["seed"]: r[role][metric] for r in rows
                if r["setting"] == setting and r["arm"] == name and metric in r.get(role, {})}

    ours, base = by_seed(arm), by_seed(BASELINE)
    seeds = sorted(set(ours) & set(base))
    if not seeds:
        return None
    diffs = [ours[s] - base[s] for s in seeds]
    interval = t_interval(diffs)
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    return {"seeds": seeds, "diffs": diffs, "mean": float(np.mean(diffs)), "ci95": interval,
            "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs),
            "reading": reading(interval), "p": t_test_p(diffs), "sd": sd,
            "mde": mde(sd, len(diffs)) if sd is not None and len(diffs) >= MIN_SEEDS else None}


# --- the test over samples and seeds ------------------------------------------------------------------------

def sample_record(keys: list[str], labels: np.ndarray, probabilities: np.ndarray,
                  true: np.ndarray | None) -> dict:
    """What results.jsonl keeps of a run's predictions on a split: which samples it got right, one bit per
    sample in key order (base64 of packed bits), on the stored labels and, when known, the true ones; and a
    digest of the keys, so that two runs are compared only on the same samples."""
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    predicted = np.asarray(probabilities).argmax(1)
    record = {"n": len(keys), "keys_sha256": keys_digest(sorted(keys)),
              "correct": pack_bits((predicted == np.asarray(labels))[order])}
    if true is not None:
        record["correct_true"] = pack_bits((predicted == np.asarray(true))[order])
    return record


def keys_digest(sorted_keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted_keys).encode()).hexdigest()[:16]


def pack_bits(bits: np.ndarray) -> str:
    return base64.b64encode(np.packbits(np.asarray(bits, dtype=bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p: of the b + c samples only one of two models got right, b went to the first;
    under no difference b ~ Binomial(b + c, 1/2)."""
    from scipy import stats

    if b + c == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5)))


def sample_level(rows: list[dict], setting: str, arm: str, split: str = "test", field: str = "correct",
                 replicates: int = BOOTSTRAP, seed: int = 0) -> dict | None:
    """Arm - baseline accuracy over test samples and seeds: the paired bootstrap's 95% interval, and per seed
    pair the McNemar counts and p. None where the runs kept no per-sample record (or on different samples)."""
    def bits(name):
        out = {}
        for r in rows:
            record = r.get("per_sample", {}).get(split)
            if r["setting"] == setting and r["arm"] == name and record and field in record:
                out[r["seed"]] = (record["keys_sha256"], unpack_bits(record[field], record["n"]))
        return out

    ours, base = bits(arm), bits(BASELINE)
    seeds = sorted(s for s in set(ours) & set(base) if ours[s][0] == base[s][0])
    if not seeds:
        return None
    # [seeds, samples]
    diffs = np.stack([ours[s][1].astype(np.int8) - base[s][1].astype(np.int8) for s in seeds])
    per_seed = []
    for s, row in zip(seeds, diffs):
        b, c = int((row == 1).sum()), int((row == -1).sum())
        per_seed.append({"seed": s, "arm_only": b, "baseline_only": c, "p": mcnemar(b, c)})
    estimates = bootstrap_means(diffs, replicates, seed)
    low, high = (float(v) for v in np.percentile(estimates, [2.5, 97.5]))
    return {"seeds": seeds, "samples": diffs.shape[1], "mean": float(diffs.mean()), "ci95": (low, high),
            "reading": reading((low, high)), "mcnemar": per_seed,
            "mcnemar_for": sum(p["p"] < 0.05 and p["arm_only"] > p["baseline_only"] for p in per_seed),
            "mcnemar_against": sum(p["p"] < 0.05 and p["arm_only"] < p["baseline_only"] for p in per_seed)}


def bootstrap_means(diffs: np.ndarray, replicates: int, seed: int = 0) -> np.ndarray:
    """[replicates] means of `diffs` [seeds, samples] under resampling of its seeds and, shared by all seeds
    of a replicate, of its samples (multinomial counts: each replicate is w^T D v / (seeds x samples))."""
    rng = np.random.default_rng(seed)
    n_seeds, n_samples = diffs.shape
    out = np.empty(replicates)
    for start in range(0, replicates, 250):  # bounded memory: 250 x samples counts at a time
        count = min(250, replicates - start)
        w = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=count).astype(np.float32)
        v = rng.multinomial(n_samples, np.full(n_samples, 1 / n_samples), size=count).astype(np.float32)
        out[start:start + count] = ((w @ diffs.astype(np.float32)) * v).sum(axis=1) / (n_seeds * n_samples)
    return out


def reading(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return f"fewer than {MIN_SEEDS} seeds: no interval"
    low, high = interval
    return "better" if low > 0 else "worse" if high < 0 else "no different"


def mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(rows: list[dict], arms: dict, settings: list[str], references: dict, costs: dict,
              bench: dict | None = None) -> dict:
    """Everything the table, the JSON file and the picture show, per setting and arm. `bench`, per setting:
    "ceiling" ({"test": ..., "validation": ...}, mgn/eval/ceiling.py), "pilot" (its outcome),
    "ignored_pilot" (the reason the arms ran although the pilot failed) and "true_labels" (the setting is
    judged on the true labels: its stored ones are noise by design, so every reading, share and test of the
    verdict is on the true ones; `primary` names the key of vs_baseline they use)."""
    bench = bench or {}
    out = {"settings": {}}
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting]
        base_time = [r["train_seconds"] for r in mine if r["arm"] == BASELINE]
        info = bench.get(setting, {})
        entry = {"references": references.get(setting, {}), "arms": {}, "model": info.get("model"),
                 "no_label_flipped": info.get("no_label_flipped"),
                 "ceiling": info.get("ceiling"),
                 "pilot": info.get("pilot"), "ignored_pilot": info.get("ignored_pilot"),
                 "primary": "accuracy_true" if info.get("true_labels") else "accuracy"}
        test_ceiling = (entry["ceiling"] or {}).get("test")
        per_group: dict[str, dict] = {}  # arm -> seed -> group -> accuracy
        for arm in [a for a in arms if any(r["arm"] == a for r in mine)]:
            runs = [r for r in mine if r["arm"] == arm]
            item = {"about": arms[arm].about, "control": getattr(arms[arm], "control", False),
                    "reachable": getattr(arms[arm], "reachable", True),
                    "seeds": sorted(r["seed"] for r in runs),
                    "student": {m: mean_std([r["student"][m] for r in runs]) for m in METRICS}}
            if all("student_true" in r for r in runs):
                item["student_true"] = {"accuracy": mean_std([r["student_true"]["accuracy"] for r in runs])}
            if test_ceiling:
                item["headroom"] = test_ceiling["stored"] - item["student"]["accuracy"]["mean"]
                if "student_true" in item:
                    item["headroom_true"] = test_ceiling["true"] - item["student_true"]["accuracy"]["mean"]
            if all("teacher" in r for r in runs):
                item["teacher"] = {m: mean_std([r["teacher"][m] for r in runs]) for m in ("accuracy",
                                                                                          "auroc")}
                item["reliance"] = {k: mean_std([r["reliance"][k] for r in runs])
                                    for k in ("teacher_accuracy", "swapped_caption_accuracy",
                                              "empty_caption_accuracy", "changed_by_swap")}
            if base_time:
                item["train_time_ratio"] = float(np.mean([r["train_seconds"] for r in runs])
                                                 / np.mean(base_time))
            item.update(costs.get(arm, {}))
            if arm != BASELINE:
                item["vs_baseline"] = {m: paired(rows, setting, arm, m) for m in ("accuracy", "auroc")}
                item["vs_baseline"]["accuracy_true"] = paired(rows, setting, arm, "accuracy",
                                                              role="student_true")
                item["vs_baseline"]["samples"] = sample_level(
                    rows, setting, arm, field="correct_true" if info.get("true_labels") else "correct")
            groups = group_accuracy(runs, info.get("groups"))
            if groups:
                item["groups"], item["worst_group"] = groups["groups"], groups["worst_group"]
                per_group[arm] = groups["per_seed"]
            entry["arms"][arm] = item
        if BASELINE in per_group:
            for arm, seeds in per_group.items():
                if arm != BASELINE:
                    entry["arms"][arm]["vs_baseline"].update(group_gains(seeds, per_group[BASELINE]))
        judge(entry)
        entry["pairing"] = pairing(mine)
        out["settings"][setting] = entry
    count_comparisons(out)
    out["finding"] = finding(out)
    return out


def group_accuracy(runs: list[dict], groups: dict | None) -> dict | None:
    """Accuracy per group of the test set (true label x badge: `groups` from mgn/compare/prepare.read_groups),
    on the true labels (the stored ones where no true ones were kept): per seed, and as mean and SD over
    seeds, with the worst group's (each seed's lowest group). None without groups or per-sample records."""
    if not groups:
        return None
    names = np.array(groups["of_sample"])
    per_seed = {}
    for r in runs:
        record = (r.get("per_sample") or {}).get("test")
        if not record or record["keys_sha256"] != groups["keys_sha256"]:
            return None
        bits = unpack_bits(record.get("correct_true", record["correct"]), record["n"])
        per_seed[r["seed"]] = {g: float(bits[names == g].mean()) for g in sorted(set(names))}
    if not per_seed:
        return None
    first = next(iter(per_seed.values()))
    return {"groups": {g: mean_std([acc[g] for acc in per_seed.values()]) for g in first},
            "worst_group": mean_std([min(acc.values()) for acc in per_seed.values()]), "per_seed": per_seed}


def group_gains(arm: dict, baseline: dict) -> dict:
    """Arm - baseline per group and for the worst group, over the seeds both have: where a gain comes from
    (a gain on one group bought with a loss on another reads as such)."""
    seeds = sorted(set(arm) & set(baseline))
    if not seeds:
        return {}
    gains = {g: float(np.mean([arm[s][g] - baseline[s][g] for s in seeds])) for g in arm[seeds[0]]}
    worst = [min(arm[s].values()) - min(baseline[s].values()) for s in seeds]
    interval = t_interval(worst)
    return {"groups": gains, "worst_group": {"mean": float(np.mean(worst)), "ci95": interval,
                                             "reading": reading(interval), "seeds": seeds}}


def judge(entry: dict) -> None:
    """Whether the setting can judge the other arms: a reachable positive control better than the baseline
    (its whole 95% interval over seeds above zero); and each other arm's mean gain as a share of the best such
    control's. A bound no method can reach (oracle-teacher: the test posterior) is shown, judges nothing."""
    primary = primary_key(entry)
    controls = {a: (i.get("vs_baseline", {}).get(primary) or {}) for a,
                i in entry["arms"].items() if i["control"] and i.get("reachable", True)}
    winners = {a: p["mean"] for a, p in controls.items() if p.get("reading") == "better"}
    entry["controls"] = sorted(controls)
    entry["can_judge"] = bool(winners) if controls else None
    entry["best_control"] = max(winners, key=winners.get) if winners else None
    if winners:
        best = winners[entry["best_control"]]
        for item in entry["arms"].values():
            acc = (item.get("vs_baseline") or {}).get(primary)
            if acc and not item["control"]:
                item["share_of_control"] = acc["mean"] / best


def primary_key(entry: dict) -> str:
    """The key of vs_baseline that a setting's verdict reads: accuracy, or accuracy_true where the stored
    labels are noisy by design (summaries written before it existed read accuracy)."""
    return entry.get("primary", "accuracy")


def count_comparisons(summary: dict) -> None:
    """How many arm-vs-baseline accuracy comparisons the table makes (controls included), and which readings
    hold at the Bonferroni level 0.05 / that count (the seeds' paired t test)."""
    tested = [item["vs_baseline"][primary_key(entry)] for entry in summary["settings"].values()
              for item in entry["arms"].values() if (item.get("vs_baseline") or {}).get(primary_key(entry))]
    count = len(tested)
    summary["comparisons"] = {"count": count, "controls": sum(
        1 for entry in summary["settings"].values() for a, item in entry["arms"].items()
        if item["control"] and (item.get("vs_baseline") or {}).get(primary_key(entry))),
        "bonferroni_level": 0.05 / count if count else None}
    for p in tested:
        p["bonferroni"] = p.get("p") is not None and p["p"] <= 0.05 / count and p["reading"] != "no different"


def pairing(rows: list[dict]) -> dict:
    """Whether, seed by seed, every arm started from the same student and read the same first batch
    (each run's start.json, written by the trainer)."""
    starts, mismatches = {}, []
    for r in sorted(rows, key=lambda r: (r["seed"], r["arm"] != BASELINE)):
        if "start" not in r:
            continue
        first = starts.setdefault(r["seed"], (r["arm"], r["start"]))
        if r["start"] != first[1]:
            mismatches.append(f"seed {r['seed']}: {r['arm']} vs {first[0]}")
    return {"verified": bool(starts) and not mismatches, "seeds": sorted(starts), "mismatches": mismatches}


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def interval_text(p: dict | None) -> str:
    """A paired difference in points: its mean and 95% interval, or its mean and seed count without one."""
    if not p:
        return "-"
    if p["ci95"] is None:
        return f"{_points(p['mean'])} ({len(p['seeds'])} seed{'s' if len(p['seeds']) != 1 else ''})"
    low, high = p["ci95"]
    return f"{_points(p['mean'])} [{_points(low)}, {_points(high)}]"


def finding(summary: dict) -> str:
    """The result in words: per setting whether it can judge (a control wins), the paper's guided arm against
    the baseline (a tie with the largest gain its interval leaves possible: "no different" is not "no gain"),
    any other arm that wins or loses, and, where a reachable control wins, which arms reach the aim worth
    reporting: at least half the control's gain with the interval above zero."""
    parts = []
    for setting, entry in summary["settings"].items():
        arms, primary = entry["arms"], primary_key(entry)
        guided = arms.get("guided", {}).get("vs_baseline", {}).get(primary)
        text = f"{setting}"
        if entry.get("can_judge") is not None:
            text += (f" (can judge: {entry['best_control']} beats the baseline)" if entry["can_judge"] else
                     " (CANNOT judge: no positive control beats the baseline, so a null result here says "
                     "nothing)")
        text += ": "
        if guided:
            relation = {"better": "better than", "worse": "worse than"}.get(guided["reading"],
                                                                            "no different from")
            text += (f"the guided student (paper's MGN + image-only term) is {relation} the plain fine-tune "
                     f"({interval_text(guided)} accuracy points"
                     f"{' on the true labels' if primary == 'accuracy_true' else ''}, 95% CI, "
                     f"{len(guided['seeds'])} paired seeds"
                     + (f"; gains above {_points(guided['ci95'][1])} points are ruled out"
                        if guided["reading"] == "no different" else "") + ")")
        elif len(arms) <= 1 and (entry.get("pilot") or {}).get("reason"):
            text += f"the baseline alone (pilot: {entry['pilot']['reason']})"
        else:
            text += "no guided arm"
        readings = {a: (item.get("vs_baseline", {}).get(primary) or {}).get("reading")
                    for a, item in arms.items() if a not in (BASELINE, "guided") and not item["control"]}
        if readings:
            named = {kind: ", ".join(a for a, r in readings.items() if r == kind) or "none"
                     for kind in ("better", "worse")}
            text += f"; of {len(readings)} other arm(s), better: {named['better']}, worse: {named['worse']}"
        if entry.get("can_judge"):
            aim = [a for a, item in arms.items()
                   if not item["control"] and item.get("share_of_control", 0) >= 0.5
                   and (item.get("vs_baseline", {}).get(primary) or {}).get("reading") == "better"]
            text += (f"; at least half of {entry['best_control']}'s gain with the interval above zero: "
                     f"{', '.join(aim) or 'no arm'}")
        parts.append(text)
    return "Finding: " + "; ".join(parts) + "."
