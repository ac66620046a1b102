"""A bad flag, input file or --ckpt path gets one line naming it and what is allowed, exit code 2, no
traceback (issue 27, parts 5 and 6), from every entry point: train.py, evaluate.py, benchmark.py, compare.py
and `python -m mgn.shards` (mgn/cli.py).

The flag tables run the real scripts (subprocesses: what a user sees); flag errors answer before torch loads,
so each case takes a fraction of a second. The --ckpt table calls the entry points' `main` in this process
(each case would cost a torch import as a subprocess); the `slow` tests repeat the key cases as real
processes.
"""
import dataclasses
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mgn.config import PRESETS, Config, preset_config

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                      "LOCAL_RANK",
                                                                      "MASTER_", "MGN_"))}
    return clean | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*argv: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def the_line(prog: str, code: int, stdout: str, stderr: str) -> str:
    """The one error line of a failed command, after checking there is exactly one and no traceback."""
    assert code == 2, (code, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr[-3000:]
    return lines[0]


# --- every config field has a check
# ---------------------------------------------------------------------------

# One bad value per field and a fragment of the message it must give. A new field fails
# `test_every_config_field_is_checked_or_exempt` until it has a row here or in EXEMPT.
BAD_VALUES = {
    "model.image_model": ("resnet_nope", "model.image_model='resnet_nope': not a timm model name"),
    "model.image_size": (0, "model.image_size=0 must be >= 32"),
    "model.seq_len": (15, "model.seq_len=15 is not a perfect square"),
    "model.freeze_text": ("yes", "model.freeze_text='yes': expected true or false"),
    "model.text_cache": (-1, "model.text_cache=-1 must be >= 0"),
    "model.fusion_dim": (0, "model.fusion_dim=0 must be >= 1"),
    "model.attention": ("cross", "model.attention='cross': expected one of ['token', 'pool']"),
    "model.attention_heads": (0, "model.attention_heads=0 must be >= 1"),
    "model.attend_to": ("text", "model.attend_to='text': expected one of"),
    "model.num_classes": (1, "model.num_classes=1 must be >= 2"),
    "model.drop_rate": (1.0, "model.drop_rate=1.0 must be in [0, 1)"),
    "objective.name": ("nope", "objective.name='nope': expected one of ['baseline', 'guided'"),
    "objective.student_weight": (-0.5, "objective.student_weight=-0.5 must be >= 0"),
    "objective.distill_weight": (1.5, "objective.distill_weight=1.5 must be in [0, 1]"),
    "objective.temperature": (0.0, "objective.temperature=0.0 must be > 0"),
    "objective.attention_weight": (float("nan"), "objective.attention_weight=nan: expected a finite number"),
    "objective.caption_dropout": (2.0, "objective.caption_dropout=2.0 must be in [0, 1]"),
    "data.num_workers": (-2, "data.num_workers=-2 must be >= 0"),
    "data.shuffle_buffer": (-1, "data.shuffle_buffer=-1 must be >= 0"),
    "data.max_skip_fraction": (1.5, "data.max_skip_fraction=1.5 must be in [0, 1]"),
    "data.synthetic_samples": (-1, "data.synthetic_samples=-1 must be >= 0"),
    "data.max_image_pixels": (0, "data.max_image_pixels=0 must be >= 1"),
    "data.max_caption_bytes": (0, "data.max_caption_bytes=0 must be >= 1"),
    "data.max_member_bytes": (0, "data.max_member_bytes=0 must be >= 1"),
    "data.max_sample_bytes": (0, "data.max_sample_bytes=0 must be >= 1"),
    "data.text_blocks": (7, "data.text_blocks=7: expected a string"),
    "train.seed": (-1, "train.seed=-1 must be in [0, 2147483647]"),
    "train.epochs": (-1, "train.epochs=-1 must be >= 1"),
    "train.micro_batch": (0, "train.micro_batch=0 must be >= 1"),
    "train.grad_accum": (0, "train.grad_accum=0 must be >= 1"),
    "train.lr_image": (-1e-3, "train.lr_image=-0.001 must be >= 0"),
    "train.lr_text": (float("inf"), "train.lr_text=inf: expected a finite number"),
    "train.lr_head": ("fast", "train.lr_head='fast': expected a number"),
    "train.weight_decay": (-0.1, "train.weight_decay=-0.1 must be >= 0"),
    "train.warmup_steps": (-5, "train.warmup_steps=-5 must be >= 0"),
    "train.grad_clip": (-1.0, "train.grad_clip=-1.0 must be >= 0"),
    "train.max_skipped_steps": (0, "train.max_skipped_steps=0 must be >= 1"),
    "train.on_divergence": ("retry", "train.on_divergence='retry': expected one of ['stop', 'rollback']"),
    "train.max_rollbacks": (-1, "train.max_rollbacks=-1 must be >= 0"),
    "train.rollback_skip_updates": (-1, "train.rollback_skip_updates=-1 must be >= 0"),
    "train.rollback_lr_scale": (0.0, "train.rollback_lr_scale=0.0 must be in (0, 1]"),
    "train.label_smoothing": (1.0, "train.label_smoothing=1.0 must be in [0, 1)"),
    "train.zero_stage": (3, "train.zero_stage=3: expected one of [0, 1, 2]"),
    "train.device": ("tpu", "train.device='tpu': expected one of ['auto', 'cuda', 'cpu']"),
    "train.precision": ("fp16", "train.precision='fp16': expected one of"),
    "model.image_mean": ("0.5,0.5", "model.image_mean='0.5,0.5': expected three comma-separated numbers"),
    "model.image_std": ("0.5,0,0.5", "model.image_std='0.5,0,0.5': expected three comma-separated numbers, "
                                     "one per "
                                      "RGB channel (e.g. 0.5,0.5,0.5), each > 0"),
    "data.batch_form": ("fp16", "data.batch_form='fp16': expected one of ['auto', 'uint8', 'float']"),
    "train.sync_batchnorm": (1, "train.sync_batchnorm=1: expected true or false"),
    "train.deterministic": ("on", "train.deterministic='on': expected true or false"),
    "train.dist_timeout_s": (0, "train.dist_timeout_s=0 must be >= 1"),
    "train.log_every": (0, "train.log_every=0 must be >= 1"),
    "train.eval_every": (-2, "train.eval_every=-2 must be >= -1"),
    "train.ckpt_every": (-1, "train.ckpt_every=-1 must be >= 0"),
    "train.keep_last": (-1, "train.keep_last=-1 must be >= 0"),
    "train.attention_images": (-1, "train.attention_images=-1 must be >= 0"),
    "train.export_formats": ("pt2,onnx", "train.export_formats='pt2,onnx': a comma-separated subset of "
                                         "safetensors,pt2,onnx that holds safetensors"),
    "train.run_name": ("../elsewhere", "train.run_name='../elsewhere': must be a folder name under"),
    "train.resume": ("auto", "train.resume=auto continues a named run"),
    "train.trust_checkpoint": ("no", "train.trust_checkpoint='no': expected true or false"),
    "train.init_parts": ("head", "train.init_parts='head': expected one of ['student', 'image_encoder']"),
}

# Fields any value of the right type may fill; what names a file is checked where the file is, when a run
# starts (mgn/train/inputs.py check_training_inputs; train.init_from by mgn/checkpoint/read.py
# check_init_from): TRAIN_FLAGS.
EXEMPT = {
    "model.text_model": "a hub name or a folder: a missing folder or package is checked at start "
                        "(TRAIN_FLAGS)",
    "model.image_pretrained": "'' | 'hub' | a weights file: the file is checked at start (TRAIN_FLAGS)",
    "data.train_shards": "a pattern: it must match shards at start, or name the synthetic writer's "
                         "(TRAIN_FLAGS)",
    "data.test_shards": "a pattern: as data.train_shards",
    "train.output_dir": "any folder; created at start",
    "train.init_from": "a path: read and checked against the run at start, before a run folder exists "
                       "(CKPT_CASES)",
}


def all_fields() -> list[str]:
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
            for f in dataclasses.fields(getattr(Config(), section.name))]


