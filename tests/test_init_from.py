"""train.init_from: a run folder, a ZeRO-2 checkpoint tag and an exported student give the same student."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgn.checkpoint.read import init_student
from mgn.checkpoint.store import CheckpointError
from mgn.config import preset_config
from mgn.model.export import fuse_student, unfuse_into
from mgn.model.networks import ImageClassifier
from tests.conftest import calibrate_batchnorm

ROOT = Path(__file__).resolve().parents[1]


def train(workdir: Path, name: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_",
                                                                     "SLURM_"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "--data.synthetic_samples", "160",
           "--train.output_dir", "runs", "--train.run_name", name, "--train.eval_every", "-1", *flags]
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("init")
    train(workdir, "donor", "--objective.name", "guided", "--train.zero_stage", "2",
          "--train.export_formats", "safetensors,pt2")  # the student.pt2 is a source below
    return workdir


def config_from(source: Path, **train_overrides):
    return preset_config("tiny", {"train": {"init_from": str(source), **train_overrides}})


def test_unfusing_an_exported_student_gives_the_same_function_and_fuses_back_exactly():
    cfg = preset_config("tiny")
    torch.manual_seed(0)
    trained = ImageClassifier(cfg.model)
    calibrate_batchnorm(trained, image_size=64)
    fused = fuse_student(trained)
    rebuilt = ImageClassifier(cfg.model)
    unfuse_into(rebuilt, fused.state_dict())
    refused = fuse_student(rebuilt)
    for key, value in fused.state_dict().items():
        assert torch.equal(refused.state_dict()[key], value), key
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), fused(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_run_folder_zero2_tag_and_student_artifact_give_identical_weights(zero2_run):
    run = zero2_run / "runs" / "donor"
    tag = next((run / "checkpoints").glob("step_*"))
    assert any(tag.glob("*optim_states.pt"))  # a ZeRO-2 tag: the fp32 weights come from its shards
    students = {}
    for label, source in (("run", run), ("tag", tag), ("artifact", run / "student" / "student.safetensors"),
                          ("program", run / "student" / "student.pt2")):
        torch.manual_seed(123)  # a different init than the donor's: every weight must come from the source
        student = ImageClassifier(preset_config("tiny").model)
        init_student(student, config_from(source, trust_checkpoint=label == "tag"))  # consolidation unpickles
        students[label] = student
    run_weights = students["run"].state_dict()
    for key, value in students["tag"].state_dict().items():
        assert torch.equal(run_weights[key], value), key
    fused = {label: fuse_student(student).state_dict() for label, student in students.items()}
    for key, value in fused["run"].items():
        assert torch.equal(fused["artifact"][key], value) and torch.equal(fused["program"][key], value), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(students["artifact"].eval()(x), students["run"].eval()(x), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.slow
def test_image_encoder_only_keeps_a_fresh_head_and_a_class_mismatch_is_refused(zero2_run):
    run = zero2_run / "runs" / "donor"
    torch.manual_seed(5)
    student = ImageClassifier(preset_config("tiny", {"model": {"num_classes": 3}}).model)
    head = student.head.fc.weight.clone()
    cfg = preset_config("tiny", {"model": {"num_classes": 3},
                                 "train": {"init_from": str(run), "init_parts": "image_encoder"}})
    init_student(student, cfg)
    assert torch.equal(student.head.fc.weight, head)
    reference = ImageClassifier(preset_config("tiny").model)
    init_student(reference, config_from(run))
    for key, value in reference.encoder.state_dict().items():
        assert torch.equal(student.encoder.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="init_parts image_encoder"):
        init_student(ImageClassifier(cfg.model), preset_config("tiny", {"model": {"num_classes": 3},
                                                                         "train": {"init_from": str(run)}}))


@pytest.mark.slow
def test_train_py_starts_a_run_from_another_runs_weights(zero2_run):
    result = train(zero2_run, "second-stage", "--objective.name", "baseline", "--train.init_from",
                   "runs/donor",
                   "--train.init_parts", "image_encoder")
    assert "MGN: initialised image_encoder from" in result.stdout and "runs/donor" in result.stdout
    assert (zero2_run / "runs" / "second-stage" / "student" / "student.safetensors").exists()
