"""A GPU run's paths, run on the CPU: uint8 NHWC batches normalised on the device and bf16 autocast, for every
objective, through training, a checkpoint, a resume, the exported student and `evaluate.py` (issue 32: a
guided GPU run died at its first evaluation, in a path CPU tests never took)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mgn.config import OBJECTIVES
from mgn.data.writer import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

AS_ON_A_GPU = ("--data.batch_form", "uint8", "--train.precision", "bf16")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parity-shards")
    # controls need it
    write_synthetic(out, samples=96, image_size=64, seed=0, max_samples=32, ground_truth=True)
    return out


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                    "MASTER_"))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_trains_resumes_and_evaluates_as_on_a_gpu(objective, shards, tmp_path):
    common = ("train.py", "--preset", "tiny", "--objective.name", objective, *AS_ON_A_GPU,
              "--data.train_shards", str(shards / "train-*.tar"), "--data.test_shards",
              str(shards / "test-*.tar"),
              "--data.synthetic_samples", "0", "--train.output_dir", str(tmp_path), "--train.run_name", "run",
              "--train.micro_batch", "16", "--train.ckpt_every", "3", "--train.attention_images", "2")
    first = run(*common, "--train.epochs", "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    resumed = run(*common, "--train.epochs", "2", "--train.resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "MGN: resumed from" in resumed.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["student_accuracy"] is not None
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["batch_form"] == "uint8" and config["train"]["precision"] == "bf16"
    if OBJECTIVES[objective].reads == ("captions",):  # the guided objectives draw the attention picture
        # one per epoch's evaluation
        assert len(list((tmp_path / "run" / "attention").glob("step_*.png"))) == 2
    teacher = ("--teacher",) if OBJECTIVES[objective].reads == ("captions",) else ()
    evaluated = run("evaluate.py", "--ckpt", str(tmp_path / "run"), "--batch-form", "uint8", *teacher,
                    "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    test_samples = sum(n for name, n in json.loads((shards / "sizes.json").read_text()).items()
                       if name.startswith("test"))
    assert report["samples"] == test_samples and (("teacher" in report) == bool(teacher))


def test_the_deployed_student_scores_the_same_from_uint8_and_float_batches(shards, tmp_path):
    trained = run("train.py", "--preset", "tiny", "--objective.name", "baseline", *AS_ON_A_GPU,
                  "--data.train_shards", str(shards / "train-*.tar"), "--data.test_shards",
                  str(shards / "test-*.tar"),
                  "--data.synthetic_samples", "0", "--train.output_dir", str(tmp_path), "--train.run_name",
                  "run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    student = tmp_path / "run" / "student" / "student.safetensors"
    reports = {}
    for form in ("uint8", "float"):
        done = run("evaluate.py", "--ckpt", str(student), "--batch-form", form, "--out", str(tmp_path / form))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        reports[form] = json.loads((tmp_path / form / "eval.json").read_text())["student"]
    assert reports["uint8"]["confusion_matrix"] == reports["float"]["confusion_matrix"]
    assert abs(reports["uint8"]["auroc"] - reports["float"]["auroc"]) < 1e-3