def test_every_config_field_is_checked_or_exempt():
    fields = set(all_fields())
    assert not set(BAD_VALUES) & set(EXEMPT)
    assert fields - set(BAD_VALUES) - set(EXEMPT) == set(), ("a config field without a check: add it to "
                                                             "validate, then to BAD_VALUES (or to EXEMPT, "
                                                             "with the reason)")
    assert set(BAD_VALUES) | set(EXEMPT) <= fields  # no row for a field that is gone


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_each_field_refuses_its_bad_value_naming_the_field(key):
    section, name = key.split(".")
    value, fragment = BAD_VALUES[key]
    preset_config("tiny")  # the preset itself is valid
    with pytest.raises(ValueError) as info:
        preset_config("tiny", {section: {name: value}})
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_every_preset_is_valid():
    for name in PRESETS:
        preset_config(name)


# --- train.py: the reviewer's flags and more, as a user runs them
# --------------------------------------------

TRAIN_FLAGS = [
    (["--train.epochs", "-1"], "train.epochs=-1 must be >= 1"),
    (["--train.micro_batch", "0"], "train.micro_batch=0 must be >= 1"),
    (["--train.grad_accum", "0"], "train.grad_accum=0 must be >= 1"),
    (["--model.seq_len", "15"], "model.seq_len=15 is not a perfect square"),
    (["--model.num_classes", "1"], "model.num_classes=1 must be >= 2"),
    (["--model.image_model", "mobilone_s4"], "model.image_model='mobilone_s4': not a timm model name; did "
                                              "you mean mobileone_s4"),
    (["--objective.name", "nope"], "objective.name='nope': expected one of"),
    (["--train.zero_stage", "3"], "train.zero_stage=3: expected one of [0, 1, 2]"),
    (["--data.train_shards", "/nonexistent/x-*.tar"], "data.train_shards='/nonexistent/x-*.tar': no shards "
                                                      "match"),
    (["--data.train_shards", "/nonexistent/x-*.tar", "--data.synthetic_samples", "0"],
     "data.train_shards='/nonexistent/x-*.tar': no shards match (expected existing .tar shards"),
    (["--data.num_workers", "-2"], "data.num_workers=-2 must be >= 0"),
    (["--model.image_size", "0"], "model.image_size=0 must be >= 32"),
    (["--model.attention_heads", "0"], "model.attention_heads=0 must be >= 1"),
    (["--train.lr_image", "nan"], "train.lr_image=nan: expected a finite number"),
    (["--model.seq_len", "1024"], "model.seq_len=1024: must be <= 512"),
    (["--model.text_model", "/nonexistent/bert"], "model.text_model='/nonexistent/bert': no such folder"),
    (["--model.image_pretrained", "/nonexistent/w.pth"], "model.image_pretrained='/nonexistent/w.pth': no "
                                                         "such file"),
    (["--train.init_from", "/nonexistent/run"], "train.init_from='/nonexistent/run': no such file or folder"),
    (["--train.resume", "/nonexistent/run"], "train.resume='/nonexistent/run': no such file or folder"),
    (["--config", "/nonexistent/config.json"], "--config='/nonexistent/config.json': no such file"),
]


