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
        model = {**base["model"], **dict(setting.model)}
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
    """Seconds. A cell whose setting and arm already have runs in results.jsonl costs their median (training
    plus evaluation: one run slowed by a neighbour does not move it). Any other costs this project's built-in
    rates for its 2-core reference machine, scaled by the setting's pixels: training samples x epochs,
    start-up per stage, evaluation (validation and test; the guided teacher's evaluation and caption
    reliance)."""
    recorded: dict[tuple[str, str], list[float]] = {}
    for row in read_results(options.out / "results.jsonl"):
        recorded.setdefault((row["setting"], row["arm"]), []).append(row["train_seconds"]
                                                                    + row.get("eval_seconds", 0.0))
    total = 0.0
    for cell in cells:
        if (cell.setting.name, cell.arm.name) in recorded:
            total += float(np.median(recorded[cell.setting.name, cell.arm.name]))
            continue
        configs = cell.stage_configs(options.work)
        # the rates are the base image size's: a setting drawn larger costs its share more pixels
        pixels = (configs[0].model.image_size / options.base["model"]["image_size"]) ** 2
        evaluated = _samples(cell.setting.test_shards) + _samples(cell.setting.validation_shards)
        total += (pixels * samples_seen(cell, options.work) * FALLBACK_RATE[configs[0].uses_captions]
                  + STARTUP * len(configs) + pixels * EVAL_RATE * evaluated
                  + (pixels * TEACHER_EVAL_RATE * _samples(cell.setting.test_shards)
                     if any(c.uses_captions for c in configs) else 0))
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
