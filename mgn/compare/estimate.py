"""The plan as printed before anything runs, with how long the runs still to do will take.

A study takes hours on the reference machine: the user sees the plan and its duration first (and `--dry-run`
stops there). Where a setting's pilot is not complete yet, the plan shows the pilot and, as an upper bound,
the arms at --max-seeds seeds that would follow if it passes. The estimate uses the durations of the runs of
the same setting and arm already in results.jsonl, so it improves as a table fills; without any, built-in
rates of this project's machine.
"""
from __future__ import annotations

import numpy as np

from mgn.compare.arms import Arm
from mgn.compare.ledger import read_results
from mgn.compare.pilot import RULE, PilotOutcome, line
from mgn.compare.plan import (
    STANDIN_NOTE,
    STANDINS,
    Cell,
    Options,
    Setting,
    chosen_arms,
    samples_seen,
    standin_weights,
)

# MobileOne-S0, 64 px, 2 cores: s per training sample (captions or not), s per evaluated sample (student; the
# guided teacher reads the test set once more, each image encoded once for its three captions), s of start-up
# per stage
FALLBACK_RATE = {True: 0.0125, False: 0.009}
EVAL_RATE, TEACHER_EVAL_RATE, STARTUP = 0.0025, 0.0035, 20


def describe_plan(options: Options, cells: list[Cell], pending: list[Cell], settings: dict[str, Setting],
                  outcomes: dict[str, PilotOutcome], arms: dict[str, Arm]) -> str:
    base = options.base
    lines = [(f"MGN compare: {len(cells)} runs planned so far ({len(cells) - len(pending)} already in "
              f"{options.out / 'results.jsonl'}), {base['train']['epochs']} epochs per arm, base "
              f"{base['model']['image_model']} at {base['model']['image_size']} px where a setting names no "
              f"other, captions of {base['model']['seq_len']} tokens"), "  " + RULE]
    upper = []
    for name, setting in settings.items():
        mine = [c for c in cells if c.setting == setting]
        init = setting.image_pretrained or "random init"
        model = setting.model_fields(base)
        lines.append(f"  {name:<22} train {setting.train_shards} ({setting.train_samples} samples), init "
                     f"{init}; {model['image_model']} at {model['image_size']} px")
        lines.append(f"  {'':<22} pilot: {line(outcomes[name])}")
        names = chosen_arms(options, arms, setting)
        if any(c.arm.name != "baseline" for c in mine):
            seeds = max(c.seed for c in mine) + 1
            lines.append(f"  {'':<22} arms: {', '.join(names)} x {seeds} seeds")
        elif options.pilot_only:
            lines.append(f"  {'':<22} arms: not now (--pilot)")
        elif outcomes[name].passed is None:
            would = [Cell(setting, arms[a], seed,
                          options.base) for a in names for seed in range(options.max_seeds)
                     if a != "baseline" or seed >= options.pilot_seeds]
            upper += would
            lines.append(f"  {'':<22} arms after the pilot, if it passes: {', '.join(names)} x up to "
                         f"{options.max_seeds} seeds ({len(would)} runs)")
        else:
            lines.append(f"  {'':<22} arms: none (the pilot did not pass; --ignore-pilot REASON runs them "
                         "anyway)")
    if any(s.init in STANDINS for s in settings.values()):
        lines.append(f"  {STANDIN_NOTE}")
    standins = [i for i in {c.setting.init for c in pending + upper} if i in STANDINS
                and not standin_weights(options, i).exists()]
    seconds = estimate(pending, options) + sum(standin_seconds() for _ in standins)
    how = "Slurm jobs, run in parallel as the cluster allows" if options.slurm else "one after another"
    lines.append(f"  estimate: {seconds / 60:.0f} min for the {len(pending)} runs still to do"
                 f"{' and pretraining ' + ', '.join(sorted(standins)) if standins else ''} ({how})"
                 + (f"; up to {estimate(upper, options) / 60:.0f} min more for the arms of settings whose "
                    "pilot passes"
                    if upper else ""))
    return "\n".join(lines)


def estimate(cells: list[Cell], options: Options) -> float:
    """Seconds: training samples x epochs at a rate per training sample, start-up per stage, and evaluation
    (validation and test; the guided teacher's evaluation and caption reliance). Where the setting and arm
    already have runs in results.jsonl, the rate and the evaluation are their medians (one run slowed by a
    neighbour does not move them; a rate, so a change of epochs or data size still counts); elsewhere this
    project's built-in rates for its 2-core reference machine, scaled by the setting's pixels."""
    rates: dict[tuple[str, str], list[float]] = {}
    evaluations: dict[tuple[str, str], list[float]] = {}
    for row in read_results(options.out / "results.jsonl"):
        key = (row["setting"], row["arm"])
        rates.setdefault(key, []).append(row["train_seconds"] / row["train_samples_seen"])
        if "eval_seconds" in row:
            evaluations.setdefault(key, []).append(row["eval_seconds"])
    total = 0.0
    for cell in cells:
        key = (cell.setting.name, cell.arm.name)
        configs = cell.stage_configs(options.work)
        # the built-in rates are the base image size's: a setting drawn larger costs its share more pixels
        pixels = (configs[0].model.image_size / options.base["model"]["image_size"]) ** 2
        rate = (float(np.median(rates[key])) if key in rates
                else pixels * FALLBACK_RATE[configs[0].uses_captions])
        if key in evaluations:
            evaluation = float(np.median(evaluations[key]))
        else:
            test = _samples(cell.setting.test_shards)
            teacher = TEACHER_EVAL_RATE * test if any(c.uses_captions for c in configs) else 0.0
            evaluation = pixels * (EVAL_RATE * (test + _samples(cell.setting.validation_shards)) + teacher)
        total += rate * samples_seen(cell, options.work) + STARTUP * len(configs) + evaluation
    return total


def _samples(shards: str) -> int:
    """Samples of a shard pattern, from the synthetic sets' known layout or sizes.json; 1,000 when unknown."""
    from mgn.io.shard_sets import expand_shards, read_sizes

    if not shards:
        return 0
    try:
        return sum(read_sizes(expand_shards(shards)).values())
    except (OSError, ValueError):
        import braceexpand

        from mgn.compare.plan import SHARD_SIZE

        count = sum(1 for part in shards.split("::") for _ in braceexpand.braceexpand(part))
        return SHARD_SIZE * count if "*" not in shards else 1000


def standin_seconds() -> float:
    """A stand-in's pretraining: its corpus (1,500 samples) x 10 epochs at the baseline's built-in rate, plus
    writing the corpus and evaluating."""
    return 1500 * 10 * FALLBACK_RATE[False] + 60
