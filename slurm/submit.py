"""Submit MGN training to Slurm from Python (submitit); the job requeues itself when time runs out.

    python slurm/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 --preset paper
    python slurm/submit.py --nodes 1 --gpus-per-node 2 --time 60 --preset demo --train.run_name demo1 --wait
    python slurm/submit.py --help            # Slurm flags, then every config field as --section.field

Run it from the repository root: the job starts in the directory it was submitted from, like
`sbatch slurm/train.sh`. Slurm flags and the run config share one command line; the config is
resolved and validated here, before anything is queued, and travels with the job.

The job is one task per GPU; each task exports the rank environment with submitit's
`TorchDistributedEnvironment` (without its CUDA_VISIBLE_DEVICES = local rank, which would clash with
DeepSpeed's device choice) and calls `mgn.train.loop.run`. Time limit and preemption use the same logic
as the sbatch path (mgn/train/preemption.py): Slurm's USR2 (`--signal-delay-s` before the limit) only sets
a flag, all ranks agree at the next step, all save, rank 0 requeues, and every restart of the job
resumes from the run's latest checkpoint. Submitit's logs go to <run_dir>/submitit/.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import cloudpickle
import submitit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mgn.config import Config, add_config_args, config_from_args  # noqa: E402 - after the path


class TrainJob(submitit.helpers.Checkpointable):
    """One rank of the training job; submitit pickles it, and requeues it on preemption."""

    def __init__(self, config: dict):
        self.config = config

    def __call__(self) -> dict:
        from mgn.distributed import slurm_port  # in the job, not at submission
        from mgn.train import preemption
        from mgn.train.loop import run

        # The port train.sh uses: MGN_MASTER_PORT, else one from the job id below the ephemeral range. Not an
        # inherited MASTER_PORT (the submitting shell's, meant for another job), nor submitit's own choice
        # (random in 20000-60000, mostly ephemeral ports). overwrite: rank variables inherited from the
        # submitting shell (sbatch exports its environment) made submitit refuse to export the job's own.
        port = os.environ.get("MGN_MASTER_PORT") or slurm_port(int(os.environ["SLURM_JOB_ID"]))
        os.environ["MASTER_PORT"] = str(port)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)

        cfg = Config.from_dict(self.config)
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
            # Any restart (our requeue, a preemption requeue, a node failure): continue this run.
            cfg.train.resume = "auto"
        summary = run(cfg)
        if preemption.requeue_if_asked(summary):  # every rank saved; no rank returns a result
            raise SystemExit(0)
        return summary

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's own handler (a signal before training installed its handler)."""
        config = copy.deepcopy(self.config)
        config["train"]["resume"] = "auto"
        return submitit.helpers.DelayedSubmission(TrainJob(config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU-only nodes")
    slurm.add_argument("--tasks-per-node", type=int, default=None, help="default: --gpus-per-node (or 1)")
    slurm.add_argument("--cpus-per-task", type=int, default=8)
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes")
    slurm.add_argument("--signal-delay-s", type=int, default=300, help="USR2 this long before the limit")
    slurm.add_argument("--max-requeues", type=int, default=20,
                       help="submitit's limit on timeouts caught by its own handler")
    slurm.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's summary")
    add_config_args(parser)
    return parser


def submit(cfg: Config, args: argparse.Namespace) -> submitit.Job:
    """Queue the job for `cfg` with the Slurm settings in `args`; returns the submitit job."""
    executor = build_executor(cfg, args)
    if TrainJob.__module__ != "__main__":  # imported (tests): ship the class by value, like a script's
        cloudpickle.register_pickle_by_value(sys.modules[TrainJob.__module__])  # needs sys.modules entry
    return executor.submit(TrainJob(cfg.to_dict()))


def build_executor(cfg: Config, args: argparse.Namespace) -> submitit.AutoExecutor:
    """The executor of the job for `cfg`, with the Slurm settings in `args`; nothing is queued."""
    if args.signal_delay_s >= args.time * 60:
        raise ValueError(f"--signal-delay-s {args.signal_delay_s} is not shorter than --time {args.time} "
                         "min: "
                         "the job would be told to requeue as soon as it starts")
    tasks_per_node = args.tasks_per_node or max(args.gpus_per_node, 1)
    executor = submitit.AutoExecutor(folder=cfg.run_dir / "submitit", slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(
        name=cfg.train.run_name, nodes=args.nodes, tasks_per_node=tasks_per_node,
        cpus_per_task=args.cpus_per_task, timeout_min=args.time,
        slurm_partition=args.partition, slurm_signal_delay_s=args.signal_delay_s,
        # requeue: allowed even where the cluster default forbids it; kill-on-bad-exit: one rank's
        # crash ends the job instead of leaving the others blocked in a collective until the limit;
        # cpus-per-task: since Slurm 22.05 srun does not inherit it from the job (as in slurm/train.sh).
        slurm_additional_parameters={"requeue": True},
        slurm_srun_args=["--kill-on-bad-exit=1", f"--cpus-per-task={args.cpus_per_task}"],
        # the job imports mgn from this checkout wherever it was submitted from
        # (OMP_NUM_THREADS is left to the user: unset, train.py gives a GPU rank's CPUs to its loader
        # workers, mgn.distributed.set_threads)
        slurm_setup=[f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )
    if args.gpus_per_node:
        executor.update_parameters(gpus_per_node=args.gpus_per_node)
    return executor


def job_config(args: argparse.Namespace) -> Config:
    """The run config from the command line, with a fixed run name (every restart of the job writes to
    the same run dir) and `resume auto` unless a checkpoint was named (a rerun continues the run)."""
    cfg = config_from_args(args)
    if not cfg.train.run_name:
        cfg.train.run_name = time.strftime(f"%Y%m%d-%H%M%S-{cfg.objective.name}")
    if not cfg.train.resume:
        cfg.train.resume = "auto"
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = job_config(args)
    job = submit(cfg, args)
    print(f"MGN submit: job {job.job_id} run dir {cfg.run_dir} | logs {cfg.run_dir / 'submitit'}", flush=True)
    if args.wait:
        summary = job.results()[0]
        print(f"MGN submit: job {job.job_id} done: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
