"""The comparison's verdict: paired differences with their intervals, as a table, a JSON file, a picture and a sentence.

Arms are compared with the baseline seed by seed: for seed s, d_s = metric(arm, s) - metric(baseline, s),
both runs having started from the same image encoder and head and read the same samples in the same
order. The interval is the t interval of the mean of the d_s (n - 1 degrees of freedom): with 5 seeds
it is wide, on purpose, because the seed-to-seed spread of a from-scratch fine-tune is wide. An arm is
"better" or "worse" only when its whole 95% interval lies on one side of zero; otherwise "no different",
and the interval says how large a difference the data cannot rule out. All arms share one test set, so
the intervals cover the spread over seeds, not the sampling of that test set.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

METRICS = ("accuracy", "precision", "recall", "f1", "auroc", "pr_auc")
NAMES = {"accuracy": "acc", "precision": "P", "recall": "R", "f1": "F1", "auroc": "AUROC", "pr_auc": "PR-AUC"}
BASELINE = "baseline"


MIN_SEEDS = 3  # fewer paired seeds give no reading: two equal differences would make a zero-width interval


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t interval of the mean; None with fewer than MIN_SEEDS values."""
    from scipy import stats  # noqa: PLC0415

    n = len(values)
    if n < MIN_SEEDS:
        return None
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def paired(rows: list[dict], setting: str, arm: str, metric: str, role: str = "student") -> dict | None:
    """Per-seed differences arm - baseline in one setting, over the seeds both have; None if none."""
    def by_seed(name):
        return {r["seed"]: r[role][metric] for r in rows if r["setting"] == setting and r["arm"] == name}

    ours, base = by_seed(arm), by_seed(BASELINE)
    seeds = sorted(set(ours) & set(base))
    if not seeds:
        return None
    diffs = [ours[s] - base[s] for s in seeds]
    interval = t_interval(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": float(np.mean(diffs)), "ci95": interval,
            "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
            "reading": reading(interval)}


def reading(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return f"fewer than {MIN_SEEDS} seeds: no interval"
    low, high = interval
    return "better" if low > 0 else "worse" if high < 0 else "no different"


def mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(rows: list[dict], arms: dict, settings: list[str], references: dict, costs: dict) -> dict:
    """Everything the table, the JSON file and the picture show, per setting and arm."""
    out = {"settings": {}}
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting]
        base_time = [r["train_seconds"] for r in mine if r["arm"] == BASELINE]
        entry = {"references": references.get(setting, {}), "arms": {}}
        for arm in [a for a in arms if any(r["arm"] == a for r in mine)]:
            runs = [r for r in mine if r["arm"] == arm]
            item = {"about": arms[arm].about, "seeds": sorted(r["seed"] for r in runs),
                    "student": {m: mean_std([r["student"][m] for r in runs]) for m in METRICS}}
            if all("teacher" in r for r in runs):
                item["teacher"] = {m: mean_std([r["teacher"][m] for r in runs]) for m in ("accuracy", "auroc")}
                item["reliance"] = {k: mean_std([r["reliance"][k] for r in runs])
                                    for k in ("teacher_accuracy", "swapped_caption_accuracy",
                                              "empty_caption_accuracy", "changed_by_swap")}
            if base_time:
                item["train_time_ratio"] = float(np.mean([r["train_seconds"] for r in runs]) / np.mean(base_time))
            item.update(costs.get(arm, {}))
            if arm != BASELINE:
                item["vs_baseline"] = {m: paired(rows, setting, arm, m) for m in ("accuracy", "auroc")}
            entry["arms"][arm] = item
        entry["pairing"] = pairing(mine)
        out["settings"][setting] = entry
    out["finding"] = finding(out)
    return out


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


def _interval(p: dict | None) -> str:
    if not p:
        return "-"
    if p["ci95"] is None:
        return f"{_points(p['mean'])} ({len(p['seeds'])} seed{'s' if len(p['seeds']) != 1 else ''})"
    low, high = p["ci95"]
    return f"{_points(p['mean'])} [{_points(low)}, {_points(high)}]"


def finding(summary: dict) -> str:
    """The result in words: the paper's guided arm against the baseline in each setting, and any arm that wins."""
    parts = []
    for setting, entry in summary["settings"].items():
        arms = entry["arms"]
        guided = arms.get("guided", {}).get("vs_baseline", {}).get("accuracy")
        text = f"{setting}: "
        if guided:
            relation = {"better": "better than", "worse": "worse than"}.get(guided["reading"], "no different from")
            text += (f"the guided student (paper's MGN + image-only term) is {relation} the plain fine-tune "
                     f"({_interval(guided)} accuracy points, 95% CI, {len(guided['seeds'])} paired seeds)")
        else:
            text += "no guided arm"
        readings = {a: (item.get("vs_baseline", {}).get("accuracy") or {}).get("reading")
                    for a, item in arms.items() if a not in (BASELINE, "guided")}
        if readings:
            named = {kind: ", ".join(a for a, r in readings.items() if r == kind) or "none" for kind in ("better", "worse")}
            text += f"; of {len(readings)} other arm(s), better: {named['better']}, worse: {named['worse']}"
        parts.append(text)
    return "Finding: " + "; ".join(parts) + "."


