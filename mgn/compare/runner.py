"""`python compare.py` from start to end: plan, print the plan and its estimate, prepare, run the cells
still missing from results.jsonl, write the verdict."""
from __future__ import annotations

from mgn.captions import check_comparison
from mgn.compare.arms import load_arms
from mgn.compare.estimate import describe_plan
from mgn.compare.executors import run_locally, run_on_slurm
from mgn.compare.ledger import read_results
from mgn.compare.plan import Cell, Options, choose_settings, plan, settings_for
from mgn.compare.prepare import prepare, prepare_data
from mgn.compare.report import write_verdict


def run(options: Options) -> dict:
    """Plan, estimate, run the missing cells, write the verdict. Returns the summary."""
    arms = load_arms(options.arms_file)
    settings = choose_settings(settings_for(options), options.settings)
    cells = plan(options, arms, settings)
    results_file = options.out / "results.jsonl"
    done = {(r["key"], r["fingerprint"]) for r in read_results(results_file)}
    pending = [c for c in cells if (c.key, c.fingerprint(options.work)) not in done]
    print(describe_plan(options, cells, pending, settings), flush=True)
    check_captions(cells, options)
    if options.dry_run:
        return {}
    prepare(pending, options)
    if pending:
        if options.slurm:
            run_on_slurm(pending, options, results_file)
        else:
            run_locally(pending, options, results_file)
    wanted = {(c.key, c.fingerprint(options.work)) for c in cells}
    rows = [r for r in read_results(results_file) if (r["key"], r["fingerprint"]) in wanted]
    return write_verdict(options, arms, settings, rows)


def check_captions(cells: list[Cell], options: Options) -> None:
    """Before anything trains: count the captions the guided arms will read (the synthetic shards are written
    first; a dry run counts them only once they exist) and refuse if too many are cut (mgn/captions.py)."""
    guided = {}
    for cell in cells:
        for cfg in cell.stage_configs(options.work):
            if cfg.uses_captions:
                key = (cfg.data.train_shards, cfg.data.test_shards, cfg.model.text_model, cfg.model.seq_len)
                guided.setdefault(key, (cell.setting.name, cfg))
    if guided and not options.train_shards and not options.dry_run:
        prepare_data(options)
    try:
        lines = check_comparison(dict(guided.values()), options.allow_truncated_captions)
    except FileNotFoundError:
        if not options.dry_run:
            raise
        lines = ["MGN compare: captions: counted once the synthetic shards are written (the run does it first)"]
    print("\n".join(lines), flush=True)
