"""One cell: train the arm's stages through mgn.train.loop.run, then evaluate the final student (and the
teacher).

A cell runs in its own process: locally a fresh `python -m mgn.compare --run-cell SPEC RESULT` (spawned
by spawn_cell with a fixed thread count, so one cell's DeepSpeed state, threads and memory never leak into
the next), on Slurm a submitit job of CellJob on every rank. Both read a spec (cell_spec: the key, the
fingerprint and every stage's config, as JSON) and give back one result row for results.jsonl.
This file holds both sides of that process boundary: what the runner starts and what the child runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import submitit

from mgn import distributed
from mgn.compare import significance
from mgn.train import loop, preemption, run_folder
from mgn.checkpoint.read import load_checkpoint
from mgn.eval.ceiling import ground_truth
from mgn.compare.plan import Cell
from mgn.config import Config
from mgn.run_paths import RunPaths
from mgn.eval.evaluate import predict, summarize, teacher_and_reliance, test_batches
from mgn.eval.predictions import Predictions

log = logging.getLogger("mgn")

REPO = Path(__file__).resolve().parents[2]  # the checkout: child processes and Slurm jobs import mgn from it


def cell_spec(cell: Cell, work: Path) -> dict:
    return {"key": cell.key, "setting": cell.setting.name, "arm": cell.arm.name, "seed": cell.seed,
            "fingerprint": cell.fingerprint(work), "configs": [c.to_dict() for c in cell.stage_configs(work)],
            "validation_shards": cell.setting.validation_shards}


def run_cell(spec: dict) -> dict | None:
    """Train every stage of a cell, then (rank 0) evaluate its final student and teacher. Every rank calls it.

    A stage whose run folder holds a finished run with this config is skipped; an interrupted one resumes
    from its checkpoint (`train.resume auto`), as a requeued Slurm job does. Returns the result row on
    rank 0, None elsewhere, {"preempted": ...} when a stage stopped for a signal.
    """
    configs = [Config.from_dict(raw) for raw in spec["configs"]]
    train_seconds = 0.0
    for cfg in configs:
        if _finished(cfg):
            train_seconds += json.loads(cfg.paths.summary.read_text()).get("train_seconds", 0.0)
            continue
        if distributed.detect_world().rank == 0:
            # another process still trains this stage: touch nothing
            run_folder.refuse_if_locked(cfg.paths.lock)
            set_aside_if_stale(cfg)
        distributed.barrier()
        summary = loop.run(cfg)
        if summary.get("preempted"):
            return summary
        train_seconds += summary["train_seconds"]
    distributed.shutdown()
    if distributed.detect_world().rank != 0:
        return None
    start = time.perf_counter()
    row = {"key": spec["key"], "setting": spec["setting"], "arm": spec["arm"], "seed": spec["seed"],
           "fingerprint": spec["fingerprint"], "train_seconds": round(train_seconds, 2),
           **evaluate_cell(spec, keep_predictions=True),
           "start": json.loads(configs[0].paths.start.read_text()),
           "run_dirs": [str(c.run_dir) for c in configs], "code": code_version()}
    row["eval_seconds"] = round(time.perf_counter() - start, 2)
    return row


def set_aside_if_stale(cfg: Config) -> None:
    """A stage folder written with another config (the user changed a setting) must not be resumed: it is
    renamed `<name>.stale-<time>`, kept for inspection, and the stage starts afresh."""
    if _saved_config_matches(cfg) is False:
        aside = cfg.run_dir.with_name(f"{cfg.run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.run_dir.rename(aside)
        log.warning("MGN compare: %s was trained with another config; moved to %s, "
                    "training this stage afresh", cfg.run_dir, aside)


def _saved_config_matches(cfg: Config) -> bool | None:
    """Whether the stage folder was written with this very config; None when it holds no config yet."""
    saved = cfg.paths.config
    if not saved.exists():
        return None
    try:
        return Config.load(saved) == cfg
    except (OSError, ValueError):
        return False


def _finished(cfg: Config) -> bool:
    """A stage already done with this very config (a re-run skips it)."""
    try:
        done = json.loads(cfg.paths.summary.read_text())
    except (OSError, ValueError):
        return False
    return not done.get("preempted") and _saved_config_matches(cfg) is True


def evaluate_cell(spec: dict, *, keep_predictions: bool = False) -> dict:
    """A trained cell's evaluation (evaluate_run): the last stage's student; the teacher of the last stage
    that read captions, if any; the setting's validation shards."""
    configs = [Config.from_dict(raw) for raw in spec["configs"]]
    guided = [c for c in configs if c.uses_captions]
    return evaluate_run(configs[-1].run_dir, guided[-1].run_dir if guided else None,
                        spec.get("validation_shards") or None, keep_predictions=keep_predictions)


