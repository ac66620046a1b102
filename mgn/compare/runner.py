"""`python compare.py` from start to end: plan, print the plan and its estimate, prepare, run the pilot,
decide which settings run the arms (mgn/compare/pilot.py), run them, write the verdict. Cells already in
results.jsonl are never run again."""
from __future__ import annotations

import json
from pathlib import Path

from mgn.data.captions import check_comparison
from mgn.compare import choose, pilot
from mgn.compare.arms import load_arms
from mgn.compare.estimate import describe_plan, estimate
from mgn.compare.executors import run_locally, run_on_slurm
from mgn.compare.ledger import read_results
from mgn.compare.plan import (
    Cell,
    Options,
    Setting,
    choose_settings,
    chosen_arms,
    pilot_cells,
    plan,
    settings_for,
)
from mgn.compare.prepare import prepare, read_ceilings, read_groups
from mgn.compare.report import write_verdict
from mgn.config import ModelConfig
from mgn.model.networks import grid_size


def run(options: Options) -> dict:
    """Plan, estimate, run the missing cells (the pilot first), write the verdict. Returns the summary."""
    if options.base["train"]["eval_every"] != -1:
        raise ValueError("the comparison scores the test set once per run, after training: "
                         "--train.eval_every must "
                         "stay -1 (evaluations during training would look at the test set)")
    arms = load_arms(options.arms_file)
    settings = choose_settings(settings_for(options), options.settings)
    if options.choose:
        return run_choice(options, arms, settings)
    for setting in settings.values():
        # unknown arms, or controls on a user's data, fail before anything runs
        chosen_arms(options, arms, setting)
    results_file = options.out / "results.jsonl"
    outcomes = pilot_outcomes(options, settings, read_results(results_file))
    cells = plan(options, arms, settings, {} if options.pilot_only else pilot.decide(outcomes, options))
    print(describe_plan(options, cells, missing(cells, options, results_file), settings, outcomes, arms),
          flush=True)
    check_captions(arms, settings, options)
    if options.dry_run:
        return {}
    prepare([], settings, options)  # the data and its ceilings: the pilot rule needs them
    execute(missing(pilot_cells(options, arms, settings), options, results_file), settings, options,
            results_file)
    outcomes = pilot_outcomes(options, settings, read_results(results_file))
    print(pilot.describe(outcomes, options), flush=True)
    if not options.pilot_only:
        cells = plan(options, arms, settings, pilot.decide(outcomes, options))
        pending = missing(cells, options, results_file)
        if pending:
            print(f"MGN compare: {len(pending)} runs of the arms in the settings that run them, about "
                  f"{estimate(pending, options) / 60:.0f} min", flush=True)
        execute(pending, settings, options, results_file)
    rows = read_results(results_file)  # read once: the table and its pilot line tell of the same rows
    wanted = {(c.key, c.fingerprint(options.work)) for c in cells}
    planned = [r for r in rows if (r["key"], r["fingerprint"]) in wanted]
    return write_verdict(options, arms, settings, planned, bench(options, settings,
                                                                 pilot_outcomes(options, settings, rows)))


def run_choice(options: Options, arms: dict, settings: dict[str, Setting]) -> dict:
    """--choose: the baseline with each candidate value at the pilot's seeds, compared on the validation split
    (mgn/compare/choose.py); written to <out>/choices.json."""
    candidates = choose.candidate_arms(arms["baseline"], options.choose)
    cells = choose.choice_cells(options, candidates, settings)
    pending = missing(cells, options, options.out / "results.jsonl")
    print(f"MGN compare --choose: {len(candidates)} candidate(s) x {len(settings)} setting(s) x "
          f"{options.pilot_seeds} "
          f"seeds = {len(cells)} runs of the baseline ({len(cells) - len(pending)} already in "
          f"{options.out / 'results.jsonl'}); about {estimate(pending, options) / 60:.0f} min", flush=True)
    if options.dry_run:
        return {}
    prepare([], settings, options)
    execute(pending, settings, options, options.out / "results.jsonl")
    wanted = {(c.key, c.fingerprint(options.work)) for c in cells}
    rows = [r for r in read_results(options.out / "results.jsonl") if (r["key"], r["fingerprint"]) in wanted]
    text, result = choose.report(rows, candidates, settings)
    print(text, flush=True)
    (options.out / "choices.json").write_text(json.dumps({"command": options.command, **result},
                                                         indent=2) + "\n")
    return result


