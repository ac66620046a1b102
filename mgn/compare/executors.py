"""Where the cells run: one after another in local child processes, or side by side as Slurm jobs.

Either way a finished cell's row is appended to results.jsonl as soon as it arrives, and a failed cell is
reported and skipped, not fatal: the others are kept, and the same command again retries only the
failures. On Slurm the submitted jobs are recorded too (submitted.jsonl), so a runner started again
re-attaches to jobs still queued or running instead of submitting them twice.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import submitit

from mgn.compare.cell import REPO, CellJob, cell_spec, spawn_cell
from mgn.compare.ledger import append_result, read_results
from mgn.compare.plan import Cell, Options, samples_seen

SLURM_FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                       "DEADLINE")


def run_locally(pending: list[Cell], options: Options, results_file: Path) -> None:
    """The cells one after another, each in a fresh child process (cell.spawn_cell) with its log beside it."""
    failures = collect(_local_outcomes(pending, options), len(pending), options.work, results_file)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed ({', '.join(failures[:5])}); their logs are in "
                           f"{options.work / 'cells'}; the others are saved: "
                           "re-run the same command to retry")


def _local_outcomes(pending: list[Cell], options: Options) -> Iterator[tuple[Cell, dict | None, str]]:
    for cell in pending:
        spec = cell_spec(cell, options.work)
        # appended, not with_suffix: a key may hold dots (choose-train.lr_image-0.001/seed0)
        spec_file, result_file, log_file = (options.work / "cells" / (cell.key.replace("/", "-") + suffix)
                                            for suffix in (".json", ".result.json", ".log"))
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(spec))
        result_file.unlink(missing_ok=True)
        try:
            spawn_cell(spec_file, result_file, log_file, options.threads)
            row = json.loads(result_file.read_text())
        except (RuntimeError, OSError, ValueError) as error:
            yield cell, None, f": {error}"
            continue
        yield cell, row, ""


def run_on_slurm(pending: list[Cell], options: Options, results_file: Path) -> None:
    """One submitit job per cell (every stage and the evaluation inside it); rows appended as jobs finish."""
    jobs = _submit_or_reattach(pending, options)
    failures = collect(_slurm_outcomes(jobs), len(jobs), options.work, results_file)
    if failures:
        raise RuntimeError(f"{len(failures)} Slurm job(s) failed: {', '.join(failures[:5])}; their logs are "
                           "under "
                           f"{options.work / 'slurm'}; re-run the same command to retry them")


def _submit_or_reattach(pending: list[Cell], options: Options) -> dict[submitit.Job, Cell]:
    ledger = options.work / "slurm" / "submitted.jsonl"  # a runner started again re-attaches to its jobs
    submitted = {(r["key"], r["fingerprint"]): r for r in read_results(ledger)}
    jobs, attached = {}, 0
    for cell in pending:
        spec = cell_spec(cell, options.work)
        record = submitted.get((cell.key, spec["fingerprint"]))
        if record:
            job = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"],
                                    tasks=tuple(range(record["tasks"])))
            if worth_reattaching(job):
                jobs[job] = cell
                attached += 1
                continue
        job = slurm_executor(options, cell).submit(CellJob(spec))
        parameters = slurm_parameters(options, cell)
        append_result(ledger, {"key": cell.key, "fingerprint": spec["fingerprint"], "job_id": job.job_id,
                               "folder": str(job.paths.folder),
                               "tasks": parameters["nodes"] * parameters["tasks_per_node"]})
        jobs[job] = cell
    print(f"MGN compare: {len(jobs) - attached} Slurm jobs submitted, {attached} already queued or done "
          "re-attached "
          f"({', '.join(j.job_id for j in list(jobs)[:5])}{'...' if len(jobs) > 5 else ''})", flush=True)
    return jobs


def worth_reattaching(job: submitit.Job, patience_s: float = 30.0) -> bool:
    """Whether a job submitted by an earlier runner is queued, running, or done with its results on disk.

    sacct answers nothing for a job it has not recorded yet (slurmdbd lags a submission by seconds) or has
    purged long after it ended; submitit reads that as UNKNOWN, which is not a failure. It is asked again
    for up to `patience_s`; a job still unknown then counts only if every task left a successful result.
    """
    deadline = time.monotonic() + patience_s
    state = job.watcher.get_state(job.job_id, mode="force")
    while state == "UNKNOWN" and time.monotonic() < deadline:
        time.sleep(2)
        state = job.watcher.get_state(job.job_id, mode="force")
    if state == "UNKNOWN":
        return job.done() and job.exception() is None
    return state.split()[0] not in SLURM_FAILED_STATES  # sacct writes "CANCELLED by <uid>"


def _slurm_outcomes(jobs: dict[submitit.Job, Cell]) -> Iterator[tuple[Cell, dict | None, str]]:
    for job in submitit.helpers.as_completed(list(jobs)):
        try:
            row = next(r for r in job.results() if r)
        except Exception as error:  # a failed job is reported, the others continue
            yield jobs[job], None, f" (job {job.job_id}): {error}"
            continue
        yield jobs[job], row, ""


def collect(outcomes: Iterable[tuple[Cell, dict | None, str]], total: int, work: Path,
            results_file: Path) -> list[str]:
    """The one loop of both executors: append each finished cell's row to results_file as it arrives and print
    a progress line; a failed cell (row None; `failure` is what its line says after FAILED) is printed and
    skipped. Returns the keys of the failed cells."""
    started, failures = time.perf_counter(), []
    for number, (cell, row, failure) in enumerate(outcomes, 1):
        if row is None:
            failures.append(cell.key)
            print(f"MGN compare: [{number}/{total}] {cell.key} FAILED{failure}", flush=True)
            continue
        row["train_samples_seen"] = samples_seen(cell, work)
        append_result(results_file, row)
        print(progress_line(number, total, row, time.perf_counter() - started), flush=True)
    return failures


def progress_line(number: int, total: int, row: dict, elapsed: float) -> str:
    teacher = f", teacher {row['teacher']['accuracy']:.3f}" if "teacher" in row else ""
    left = elapsed / number * (total - number)
    # what a run is judged on as it finishes is its validation score; the test set's waits for the table
    scored = row["validation"]["student"] if "validation" in row else row["student"]
    which = "validation acc" if "validation" in row else "student acc"
    return (f"MGN compare: [{number}/{total}] {row['key']}: {which} {scored['accuracy']:.3f} "
            f"AUROC {scored['auroc']:.3f}{teacher} | train {row['train_seconds']:.0f} s | "
            f"elapsed {elapsed / 60:.1f} min, about {left / 60:.0f} min left")


def slurm_executor(options: Options, cell: Cell) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=options.work / "slurm" / cell.key.replace("/", "-"))
    executor.update_parameters(**slurm_parameters(options, cell))
    return executor


def slurm_parameters(options: Options, cell: Cell) -> dict:
    """submitit's parameters of the cell's job: `nodes` x one task per GPU, each task a rank.

    srun gets --cpus-per-task explicitly: since Slurm 22.05 a step does not inherit it from the job's
    allocation, and each rank would get one CPU (slurm/train.sh passes it to srun too).
    """
    s = {"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 8, "time": 240, "partition": None,
         **options.slurm_args}
    parameters = dict(
        name=f"mgn-compare-{cell.arm.name}-s{cell.seed}", nodes=s["nodes"],
        tasks_per_node=max(s["gpus_per_node"], 1),
        cpus_per_task=s["cpus_per_task"], timeout_min=s["time"], slurm_partition=s["partition"],
        slurm_signal_delay_s=min(300, s["time"] * 30), slurm_additional_parameters={"requeue": True},
        slurm_srun_args=["--kill-on-bad-exit=1", f"--cpus-per-task={s['cpus_per_task']}"],
        slurm_setup=[f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}",
                     f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{s['cpus_per_task']}}}"])
    if s["gpus_per_node"]:
        parameters["gpus_per_node"] = s["gpus_per_node"]
    return parameters
