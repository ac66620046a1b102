"""train.py end to end on tiny synthetic shards: outputs, TensorBoard, preemption and resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgn.run_paths import RunPaths
from mgn.data.writer import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic(out, samples=320, image_size=64, seed=0)
    return out


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                      "LOCAL_RANK",
                                                                      "MASTER_"))}
    return clean | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def train_args(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train.py", "--preset", "tiny", "--data.train_shards", str(shards / "train-*.tar"),
            "--data.test_shards", str(shards / "test-*.tar"), "--data.synthetic_samples", "0",
            "--train.output_dir", str(out), "--train.run_name", name, *extra]


def rewind_to(run: Path, step: int) -> None:
    """Make `step` the run's latest checkpoint, as if the later ones had never been written."""
    for tag in (run / "checkpoints").glob("step_*"):
        if int(tag.name.split("_")[1]) > step:
            shutil.rmtree(tag)
    (run / "checkpoints" / "latest").write_text(f"step_{step:08d}")


def scalar_values(tb_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def scalars(tb_dir: Path) -> dict[str, list[int]]:
    """Steps per scalar tag, as TensorBoard itself reads them (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    steps = {tag: [e.step for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    steps["__images__"] = tags["images"]
    return steps


def test_single_process_guided_run_writes_everything(shards, tmp_path):
    result = subprocess.run([sys.executable, *train_args(shards, tmp_path, "guided", "--train.export_formats",
                                                         "safetensors,pt2,onnx")], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "guided"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] > 0 and summary["world_size"] == 1
    assert ("MGN: done step=" in result.stdout
            and str(run / "student" / "student.safetensors") in result.stdout)
    # both students, with accuracies
    assert str(run / "student_best" / "student.safetensors") in result.stdout
    for path in ("config.json", "train.log", "checkpoints/latest", "student/student.safetensors",
                 "student/student.pt2", "student/student.onnx", "student_best/student.safetensors",
                 "student_best/student.pt2", "metrics.csv", "attention"):
        assert (run / path).exists(), path
    assert json.loads((run / "config.json").read_text())["objective"]["name"] == "guided"
    steps = scalars(RunPaths(run).tensorboard)
    for tag in ("train/loss", "train/samples_per_s", "train/data_wait_fraction", "train/peak_memory_mb",
                "lr/image", "lr/head", "eval/student_accuracy", "eval/student_auroc", "eval/teacher_accuracy",
                "eval/student_precision", "eval/student_recall", "eval/student_f1"):
        assert tag in steps, tag
    assert "attention/cross_modality" in steps["__images__"]
    # What a newcomer reads: terms, accuracy, time per step and ETA in the log; metrics.csv; the picture;
    # latest.
    step_line = next(line for line in result.stdout.splitlines() if "MGN: step 2/" in line)
    for field in ("loss", "guided_ce", "student_ce", "acc", "s/step", "ETA", "samples/s", "data wait"):
        assert field in step_line, field
    header, *lines = (run / "metrics.csv").read_text().splitlines()
    assert header == "step,epoch,role,accuracy,precision,recall,f1,auroc,pr_auc,samples"
    assert {line.split(",")[2] for line in lines} == {"student", "teacher"}
    from PIL import Image

    picture = Image.open(next((run / "attention").glob("step_*.png")))
    assert picture.mode == "RGB" and picture.width > 500 and picture.height > 200
    assert (tmp_path / "latest").resolve() == run.resolve()
    for tag in ("train/accuracy", "train/guided_ce", "train/student_ce", "train/seconds_per_step",
                "captions/train_truncated_share"):
        assert tag in steps, tag
    # The tiny preset's seq_len 16 cuts every synthetic caption (25-33 tokens): counted, said, kept
    # (mgn/data/captions.py).
    train = summary["captions"]["train"]
    assert (train["captions"], train["truncated"], train["seq_len_to_fit"]) == (272, 272, 36)
    assert "MGN: captions: train 272 of 272 cut at seq_len 16" in result.stdout
    assert "100.0% of the train captions are cut at model.seq_len 16" in result.stdout


def test_baseline_with_accumulation_then_a_rewound_resume_keeps_one_point_per_step(shards, tmp_path):
    """Baseline mode from the same script. grad_accum 4: only whole updates in an epoch (DeepSpeed's
    micro-step counter would otherwise carry the remainder into the next one), and time counted for
    every micro-batch. Then resume from an older checkpoint than the last logged step: TensorBoard
    must drop the rewritten steps (purge_step), and a fresh start in the used folder is refused."""
    import math

    from mgn.io.shard_sets import expand_shards, read_sizes

    args = train_args(shards, tmp_path, "base", "--objective.name", "baseline", "--train.epochs", "2",
                      "--train.grad_accum", "4", "--train.log_every", "1", "--train.ckpt_every", "4",
                      "--train.keep_last", "0")
    first = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "base"
    micro_batches = math.ceil(sum(read_sizes(expand_shards(str(shards / "train-*.tar"))).values()) / 8)
    total = 2 * (micro_batches // 4)
    assert micro_batches % 4 and f"{micro_batches // 4} updates per epoch, {total} total" in first.stdout
    assert json.loads((run / "summary.json").read_text())["step"] == total
    steps = scalars(RunPaths(run).tensorboard)
    assert "eval/student_accuracy" in steps and "eval/teacher_accuracy" not in steps
    assert steps["train/loss"] == list(range(1, total + 1))
    wait = scalar_values(RunPaths(run).tensorboard, "train/data_wait_fraction")
    assert all(0 <= w <= 1 for w in wait), wait

    again = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=400)
    assert again.returncode != 0 and "already holds a run with checkpoints" in again.stdout + again.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{total:08d}"

    rewind = 8
    rewind_to(run, rewind)
    resumed = subprocess.run([sys.executable, *args, "--train.resume", "auto"], cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{rewind:08d}'}" in resumed.stdout
    assert json.loads((run / "summary.json").read_text())["step"] == total
    # steps 9.. written twice, kept once
    assert scalars(RunPaths(run).tensorboard)["train/loss"] == list(range(1, total + 1))


def test_two_ranks_preempted_by_signal_then_resumed_finish_with_the_same_steps(shards, tmp_path):
    """SIGUSR1 to one rank mid-run: all ranks save and stop (exit 4 outside Slurm, where nothing requeues the
    run: mgn/cli.py); `--train.resume auto` finishes the run."""
    args = train_args(shards, tmp_path, "dist", "--train.epochs", "2", "--train.log_every", "1",
                      "--train.ckpt_every", "1000")
    first = subprocess.Popen(torchrun(*args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in first.stdout:  # wait until training is under way, then signal rank 0 only
            lines.append(line)
            if "MGN: step 3/" in line:
                os.kill(_rank0_pid(first.pid), signal.SIGUSR1)
                break
        lines += first.communicate(timeout=300)[0].splitlines(keepends=True)
    finally:
        first.kill()
    log = "".join(lines)
    # each rank exits 4 (stopped, mgn/cli.py); torchrun reports that and exits 1 itself
    assert first.returncode != 0 and "exitcode: 4" in log and "exitcode: 1 " not in log, log[-4000:]
    assert "stop requested by signal" in log
    run = tmp_path / "dist"
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert stopped_at >= 3 and not (run / "summary.json").exists()

    second = subprocess.run(torchrun(*args, "--train.resume", "auto"), cwd=ROOT, env=env(),
                            capture_output=True,
                            text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped_at:08d}'}" in second.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2

    reference = subprocess.run(torchrun(*train_args(shards, tmp_path, "ref", "--train.epochs", "2")),
                               cwd=ROOT,
                               env=env(), capture_output=True, text=True, timeout=400)
    assert reference.returncode == 0, reference.stdout[-3000:]
    assert summary["step"] == json.loads((tmp_path / "ref" / "summary.json").read_text())["step"]

    loss_steps = scalars(RunPaths(run).tensorboard)["train/loss"]
    assert len(loss_steps) == len(set(loss_steps)), "a step was logged twice across the resume"
    assert loss_steps == sorted(loss_steps) and loss_steps[-1] == summary["step"]


def test_two_ranks_with_zero2_partition_the_optimizer_and_resume(shards, tmp_path):
    """ZeRO stage 2 over gloo: each rank writes its own optimizer partition, and a resume loads them."""
    args = train_args(shards, tmp_path, "z2", "--train.zero_stage", "2", "--train.ckpt_every", "10")
    first = subprocess.run(torchrun(*args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "z2"
    tag = run / "checkpoints" / "step_00000010"
    assert sorted(p.name for p in tag.glob("*optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    total = json.loads((run / "summary.json").read_text())["step"]
    rewind_to(run, 10)
    resumed = subprocess.run(torchrun(*args, "--train.resume", "auto"), cwd=ROOT, env=env(),
                             capture_output=True,
                             text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {tag}" in resumed.stdout
    assert json.loads((run / "summary.json").read_text())["step"] == total


def _rank0_pid(launcher_pid: int, timeout: float = 30) -> int:
    """The worker torchrun started with RANK=0."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if b"RANK=0" in environ:
                return int(child)
        time.sleep(0.5)
    raise TimeoutError("rank 0 worker not found")