def missing(cells: list[Cell], options: Options, results_file: Path) -> list[Cell]:
    done = {(r["key"], r["fingerprint"]) for r in read_results(results_file)}
    return [c for c in cells if (c.key, c.fingerprint(options.work)) not in done]


def execute(pending: list[Cell], settings: dict[str, Setting], options: Options, results_file: Path) -> None:
    if not pending:
        return
    prepare(pending, settings, options)
    if options.slurm:
        run_on_slurm(pending, options, results_file)
    else:
        run_locally(pending, options, results_file)


def pilot_outcomes(options: Options, settings: dict[str, Setting],
                   results: list[dict]) -> dict[str, pilot.PilotOutcome]:
    """Each setting's pilot from `results` (results.jsonl's rows; only those of this very plan count: same
    cell, same fingerprint)."""
    baseline = load_arms(options.arms_file)["baseline"]
    cells = [Cell(s, baseline, seed,
                  options.base) for s in settings.values() for seed in range(options.pilot_seeds)]
    wanted = {(cell.key, cell.fingerprint(options.work)) for cell in cells}
    rows = [r for r in results if (r["key"], r["fingerprint"]) in wanted]
    ceilings = read_ceilings(settings)
    return {name: pilot.outcome(rows, s, _validation_ceiling(ceilings.get(name), s.true_labels), options)
            for name, s in settings.items()}


def _validation_ceiling(ceilings: dict | None, true_labels: bool = False) -> float | None:
    return ((ceilings or {}).get("validation") or {}).get("true" if true_labels else "stored")


def bench(options: Options, settings: dict[str, Setting], outcomes: dict[str, pilot.PilotOutcome]) -> dict:
    """What the verdict shows beside the arms, per setting: the image encoder and its feature grid (the cells
    the guided attention chooses among), the ceilings, the test set's groups (worst-group accuracy), the
    pilot, and why arms ran where the pilot did not pass."""
    ceilings, groups = read_ceilings(settings), read_groups(settings)
    return {name: {"model": encoder_grid(options, setting),
                   "no_label_flipped": setting.no_label_flipped,
                   "ceiling": ceilings.get(name), "groups": groups.get(name),
                   "true_labels": setting.true_labels, "pilot": outcomes[name].to_dict(),
                   "ignored_pilot": options.ignore_pilot if options.ignore_pilot and not outcomes[name].passed
                   and outcomes[name].seeds_to_run else None}
            for name, setting in settings.items()}


def encoder_grid(options: Options, setting: Setting) -> dict:
    """The setting's image encoder, image size and feature grid (h, w): computed on the meta device, no
    weights."""
    model = ModelConfig(**setting.model_fields(options.base))
    return {"image_model": model.image_model, "image_size": model.image_size, "grid": list(grid_size(model))}


def check_captions(arms: dict, settings: dict[str, Setting], options: Options) -> None:
    """Before anything trains: count the captions every arm that reads them would read, in every setting (the
    synthetic shards are written first; a dry run counts them only once they exist), and refuse if too many
    are cut (mgn/data/captions.py)."""
    guided = {}
    for setting in settings.values():
        for name in chosen_arms(options, arms, setting):
            for cfg in Cell(setting, arms[name], 0, options.base).stage_configs(options.work):
                if cfg.uses_captions:
                    key = (cfg.data.train_shards, cfg.data.test_shards, cfg.model.text_model,
                           cfg.model.seq_len)
                    guided.setdefault(key, (setting.name, cfg))
    if guided and not options.dry_run:
        prepare([], settings, options)
    try:
        lines = check_comparison(dict(guided.values()), options.allow_truncated_captions)
    except FileNotFoundError:
        if not options.dry_run:
            raise
        lines = ["MGN compare: captions: counted once the synthetic shards are written (the run does it "
                 "first)"]
    print("\n".join(lines), flush=True)