def evaluate_run(student_run: Path, teacher_run: Path | None, validation_shards: str | None = None, *,
                 keep_predictions: bool = False) -> dict:
    """The final checkpoint's student (fused, as deployed) on the test shards, once, and on the validation
    shards; the guided teacher and its caption reliance from `teacher_run` (the last stage that read
    captions), if any.

    Per split: the metrics on the stored labels, the accuracy on the true labels where the generator's ground
    truth knows them, and each sample's correctness (significance.sample_record, for the sample-level test);
    with `keep_predictions` every sample's key, labels and log-probabilities go to predictions-<split>.jsonl
    in the run folder."""
    metrics = significance.METRICS
    ckpt = load_checkpoint(student_run)
    device = distributed.pick_device(ckpt.cfg.train.device)  # where the run trained, and in its batch form
    row: dict = {"per_sample": {}}
    splits = {"test": ckpt.cfg.data.test_shards,
              **({"validation": validation_shards} if validation_shards else {})}
    for split, shards in splits.items():
        data = dataclasses.replace(ckpt.cfg.data, test_shards=shards)
        preds = predict(ckpt, test_batches(ckpt.cfg, data, False, batch_size=256, device=device,
                                           batch_form=ckpt.cfg.data.batch_form), device=device)
        report = summarize(preds, target_precision=None)
        truth = ground_truth(shards)
        true = np.array([truth[k]["true_label"] for k in preds.keys]) if truth else None
        scores = {"samples": report["samples"], "student": {k: report["student"][k] for k in metrics}}
        if true is not None:
            scores["student_true"] = {"accuracy": float(np.mean(preds.student.argmax(1) == true))}
        if split == "test":
            row.update(test_samples=scores.pop("samples"), **scores)
        else:
            row[split] = scores
        row["per_sample"][split] = significance.sample_record(preds.keys, preds.labels, preds.student, true)
        if keep_predictions:
            write_predictions(RunPaths(student_run).predictions(split), preds, true)
    if teacher_run is not None:
        guided = load_checkpoint(teacher_run, teacher=True)
        batches = test_batches(guided.cfg, guided.cfg.data, True, batch_size=256, device=device,
                               batch_form=guided.cfg.data.batch_form)
        teacher, row["reliance"] = teacher_and_reliance(guided.objective, batches, device=device)
        report = summarize(teacher, target_precision=None)
        row["teacher"] = {k: report["teacher"][k] for k in metrics}
    return row


def write_predictions(path: Path, preds: Predictions, true: np.ndarray | None) -> None:
    """One JSON line per sample: key, stored label, true label (when known), the student's log-probabilities
    (its logits, up to a constant per sample)."""
    logs = np.log(np.clip(preds.student, 1e-12, 1.0))
    with path.open("w") as f:
        for i, key in enumerate(preds.keys):
            line = {"key": key, "label": int(preds.labels[i]), "log_probs": [round(float(v),
                                                                                   6) for v in logs[i]]}
            if true is not None:
                line["true_label"] = int(true[i])
            f.write(json.dumps(line) + "\n")