@pytest.mark.parametrize("flags,fragment", TRAIN_FLAGS, ids=[" ".join(f) for f, _ in TRAIN_FLAGS])
def test_train_py_answers_a_bad_flag_in_one_line(flags, fragment, tmp_path):
    result = cli("train.py", "--preset", "tiny", "--train.output_dir", str(tmp_path / "runs"), *flags)
    line = the_line("train.py", result.returncode, result.stdout, result.stderr)
    assert fragment in line, line
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


def test_a_config_file_that_is_not_a_config_is_one_line(tmp_path):
    for text, fragment in (("{not json", "not JSON"), ("[1, 2]", 'expected {"section"'),
                           ('{"model": {"sequence_length": 64}}', "unknown config keys in [model]"),
                           ('{"train": {"epochs": "ten"}}', "train.epochs='ten': expected a whole number")):
        (tmp_path / "c.json").write_text(text)
        result = cli("train.py", "--preset", "tiny", "--config", str(tmp_path / "c.json"))
        assert fragment in the_line("train.py", result.returncode, result.stdout, result.stderr)


# --- the other entry points --------------------------------------------------------------------------------

OTHER_FLAGS = [
    (["evaluate.py", "--ckpt", "x", "--batch-size", "0"], "--batch-size=0: must be >= 1"),
    (["evaluate.py", "--ckpt", "x", "--target-precision", "1.5"],
     "--target-precision=1.5: must be in (0, 1]"),
    (["evaluate.py", "--ckpt", "x", "--num-workers", "-1"], "--num-workers=-1: must be >= 0"),
    (["benchmark.py", "--iters", "0"], "--iters=0: must be >= 1"),
    (["benchmark.py", "--device", "tpu"], "--device='tpu': expected auto, cpu, cuda or cuda:N"),
    (["benchmark.py", "--model", "resnet_nope"], "--model='resnet_nope': not a timm model name"),
    (["benchmark.py", "--batch-sizes", "8,x"], "--batch-sizes='8,x': expected comma-separated whole numbers"),
    (["benchmark.py", "--image-size", "0"], "--image-size=0: must be >= 32"),
    (["compare.py", "--dry-run", "--seeds", "0"], "--seeds=0: must be >= 1"),
    (["compare.py", "--dry-run", "--train.epochs", "0"], "train.epochs=0 must be >= 1"),
    (["compare.py", "--dry-run", "--train-shards", "/nonexistent/x-*.tar", "--test-shards",
      "/nonexistent/y-*.tar"],
     "--train-shards='/nonexistent/x-*.tar': no shards match"),
    (["compare.py", "--dry-run", "--pretrained", "/nonexistent/w.pth"], "--pretrained='/nonexistent/w.pth': "
                                                                        "no such"),
    (["-m", "mgn.shards", "--synthetic", "--image-size", "0"], "--image-size=0: must be >= 32"),
    (["-m", "mgn.shards", "--synthetic", "--cue-strength", "5"], "--cue-strength=5.0 must be in [0, 1]"),
]