def markdown(summary: dict, header: str) -> str:
    lines = [header, ""]
    for setting, entry in summary["settings"].items():
        refs = entry["references"]
        lines.append(f"### {setting}")
        if refs.get("caption_only"):
            c = refs["caption_only"]
            lines.append(f"Reference: caption-only bag-of-words classifier, accuracy {c['accuracy']:.3f}"
                         + (f", AUROC {c['auroc']:.3f}" if "auroc" in c else "") + ".")
        if refs.get("clip"):
            c = refs["clip"]
            latency = c.get("student_latency_over_clip")
            lines.append(f"Reference: CLIP zero-shot ({c['model']}, no training), accuracy {c['accuracy']:.3f}, AUROC "
                         f"{c['auroc']:.3f}, F1 {c['f1']:.3f}"
                         + (f"; the deployed student takes {latency:.3f}x CLIP's image-tower latency" if latency
                            else "") + ".")
        pair = entry["pairing"]
        lines.append(f"Pairing: {'verified' if pair['verified'] else 'NOT verified'} over seeds {pair['seeds']} "
                     f"(per seed, every arm started from the same student weights, SHA-256, and read the same first "
                     f"batch){'; mismatches: ' + ', '.join(pair['mismatches']) if pair['mismatches'] else ''}.")
        lines += ["", "| arm | seeds | " + " | ".join(NAMES[m] for m in METRICS)
                  + " | Δacc vs baseline [95% CI] | ΔAUROC [95% CI] | W/T/L | reading |",
                  "|---|---|" + "---|" * len(METRICS) + "---|---|---|---|"]
        for arm, item in entry["arms"].items():
            cells = [f"{item['student'][m]['mean']:.3f} ± {item['student'][m]['std']:.3f}" for m in METRICS]
            versus = item.get("vs_baseline", {})
            acc, auroc = versus.get("accuracy"), versus.get("auroc")
            wtl = f"{acc['wins']}/{acc['ties']}/{acc['losses']}" if acc else "-"
            lines.append(f"| {arm} | {len(item['seeds'])} | " + " | ".join(cells)
                         + f" | {_interval(acc)} | {_interval(auroc)} | {wtl} | {acc['reading'] if acc else 'reference'} |")
        lines += ["", "| arm | teacher acc | teacher acc, swapped captions | empty captions | predictions changed by swap"
                  " | train time / baseline | deployed latency / baseline | same FLOPs |", "|---|---|---|---|---|---|---|---|"]
        for arm, item in entry["arms"].items():
            rel = item.get("reliance")
            teacher = [f"{rel[k]['mean']:.3f}" for k in ("teacher_accuracy", "swapped_caption_accuracy",
                                                          "empty_caption_accuracy")] if rel else ["-"] * 3
            changed = f"{100 * rel['changed_by_swap']['mean']:.0f}%" if rel else "-"
            time_ratio = f"{item['train_time_ratio']:.2f}" if "train_time_ratio" in item else "-"
            latency = f"{item['latency_ratio']:.2f}" if "latency_ratio" in item else "-"
            flops = {True: "yes", False: "NO"}.get(item.get("flops_equal"), "-")
            lines.append(f"| {arm} | " + " | ".join(teacher) + f" | {changed} | {time_ratio} | {latency} | {flops} |")
        lines.append("")
    lines.append(summary["finding"])
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Per setting: each seed's paired accuracy difference (dots) and the mean with its 95% interval."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    settings = list(summary["settings"].items())
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings) + 1, 4.2), squeeze=False, dpi=120)
    for ax, (setting, entry) in zip(axes[0], settings):
        arms = [(a, i["vs_baseline"]["accuracy"]) for a, i in entry["arms"].items()
                if a != BASELINE and i.get("vs_baseline", {}).get("accuracy")]
        for x, (arm, p) in enumerate(arms):
            colour = {"better": "tab:green", "worse": "tab:red"}.get(p["reading"], "tab:grey")
            jitter = np.linspace(-0.12, 0.12, len(p["diffs"]))
            ax.scatter(x + jitter, 100 * np.array(p["diffs"]), s=14, color=colour, alpha=0.6, zorder=3)
            if p["ci95"]:
                low, high = p["ci95"]
                ax.errorbar(x, 100 * p["mean"], yerr=[[100 * (p["mean"] - low)], [100 * (high - p["mean"])]],
                            fmt="D", color="black", capsize=5, markersize=5, zorder=4)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_xticks(range(len(arms)), [a for a, _ in arms], rotation=35, ha="right", fontsize=8)
        ax.set_title(setting, fontsize=10)
        ax.set_ylabel("student accuracy − baseline (points)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("paired by seed: dots = seeds, diamond = mean with 95% t interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(summary: dict, out: Path, header: str) -> dict:
    """table.md, summary.json and paired.png in `out`; the table and the finding are printed too."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(summary, header)
    (out / "table.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "paired.png")
    print(f"MGN compare: wrote {out / 'table.md'}, {out / 'summary.json'}, {out / 'paired.png'}")
    print(table, end="")  # its last line is the finding
    return summary
