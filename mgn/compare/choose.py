"""`compare.py --choose section.field=V1,V2,...`: a knob chosen on the validation split, never on the test
set.

Each value (each combination, with several --choose) trains the baseline at the pilot's seeds in every chosen
setting, through the same cells, ledger and executors as the comparison (so a re-run resumes, and --slurm
works); the runs are scored on the validation split and the test set as always, but only the validation
accuracy is shown and compared. The runner changes nothing itself: pass the value it names (e.g.
--train.lr_image 0.003) to every later command, so that every arm trains with it.
"""
from __future__ import annotations

import itertools
import json
import re

import numpy as np

from mgn.compare.arms import Arm, Stage
from mgn.compare.plan import Cell, Options, Setting
from mgn.config import preset_config


def candidate_arms(baseline: Arm, choose: list[str]) -> dict[str, Arm]:
    """One baseline arm per combination of the --choose values, named by its values; values typed by the
    config."""
    knobs = []
    for spec in choose:
        key, _, values = spec.partition("=")
        section, _, name = key.partition(".")
        if not values or not name:
            raise ValueError(f"--choose {spec!r}: expected section.field=V1,V2,... (e.g. "
                             "train.lr_image=1e-3,3e-3)")
        try:
            kind = type(getattr(getattr(preset_config("compare"), section), name))
        except AttributeError:
            raise ValueError(f"--choose {spec!r}: no config field {key!r}") from None
        knobs.append([(section, name, _cast(kind, v)) for v in values.split(",")])
    arms = {}
    for combination in itertools.product(*knobs):
        overrides = json.loads(json.dumps(baseline.stages[0].overrides))
        for section, name, value in combination:
            overrides.setdefault(section, {})[name] = value
        preset_config("tiny", overrides)  # a value the config refuses fails here, before anything runs
        label = ",".join(f"{s}.{n}={v}" for s, n, v in combination)
        arms[label] = Arm("choose-" + re.sub(r"[^A-Za-z0-9._-]+", "-", label), f"the baseline with {label}",
                          (Stage(overrides),))
    return arms


def _cast(kind: type, text: str):
    if kind is bool:
        return text.lower() in ("1", "true", "yes", "on")
    return kind(text)


def choice_cells(options: Options, arms: dict[str, Arm], settings: dict[str, Setting]) -> list[Cell]:
    return [Cell(s, arm, seed, options.base) for s in settings.values() for arm in arms.values()
            for seed in range(options.pilot_seeds)]


def report(rows: list[dict], arms: dict[str, Arm], settings: dict[str, Setting]) -> tuple[str, dict]:
    """Per setting, each candidate's validation accuracy over the pilot seeds, and the best; as text and as
    JSON."""
    lines, out = ["MGN compare --choose: validation accuracy of the baseline, mean +/- SD over seeds, on "
                  "the labels its pilot reads (true labels where the stored ones are noisy by design); "
                  "the test set is not shown"], {}
    for name, setting in settings.items():
        scores = {}
        for label, arm in arms.items():
            values = [r["validation"][setting.judged_role]["accuracy"] for r in rows
                      if r["setting"] == name and r["arm"] == arm.name and "validation" in r]
            if values:
                scores[label] = {"mean": float(np.mean(values)),
                                 "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                                 "seeds": len(values)}
        best = max(scores, key=lambda k: scores[k]["mean"]) if scores else None
        labels = "true" if setting.true_labels else "stored"
        out[name] = {"candidates": scores, "best": best, "labels": labels}
        lines.append(f"  {name} ({labels} labels):")
        for label, s in scores.items():
            lines.append(f"    {label:<40} {s['mean']:.3f} +/- {100 * s['sd']:.1f} points ({s['seeds']} "
                         "seeds)"
                         + ("   <- best" if label == best else ""))
    return "\n".join(lines), out