@pytest.mark.parametrize("argv,fragment", OTHER_FLAGS, ids=[" ".join(a) for a, _ in OTHER_FLAGS])
def test_every_entry_point_answers_a_bad_flag_in_one_line(argv, fragment, tmp_path):
    argv = [*argv, "--out", str(tmp_path / "out")]
    prog = "python -m mgn.shards" if argv[0] == "-m" else argv[0]
    if prog == "compare.py":
        argv += ["--work", str(tmp_path / "work")]
    result = cli(*argv)
    assert fragment in the_line(prog, result.returncode, result.stdout, result.stderr)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("argv", [["train.py", "--preset", "tiny", "--help"], ["evaluate.py", "--help"],
                                  ["benchmark.py", "--help"], ["compare.py", "--help"],
                                  ["train.py", "--preset", "tiny", "--train.epochs", "-1"],
                                  ["evaluate.py", "--ckpt", "x", "--batch-size", "0"],
                                  ["benchmark.py", "--iters", "0"]])
def test_help_and_flag_errors_answer_before_torch_loads(argv):
    probe = ("import runpy, sys\n"
             f"sys.argv = {argv!r}\n"
             "try:\n"
             f"    runpy.run_path({argv[0]!r}, run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n")
    result = cli("-c", probe)
    assert result.stderr.strip().splitlines()[-1] == "no torch", result.stderr[-2000:]