def code_version() -> str:
    """The commit the runs were made with (and '+dirty' with uncommitted changes to anything but the results
    under benchmarks/results/, which the runs themselves write), for results.jsonl."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


class CellJob:
    """One cell as a Slurm job: every rank trains the stages; rank 0 evaluates and returns the row.

    On a time-limit or preemption signal the stage saves, rank 0 requeues the job, and the restart
    resumes the stage from its checkpoint (run_cell always passes train.resume auto).
    """

    def __init__(self, spec: dict):
        self.spec = spec

    def __call__(self) -> dict | None:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        row = run_cell(self.spec)
        if preemption.requeue_if_asked(row):
            raise SystemExit(0)
        return row


# --- the local child process: started by spawn_*, entered through main() ----------------------------------

def spawn_cell(spec_file: Path, result_file: Path, log_file: Path, threads: int) -> None:
    """main_cell in a fresh process; raises RuntimeError if it fails (its output is in `log_file`)."""
    _spawn(["--run-cell", str(spec_file), str(result_file)], log_file, threads)


def spawn_training(cfg: Config, log_file: Path, threads: int) -> None:
    """main_train in a fresh process (the stand-in's pretraining); raises RuntimeError if it fails."""
    _spawn(["--train-config", json.dumps(cfg.to_dict())], log_file, threads)


def _spawn(args: list[str], log_file: Path, threads: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_",
                                                                     "SLURM_"))}
    threads = threads or len(os.sched_getaffinity(0))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    returncode = run_child([sys.executable, "-m", "mgn.compare", *args], log_file, env)
    if returncode != 0:
        raise RuntimeError(f"exit status {returncode}; see {log_file}")


def run_child(command: list[str], log_file: Path, env: dict[str, str] | None = None) -> int:
    """`command`'s exit status, its output in `log_file`; nothing of it outlives the runner.

    A cell left running by a dead runner would go on training while the same command, run again, trains the
    same cell into the same folder. So the child runs in its own process group, which the runner kills
    however its wait ends (an error, Ctrl-C), and on Linux the kernel kills the child when the runner dies
    (even by SIGKILL; `_dies_with_runner`). In its own group the child no longer gets the terminal's
    Ctrl-C: the runner passes it on (training saves at its next update and stops); a second Ctrl-C ends it
    at once.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as out:
        # stdin: not the terminal, which would stop a background process group that reads it
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=env,
                                 process_group=0, preexec_fn=_dies_with_runner(os.getpid()))
        try:
            _wait_passing_on_ctrl_c(child)
        finally:  # however the wait ended, the whole group goes: the child and its children (loader workers)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return child.returncode


def _wait_passing_on_ctrl_c(child: subprocess.Popen) -> None:
    """Until `child` exits, left unreaped (its process group id cannot be anyone else's before it is reaped);
    a Ctrl-C is passed on to its group, which is then waited for again, and raised."""
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    except KeyboardInterrupt:
        os.killpg(child.pid, signal.SIGINT)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        raise


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _dies_with_runner(runner: int) -> Callable[[], None] | None:
    """What the child runs before it starts `command` (a subprocess preexec_fn), on Linux: ask the kernel for
    SIGKILL when the runner's thread that started it ends, then check the runner has not died already."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL))
        if os.getppid() != runner:  # the runner died before the line above: no signal would come
            os._exit(1)

    return arm


def main(argv: list[str] | None = None) -> int:
    """Internal entry points of the cell processes (`python -m mgn.compare`); users run compare.py."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if argv[:1] == ["--run-cell"]:
        return main_cell(argv[1], argv[2])
    if argv[:1] == ["--train-config"]:
        return main_train(argv[1])
    raise SystemExit("usage: python compare.py --help (this module's own entry points are internal)")


def main_cell(spec_file: str, result_file: str) -> int:
    """`python -m mgn.compare --run-cell SPEC RESULT`: one cell in this process (what the runner spawns)."""
    spec = json.loads(Path(spec_file).read_text())
    row = run_cell(spec)
    if row is not None and not row.get("preempted"):
        tmp = Path(result_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(row) + "\n")
        tmp.replace(result_file)
    return 0


def main_train(raw: str) -> int:
    """`python -m mgn.compare --train-config JSON`: one plain training run (the stand-in's pretraining)."""
    loop.run(Config.from_dict(json.loads(raw)))
    return 0
