"""The plan as printed before anything runs, with how long the runs still to do will take.

A table of 45 runs takes an hour and a half on the reference machine: the user sees the plan and its
duration first (and `--dry-run` stops there). The estimate uses the rates measured by the runs already in
results.jsonl, so it improves as a table fills; without any, a built-in rate of this project's machine.
"""
from __future__ import annotations

from mgn.compare.ledger import read_results
from mgn.compare.plan import STANDIN_NOTE, Cell, Options, Setting, samples_seen, standin_config, standin_weights

FALLBACK_RATE = {True: 0.0125, False: 0.009}  # s per training sample, captions or not: MobileOne-S0, 64 px, 2 cores


def describe_plan(options: Options, cells: list[Cell], pending: list[Cell], settings: dict[str, Setting]) -> str:
    base = options.base
    lines = [f"MGN compare: {len(cells)} runs ({len(cells) - len(pending)} already in "
             f"{options.out / 'results.jsonl'}), "
             f"{options.seeds} paired seeds, {base['train']['epochs']} epochs per arm, "
             f"{base['model']['image_model']} at {base['model']['image_size']} px"]
    for setting in settings.values():
        names = sorted({c.arm.name for c in cells if c.setting == setting})
        init = setting.image_pretrained or "random init"
        lines.append(f"  {setting.name:<22} train {setting.train_shards}  init {init}  arms {', '.join(names)}")
    if any(s.init == "standin" for s in settings.values()):
        lines.append(f"  {STANDIN_NOTE}")
    if pending:
        standin = any(s.init == "standin" for s in settings.values()) and not standin_weights(options).exists()
        seconds = estimate(pending, options) + (standin_seconds(options) if standin else 0)
        how = "Slurm jobs, run in parallel as the cluster allows" if options.slurm else "one after another"
        lines.append(f"  estimate: {seconds / 60:.0f} min for the {len(pending)} runs still to do"
                     f"{' and the stand-in pretraining' if standin else ''} ({how})")
    return "\n".join(lines)


def estimate(cells: list[Cell], options: Options) -> float:
    """Seconds: training samples x epochs at the rate measured in results.jsonl (or a built-in rate for this
    project's 2-core reference machine), plus a per-run overhead; guided arms cost more per sample."""
    per_sample = {}
    for row in read_results(options.out / "results.jsonl"):
        per_sample.setdefault(row["arm"], []).append(row["train_seconds"] / row["train_samples_seen"])
    total = 0.0
    for cell in cells:
        configs = cell.stage_configs(options.work)
        rate = per_sample.get(cell.arm.name)
        total += (samples_seen(cell, options.work) * (sum(rate) / len(rate) if rate else
                                                       FALLBACK_RATE[configs[0].uses_captions]) + 20 * len(configs))
    return total


def standin_seconds(options: Options) -> float:
    """The stand-in's pretraining: its corpus x epochs at the baseline's built-in rate, plus writing the corpus."""
    return options.plentiful * standin_config(options).train.epochs * FALLBACK_RATE[False] + 60