# --- bad --ckpt paths: evaluate.py, benchmark.py, train.init_from
# ----------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """A valid exported student in a runs folder (no training: tests/test_security.py's `_student`), and bad
    paths made from it."""
    import timm
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mgn.model.export import export_student
    from mgn.model.networks import ImageClassifier
    from tests.conftest import calibrate_batchnorm
    from tests.test_security import _student

    root = tmp_path_factory.mktemp("ckpts")
    model, cfg = _student(root)
    good = export_student(model, cfg, root / "runs" / "good" / "student", formats=("safetensors",))
    cfg.save(root / "runs" / "good" / "config.json")
    (root / "runs" / "latest").symlink_to("good", target_is_directory=True)  # as train.py's point_latest does
    (root / "runs" / "starting").mkdir()
    cfg.save(root / "runs" / "starting" / "config.json")  # a run before its first checkpoint
    shutil.copytree(root / "runs", root / "runs-new", symlinks=True)  # the newest run has no checkpoint yet
    (root / "runs-new" / "latest").unlink()
    (root / "runs-new" / "latest").symlink_to("starting", target_is_directory=True)
    shutil.copytree(root / "runs", root / "runs-nolink", symlinks=True)
    (root / "runs-nolink" / "latest").unlink()
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "random.safetensors").write_bytes(random.Random(0).randbytes(3000))
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({k: v.contiguous() for k, v in timm.create_model("mobileone_s0").state_dict().items()},
              str(root / "timm.safetensors"))  # weights of another tool: no MGN config inside
    with safe_open(str(good), framework="pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    other = json.loads(meta["config.json"])
    other["model"]["image_model"] = "mobileone_s1"  # S0 weights, a config that builds an S1
    save_file(weights, str(root / "other-config.safetensors"), metadata={**meta,
                                                                         "config.json": json.dumps(other)})
    resized = json.loads(meta["config.json"])
    # exported for 64 px: evaluated and timed at 96 px it scored other numbers
    resized["model"]["image_size"] = 96
    save_file(weights, str(root / "other-size.safetensors"), metadata={**meta,
                                                                       "config.json": json.dumps(resized)})
    three = preset_config("tiny", {"objective": {"name": "baseline"}, "model": {"num_classes": 3}})
    torch.manual_seed(0)
    student = ImageClassifier(three.model)
    calibrate_batchnorm(student, image_size=64)
    export_student(student, three, root / "three", formats=("safetensors",))  # a valid student, 3 classes
    return root


CKPT_CASES = [  # (path under the fixture, fragment of the one line)
    ("nowhere", "no such file or folder (expected a run folder"),
    ("empty", "no checkpoint found here, the folder is empty (expected a run folder"),
    ("runs/starting", "a run folder without a checkpoint or exported student yet"),
    ("runs-new", ("a folder of runs; its newest, {root}/runs-new/starting (named by {root}/runs-new/latest), "
                  "holds "
                  "no usable checkpoint")),
    ("runs-nolink", ("a folder of runs, not a run (2 run folders: good, starting); pass one of them, e.g. "
                     "{root}/runs-nolink/good")),
    ("notes.txt", "not a checkpoint file (expected student.safetensors"),
    ("random.safetensors", "cannot read the exported student (SafetensorError"),
    ("truncated.safetensors", "the file is truncated, corrupt or not a student artifact"),
    ("timm.safetensors", "a safetensors file, but not an MGN student"),
    ("other-config.safetensors", "The checkpoint comes from another model config"),
    ("other-size.safetensors", "export.json says input=[3, 64, 64] but the embedded config says [3, 96, 96]"),
]


def load_entry(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_entry", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("where,fragment", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_a_bad_ckpt_is_one_line_naming_the_path_in_evaluate_and_benchmark(ckpts, where, fragment, tmp_path,
                                                                          capsys):
    path = ckpts / where
    fragment = fragment.format(root=ckpts)
    for prog, argv in (("evaluate.py", ["--ckpt", str(path), "--out", str(tmp_path / "eval")]),
                       ("benchmark.py", ["--ckpt", str(path), "--tiny", "--out", str(tmp_path / "b.json")])):
        code = load_entry(prog[:-3]).main(argv)
        out, err = capsys.readouterr()
        line = the_line(prog, code, out, err)
        assert line.startswith(f"{prog}: error: {path}") and fragment in line, line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "b.json").exists()


INIT_CASES = [c for c in CKPT_CASES if c[0] not in ("runs-new",)] + [
    ("runs", ("a folder of runs, not a run; its newest (the one {root}/runs/latest names) is "
              "{root}/runs/good: "
              "pass that run folder")),
    ("three/student.safetensors", "has 3 classes, this run 2: pass --train.init_parts image_encoder"),
]


@pytest.mark.parametrize("where,fragment", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_a_bad_init_from_is_one_line_before_the_run_starts(ckpts, where, fragment, tmp_path, capsys):
    from mgn.cli import run_command

    path = ckpts / where
    train = load_entry("train")
    argv = ["--preset", "tiny", "--train.epochs", "1", "--objective.name", "baseline",
            # the synthetic writer's: not read
            "--data.train_shards", str(tmp_path / "shards" / "train-*.tar"),
            "--data.test_shards", str(tmp_path / "shards" / "test-*.tar"),
            "--train.output_dir", str(tmp_path / "runs"), "--train.init_from", str(path)]
    code = run_command("train.py", lambda: train.main(argv))
    out, err = capsys.readouterr()
    line = the_line("train.py", code, out, err)
    assert (line.startswith(f"train.py: error: train.init_from='{path}'")
            and fragment.format(root=ckpts) in line), line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "shards").exists()  # nothing started


def test_a_runs_folder_stands_for_its_latest_run_and_says_so(ckpts):
    from mgn.checkpoint.read import load_checkpoint
    from mgn.checkpoint.paths import resolve

    notes = []
    assert resolve(ckpts / "runs", notes) == ("artifact",
                                              ckpts / "runs" / "good" / "student" / "student.safetensors")
    assert notes == [(f"{ckpts / 'runs'} is a folder of runs: took its newest run, {ckpts / 'runs' / 'good'} "
                      f"(named by {ckpts / 'runs' / 'latest'})")]
    assert resolve(ckpts / "runs" / "latest") == resolve(ckpts / "runs" / "good")  # the link itself, too
    loaded = load_checkpoint(ckpts / "runs")
    assert loaded.path == ckpts / "runs" / "good" / "student" / "student.safetensors"
    assert "took its newest run" in loaded.notes[0]


# --- as real processes
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_py_on_the_runs_folder_evaluates_its_latest_run(ckpts, tmp_path):
    from mgn.data.writer import write_synthetic

    write_synthetic(tmp_path / "shards", samples=40, image_size=64, seed=0)
    result = cli("evaluate.py", "--ckpt", str(ckpts / "runs"), "--shards",
                 str(tmp_path / "shards" / "test-*.tar"),
                 "--num-workers", "0", "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"note: {ckpts / 'runs'} is a folder of runs: took its newest run, {ckpts / 'runs' / 'good'}" \
        in result.stdout
    assert (tmp_path / "eval" / "eval.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("argv,where", [
    (["evaluate.py"], "runs-nolink"), (["benchmark.py", "--tiny"], "truncated.safetensors"),
    (["train.py", "--preset", "tiny", "--train.epochs", "1", "--train.init_from"],
     "other-config.safetensors")])
def test_a_bad_ckpt_in_a_real_process_is_one_line(ckpts, argv, where, tmp_path):
    flag = [] if argv[0] == "train.py" else ["--ckpt"]
    out = ["--train.output_dir", str(tmp_path / "runs")] if argv[0] == "train.py" else ["--out",
                                                                                        str(tmp_path / "o")]
    result = cli(*argv, *flag, str(ckpts / where), *out)
    line = the_line(argv[0], result.returncode, result.stdout, result.stderr)
    assert str(ckpts / where) in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_each_rank_of_a_two_rank_run_prints_its_one_line(tmp_path):
    """Under torchrun every rank checks its own flags and prints its line; torchrun then reports the failed
    ranks in its own block (its traceback of the launcher, not of the ranks). The first rank to exit makes
    torchrun stop the other (SIGTERM), which may not have printed yet: every rank that exited with 2 printed
    the line, a rank stopped by torchrun may have, and no line says anything else."""
    result = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                 "--preset", "tiny", "--train.output_dir", str(tmp_path / "runs"), "--data.num_workers", "-2")
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error: ")]
    # torchrun's block, a line per rank
    exited_with_2 = len(re.findall(r"exitcode +: 2 \(pid", result.stderr))
    assert 1 <= exited_with_2 <= len(lines) <= 2, result.stderr[-3000:]
    assert set(lines) == {"train.py: error: data.num_workers=-2 must be >= 0"}, result.stderr[-3000:]
    assert result.returncode != 0
    frames = re.findall(r'File "([^"]+)"', result.stdout + result.stderr)
    assert not [f for f in frames if "/mgn/" in f or f.endswith("train.py") and "torch" not in f], frames


def test_the_error_line_is_one_write_so_two_ranks_lines_never_merge(monkeypatch):
    """CI once read `train.py: error: ...>= 0train.py: error: ...>= 0`: under PYTHONUNBUFFERED `print` wrote
    each rank's text and its newline separately and the two ranks' writes interleaved. One write of under
    PIPE_BUF bytes reaches a pipe whole."""
    import io

    from mgn.cli import run_command

    class Recorded(io.StringIO):
        writes: list[str] = []

        def write(self, text):
            self.writes.append(text)
            return super().write(text)

    stream = Recorded()
    monkeypatch.setattr(sys, "stderr", stream)

    def bad():
        raise ValueError("data.num_workers=-2 must be >= 0")

    assert run_command("train.py", bad) == 2
    assert stream.writes == ["train.py: error: data.num_workers=-2 must be >= 0\n"]
