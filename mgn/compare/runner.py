"""`python compare.py` from start to end: plan, print the plan and its estimate, prepare, run the cells
still missing from results.jsonl, write the verdict."""
from __future__ import annotations

from mgn.compare.arms import load_arms
from mgn.compare.estimate import describe_plan
from mgn.compare.executors import run_locally, run_on_slurm
from mgn.compare.ledger import read_results
from mgn.compare.plan import Options, choose_settings, plan, settings_for
from mgn.compare.prepare import prepare
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
