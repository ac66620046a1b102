"""The comparison runner: does caption guidance give a better image-only student than plain fine-tuning?

    arms.py       the arms: named config overrides, data in arms.toml (+ --arms-file); positive controls
    marked plan.py       settings (synthetic data set x initialisation of the image encoder) x arms x seeds ->
    cells pilot.py      the pilot rule (headroom to the ceiling, spread over seeds) and seeds from power
    estimate.py   the plan as printed, and how long its missing runs will take prepare.py    the synthetic
    shards with their ground truth and ceilings, the stand-in pretrained encoders cell.py       one cell:
    train the arm's stages through mgn.train.loop.run, score the final student once on the
                  test set and on the validation set (per-sample predictions kept); the child process
                  (`python -m mgn.compare`, __main__.py) and the Slurm job (CellJob)
    executors.py  the cells run locally one after another, or as Slurm jobs side by side
    ledger.py     results.jsonl: one line per finished cell
    report.py     the verdict (mgn/compare/significance.py) with its references and the deployed students'
    costs runner.py     run(options): everything `python compare.py` does: the pilot, then the arms where it
    passes

A cell is one (setting, arm, seed). For a seed, every arm starts from the same image encoder and head
(mgn/model/objectives.py builds the student first) and reads the same samples in the same order (the loader
is seeded by train.seed alone), so arms are compared pairwise, seed by seed (mgn/compare/significance.py).
Locally, cells run one after another, each in a fresh `python -m mgn.compare --run-cell` process with a
fixed thread count; with --slurm each cell is an ordinary multi-GPU training job submitted with submitit.
Every finished cell is appended to results.jsonl at once; a re-run skips the cells found there (same
config fingerprint), so an interrupted table resumes where it stopped.
"""
from mgn.compare.arms import Arm, Stage, load_arms
from mgn.compare.cell import CellJob, run_cell, set_aside_if_stale
from mgn.compare.ledger import append_result, read_results
from mgn.compare.plan import Cell, DataSet, Options, Setting, choose_settings, plan, settings_for
from mgn.compare.report import clip_metrics
from mgn.compare.runner import run

__all__ = ["Arm", "Cell", "CellJob", "DataSet", "Options", "Setting", "Stage", "append_result",
           "choose_settings",
           "clip_metrics", "load_arms", "plan", "read_results", "run", "run_cell", "set_aside_if_stale",
           "settings_for"]
