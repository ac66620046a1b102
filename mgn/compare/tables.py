"""The comparison's verdict as a reader sees it: table.md, summary.json and paired.png, and the table printed.

    markdown(summary, header) -> table.md: per setting, what it stands on (ceiling, pilot, whether it can
    judge,
                                 references, pairing), the verdict table, every metric, the costs; a legend,
                                 the number of comparisons and the finding
    plot(summary, path)       -> paired.png: each seed's paired accuracy difference, the mean and its interval
    write(summary, out, header)

The numbers (paired differences, intervals, tests, readings, the finding) are mgn/compare/significance.py's
`summarize`; this module only lays them out, so the statistics can be read and tested without a table or
matplotlib.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mgn.compare.significance import BASELINE, METRICS, interval_text, primary_key

NAMES = {"accuracy": "acc", "precision": "P", "recall": "R", "f1": "F1", "auroc": "AUROC", "pr_auc": "PR-AUC"}


def _accuracy(stats: dict | None) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats else "-"


def _pilot_line(pilot: dict) -> str:
    if pilot.get("accuracy") is None:
        return f"Pilot: {pilot['reason']}."
    ceiling = (f"its ceiling {pilot['ceiling']:.3f}" if pilot.get("ceiling") is not None
               else "1.0 (no ceiling known)")
    spread = f" ± {100 * pilot['sd']:.1f} points" if pilot.get("sd") is not None else ""
    text = (f"Pilot (baseline alone, seeds {pilot['seeds'][0]}-{pilot['seeds'][-1]}, validation split): "
            f"{pilot['accuracy']:.3f}{spread}, {100 * pilot['headroom']:.1f} points below "
            f"{ceiling}: {pilot['reason']}")
    if pilot.get("mde") is not None:
        text += (f". Minimum detectable effect at {pilot['seeds_to_run']} seeds: {100 * pilot['mde']:.1f} "
                 "points "
                 f"(80% power, two-sided 5%, paired SD taken as √2 × the pilot's SD)")
    return text + "."


def markdown(summary: dict, header: str) -> str:
    lines = [header, ""]
    for setting, entry in summary["settings"].items():
        lines += [f"### {setting}", *setting_lines(entry), *arm_table(entry), *metric_table(entry),
                  *group_table(entry),
                  *cost_table(entry), ""]
    lines += [LEGEND, "", comparisons_line(summary["comparisons"]), "", summary["finding"]]
    return "\n".join(lines) + "\n"


def setting_lines(entry: dict) -> list[str]:
    """What a setting's table stands on: its ceiling, pilot, whether it can judge, its references, its
    pairing."""
    refs, lines = entry["references"], []
    if entry.get("model"):
        m = entry["model"]
        h, w = m["grid"]
        lines.append(f"Image encoder {m['image_model']} at {m['image_size']} px: a {h} × {w} feature grid, "
                     f"the {h * w} cells the guided attention (and the oracle-attention box) choose among.")
    if entry.get("no_label_flipped"):
        lines.append("No stored label is flipped in this data: the caption's label is the stored one, so "
                     "`oracle-caption` would train the baseline again and is not run.")
    ceiling = entry.get("ceiling") or {}
    if ceiling.get("test"):
        c, v = ceiling["test"], ceiling.get("validation") or {}
        lines.append(f"Image-only ceiling (the Bayes rule on the generator's ground truth, {c['samples']} "
                     "test "
                     f"samples): {c['stored']:.3f} on stored labels, {c['true']:.3f} on true labels; "
                     f"{c['deciding_known']['stored']:.3f} with the deciding splat known (what a perfect "
                     "reading "
                     f"of the caption's focus would add)"
                     + (f"; validation {v['stored']:.3f}" if v else "") + ".")
    if primary_key(entry) == "accuracy_true":
        lines.append("Judged on the true labels (the stored ones are noisy by design): W/T/L, MDE, reading, "
                     "share, the seeds × test samples interval and McNemar are read on them.")
    if entry.get("pilot"):
        lines.append(_pilot_line(entry["pilot"]))
    if entry.get("ignored_pilot"):
        lines.append(f"The arms ran although the pilot did not pass: {entry['ignored_pilot']}.")
    if entry.get("can_judge") is not None:
        lines.append("**This setting can judge the other arms**: the positive control "
                     f"{entry['best_control']} beats "
                     f"the baseline (95% interval above zero)." if entry["can_judge"] else
                     "**This setting cannot judge the other arms**: no reachable positive control beats the "
                     "baseline with its 95% interval above zero, so a null result for an arm here says "
                     "nothing about it.")
    if refs.get("caption_only"):
        c = refs["caption_only"]
        lines.append(f"Reference: caption-only bag-of-words classifier, accuracy {c['accuracy']:.3f}"
                     + (f", AUROC {c['auroc']:.3f}" if "auroc" in c else "") + ".")
    if refs.get("clip"):
        c = refs["clip"]
        latency = c.get("student_latency_over_clip")
        lines.append(f"Reference: CLIP zero-shot ({c['model']}, no training), accuracy {c['accuracy']:.3f}, "
                     "AUROC "
                     f"{c['auroc']:.3f}, F1 {c['f1']:.3f}"
                     + (f"; the deployed student takes {latency:.3f}x CLIP's image-tower latency" if latency
                        else "") + ".")
    pair = entry["pairing"]
    lines.append(f"Pairing: {'verified' if pair['verified'] else 'NOT verified'} over seeds {pair['seeds']} "
                 "(per seed, every arm started from the same student weights, SHA-256, and read the same "
                 "first "
                 f"batch){'; mismatches: ' + ', '.join(pair['mismatches']) if pair['mismatches'] else ''}.")
    return lines


def arm_table(entry: dict) -> list[str]:
    """The verdict table: each arm's accuracy and its paired differences with the baseline, and their
    reading."""
    lines = ["", ("| arm | seeds | acc | acc, true labels | below ceiling | Δacc vs baseline [95% CI, seeds] "
                  "| Δacc [95% CI, seeds × test samples] | Δacc, true labels | W/T/L | McNemar p < 0.05 "
                  "for/against "
                  "| MDE | reading | share of best control's gain |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, item in entry["arms"].items():
        versus = item.get("vs_baseline", {})
        stored, samples, true = versus.get("accuracy"), versus.get("samples"), versus.get("accuracy_true")
        acc = versus.get(primary_key(entry))  # what W/T/L, MDE, reading and share are read on
        wtl = f"{acc['wins']}/{acc['ties']}/{acc['losses']}" if acc else "-"
        mcn = (f"{samples['mcnemar_for']}/{samples['mcnemar_against']} of {len(samples['seeds'])}"
               if samples else "-")
        below = f"{100 * item['headroom']:.1f}" if "headroom" in item else "-"
        mde_text = f"{100 * acc['mde']:.1f}" if acc and acc.get("mde") is not None else "-"
        share = f"{100 * item['share_of_control']:.0f}%" if "share_of_control" in item else "-"
        read = (acc["reading"] + (" †" if acc.get("bonferroni") else "")) if acc else "reference"
        name = (f"{arm} ({'control' if item.get('reachable', True) else 'bound'})" if item["control"] else
                arm)
        lines.append(f"| {name} | {len(item['seeds'])} | {_accuracy(item['student']['accuracy'])} | "
                     f"{_accuracy((item.get('student_true') or {}).get('accuracy'))} | {below} | "
                     f"{interval_text(stored)} | {interval_text(samples)} | {interval_text(true)} | {wtl} | "
                     f"{mcn} | "
                     f"{mde_text} | {read} | {share} |")
    return lines


def metric_table(entry: dict) -> list[str]:
    """Every metric of every arm, mean ± SD over seeds, and the paired AUROC difference."""
    lines = ["", "| arm | " + " | ".join(NAMES[m] for m in METRICS) + " | ΔAUROC [95% CI] |",
             "|---|" + "---|" * len(METRICS) + "---|"]
    for arm, item in entry["arms"].items():
        cells = [f"{item['student'][m]['mean']:.3f} ± {item['student'][m]['std']:.3f}" for m in METRICS]
        auroc = item.get("vs_baseline", {}).get("auroc")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {interval_text(auroc)} |")
    return lines


def group_table(entry: dict) -> list[str]:
    """Worst-group accuracy (the test set's groups: true label x badge) and where each arm's gain comes from:
    its difference with the baseline per group, on the true labels. Nothing where the runs kept no groups."""
    arms = {a: i for a, i in entry["arms"].items() if "groups" in i}
    if not arms:
        return []
    names = list(next(iter(arms.values()))["groups"])
    lines = ["", "| arm | worst group acc | Δworst group [95% CI, seeds] | "
             + " | ".join(f"Δ {g}" for g in names) + " |", "|---|---|---|" + "---|" * len(names)]
    for arm, item in arms.items():
        gains = item.get("vs_baseline", {}).get("groups", {})
        worst = item.get("vs_baseline", {}).get("worst_group")
        lines.append(f"| {arm} | {_accuracy(item['worst_group'])} | {interval_text(worst)} | "
                     + " | ".join(f"{100 * gains[g]:+.1f}" if g in gains else "-" for g in names) + " |")
    return lines


def cost_table(entry: dict) -> list[str]:
    """What the guidance relies on (the teacher with swapped and empty captions) and what each arm costs."""
    lines = ["", "| arm | teacher acc | teacher acc, swapped captions | empty captions | predictions changed "
                 "by swap"
             " | train time / baseline | deployed latency / baseline | same FLOPs |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, item in entry["arms"].items():
        rel = item.get("reliance")
        teacher = [f"{rel[k]['mean']:.3f}" for k in ("teacher_accuracy", "swapped_caption_accuracy",
                                                      "empty_caption_accuracy")] if rel else ["-"] * 3
        changed = f"{100 * rel['changed_by_swap']['mean']:.0f}%" if rel else "-"
        time_ratio = f"{item['train_time_ratio']:.2f}" if "train_time_ratio" in item else "-"
        latency = f"{item['latency_ratio']:.2f}" if "latency_ratio" in item else "-"
        flops = {True: "yes", False: "NO"}.get(item.get("flops_equal"), "-")
        lines.append(f"| {arm} | " + " | ".join(teacher) + f" | {changed} | {time_ratio} | {latency} | "
                                                           f"{flops} |")
    return lines


LEGEND = ("Columns: acc = student accuracy on the stored test labels, mean ± SD over seeds; true labels = "
          "against the "
          "generator's true labels (label noise removed); below ceiling = the image-only ceiling minus acc, "
          "in points; "
          "Δ = arm − baseline of the same seed, in points, mean [95% t interval over seeds]; seeds × test "
          "samples = "
          "the paired bootstrap over both (the test set's own sampling included); McNemar = seeds whose pair "
          "differs "
          "beyond chance on this test set (exact test, p < 0.05), in the arm's favour / against it; MDE = "
          "the "
          "smallest difference these seeds detect with 80% power from the arm's own paired SD; reading = the "
          "side of "
          "zero the whole seed interval is on (†: also at the Bonferroni level); share of best control's "
          "gain = the "
          "arm's mean Δ over the best winning reachable control's. (control) = a positive control: it trains "
          "on the generator's ground truth, which no deployed model has, the most some method could give; "
          "(bound) = a de-biasing bound no method with image, caption and label can reach, never a share's "
          "denominator.")


def comparisons_line(comparisons: dict) -> str:
    count = comparisons["count"]
    if not count:
        return "This table makes no comparison with a baseline."
    return (f"This table makes {count} comparison(s) of an arm with its baseline ({comparisons['controls']} "
            "of them "
            f"positive controls). With a 95% interval each, about {0.05 * count:.1f} of them would read "
            "'better' or "
            f"'worse' by chance alone if no arm differed; † marks readings that hold at the Bonferroni level "
            f"{comparisons['bonferroni_level']:.4f}.")


def plot(summary: dict, path: Path) -> None:
    """Per setting: each seed's paired accuracy difference (dots) and the mean with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        if not arms:  # say why the panel is empty (a failed pilot, or the baseline alone so far)
            pilot = entry.get("pilot") or {}
            why = f"pilot {pilot['reason']}" if pilot.get("passed") is False else "no arm compared yet"
            ax.text(0.5, 0.5, f"no arm ran here:\n{why}", transform=ax.transAxes, ha="center", va="center",
                    fontsize=9, wrap=True)
            ax.set_yticks([])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_xticks(range(len(arms)), [f"{a} (control)" if entry["arms"][a].get("control") else a for a,
                                         _ in arms],
                      rotation=35, ha="right", fontsize=8)
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
