"""evaluate.py: every checkpoint kind gives the same student metrics; bad checkpoints fail clearly.

The tiny trained checkpoints come from the real trainer (`python train.py --preset tiny`, ~15 s each):
    baseline-z2/  ZeRO-2: checkpoints/<tag>/ with module states + zero_pp_rank_0_..._optim_states.pt,
                  checkpoints/latest, config.json, student/student.pt2
    guided-z0/    ZeRO-0 guided run (teacher + student): module states only, and its student.pt2
Both read the synthetic shards the tiny preset writes under shards/tiny/ in the working folder.
Tests that use them are marked slow (the two trainings take 30-60 s on 2 cores).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mgn.config import preset_config

from mgn.checkpoint.read import load_checkpoint
from mgn.checkpoint.store import CheckpointError
from mgn.checkpoint.paths import resolve
from mgn.config import Config
from mgn.eval.evaluate import Predictions, format_table, merge, predict, run, summarize
from mgn.eval.metrics import classification_metrics

ROOT = Path(__file__).resolve().parents[1]
IMAGE = 64  # the tiny preset's image size


def train(workdir: Path, name: str, *flags: str) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_",
                                                                     "SLURM_"))}
    # a few tiny steps: one thread is enough, and far faster when other jobs share the two cores
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "--data.synthetic_samples", "160",
           "--train.output_dir", "runs", "--train.run_name", name, *flags]
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("train")
    train(workdir, "baseline-z2", "--objective.name", "baseline", "--train.zero_stage", "2",
          "--train.export_formats", "safetensors,pt2")
    train(workdir, "guided-z0", "--objective.name", "guided", "--train.zero_stage", "0",
          "--train.export_formats", "safetensors,pt2")  # its student.pt2 is read below
    return workdir


@pytest.fixture(scope="module")
def test_shards(runs) -> str:
    return str(runs / "shards" / "tiny" / "test-*.tar")


def labelled_batches(n_batches: int = 3, batch: int = 8, seed: int = 0, with_text: bool = True) -> list[dict]:
    """In-memory batches: images whose brightness depends on the label, with captions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        label = torch.randint(0, 2, (batch,), generator=g)
        image = torch.randn(batch, 3, IMAGE, IMAGE, generator=g) * 0.8 + (label.float() - 0.5).view(-1, 1, 1,
                                                                                                    1)
        item = {"image": image, "label": label, "key": [f"s{seed}-{b}-{i}" for i in range(batch)]}
        if with_text:
            item["input_ids"] = torch.randint(1000, 5000, (batch, 16), generator=g)
            item["attention_mask"] = torch.ones(batch, 16, dtype=torch.long)
        out.append(item)
    return out


def tag_of(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def evaluate_quietly(path, shards: str, out: Path, **kwargs) -> dict:
    return run(path, shards=shards, out_dir=out, quiet=True, num_workers=0, target_precision=0.5, **kwargs)


def student_probs(path, **kwargs) -> np.ndarray:
    preds = predict(load_checkpoint(path, **kwargs), labelled_batches(with_text=False),
                    device=torch.device("cpu"))
    return preds.student


# --- every checkpoint kind, the same student ---------------------------------------------------------------

@pytest.mark.slow
def test_all_checkpoint_kinds_give_identical_student_metrics(runs, test_shards, tmp_path):
    z2, z0 = runs / "runs" / "baseline-z2", runs / "runs" / "guided-z0"
    ways = {  # the same trained student reached through each kind of file
        "ZeRO-2, consolidated by zero_to_fp32 (run folder)": (z2, {"trust": True}),
        "ZeRO-2 tag, module states only": (tag_of(z2), {}),
        "ZeRO-2 run's exported student.safetensors": (z2 / "student" / "student.safetensors", {}),
        "ZeRO-2 run's exported student.pt2": (z2 / "student" / "student.pt2", {}),
    }
    reports = {name: evaluate_quietly(path, test_shards, tmp_path / str(i), **kw)
               for i, (name, (path, kw)) in enumerate(ways.items())}
    kinds = [r["checkpoint"]["kind"] for r in reports.values()]
    assert kinds == ["zero", "deepspeed", "student", "student"]
    reference = reports["ZeRO-2, consolidated by zero_to_fp32 (run folder)"]
    assert reference["samples"] == 24 and reference["checkpoint"]["zero_stage"] == 2
    # deployed (fused) vs training-time (unfused) student on the first batch
    check = reference["fusion_check"]
    assert check["prediction_agreement"] == 1.0 and check["max_abs_diff"] <= 1e-4 * max(1.0,
                                                                                        check["max_abs_logit"])
    for name, report in reports.items():
        for key, value in reference["student"].items():
            assert report["student"][key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float)
                                              else value), (name, key)
    # stronger than equal metrics: equal probabilities, sample by sample
    probs = [student_probs(path, **kw) for path, kw in ways.values()]
    for other in probs[1:]:
        np.testing.assert_allclose(other, probs[0], atol=1e-5)
    # a ZeRO-0 (module states only) guided run and its artifact agree the same way
    np.testing.assert_allclose(student_probs(z0 / "checkpoints" / "latest"), student_probs(z0 / "student"),
                               atol=1e-5)
    assert load_checkpoint(z0).kind == "deepspeed"


@pytest.mark.slow
def test_teacher_and_student_on_the_same_samples(runs, test_shards, tmp_path, capsys):
    out = tmp_path / "eval"
    report = run(runs / "runs" / "guided-z0", shards=test_shards, teacher=True, target_precision=0.5,
                 out_dir=out,
                 tensorboard=tmp_path / "tb", num_workers=0)
    printed = capsys.readouterr().out
    assert ("recall at precision >= 0.5" in printed and "kept" in printed
            and "confusion matrix, teacher" in printed)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["checkpoint"]["kind"] == "deepspeed" and saved["samples"] == report["samples"] == 24
    assert set(saved["student"]) >= {"accuracy", "precision", "recall", "f1", "auroc", "pr_auc",
                                     "confusion_matrix",
                                     "recall_at_precision", "threshold_at_precision"}
    assert saved["teacher"]["samples"] == saved["student"]["samples"]
    assert saved["kept"]["accuracy"] == pytest.approx(saved["student"]["accuracy"]
                                                      / saved["teacher"]["accuracy"])
    # the guided forward also returns the unfused student's logits: every sample checked against the fused one
    assert saved["fusion_check"]["samples"] == 24 and saved["fusion_check"]["prediction_agreement"] == 1.0
    assert (out / "pr_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_distributed_evaluation_matches_one_process(runs, tmp_path):
    """torchrun, 2 ranks over gloo: each reads its shards, rank 0 merges; same samples, same metrics."""
    from mgn.data.writer import write_synthetic

    # 3 test shards
    write_synthetic(tmp_path / "shards", samples=120, image_size=IMAGE, seed=3, max_samples=8)
    shards = str(tmp_path / "shards" / "test-*.tar")
    single = evaluate_quietly(runs / "runs" / "baseline-z2", shards, tmp_path / "one")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "evaluate.py"), "--ckpt", str(runs / "runs" / "baseline-z2"), "--shards", shards,
           "--target-precision", "0.5", "--num-workers", "0", "--out", str(tmp_path / "two")]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two["world_size"] == 2 and two["samples"] == single["samples"] > 16
    for key, value in single["student"].items():  # other thread counts sum in another order: 1e-4, not 1e-6
        assert two["student"][key] == (pytest.approx(value, abs=1e-4) if isinstance(value,
                                                                                    float) else value), key


@pytest.mark.slow
def test_teacher_needs_a_guided_training_checkpoint(runs):
    with pytest.raises(CheckpointError, match="no guided"):
        load_checkpoint(runs / "runs" / "baseline-z2", teacher=True)
    with pytest.raises(CheckpointError, match="holds no text encoder"):
        load_checkpoint(runs / "runs" / "guided-z0" / "student" / "student.pt2", teacher=True)


@pytest.mark.slow
def test_resolve_accepts_every_way_of_pointing_at_a_checkpoint(runs):
    z2 = runs / "runs" / "baseline-z2"
    tag = tag_of(z2)
    for path in (z2, z2 / "checkpoints", z2 / "checkpoints" / "latest", tag,
                 tag / "mp_rank_00_model_states.pt"):
        assert resolve(path) == ("tag", tag), path
    assert resolve(z2 / "student") == ("artifact", z2 / "student" / "student.safetensors")


# --- clear errors
# --------------------------------------------------------------------------------------------

def copy_run(runs: Path, name: str, dst: Path) -> Path:
    shutil.copytree(runs / "runs" / name, dst)
    return dst


@pytest.mark.slow
def test_missing_checkpoint_and_dangling_latest(tmp_path, runs):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found here"):
        load_checkpoint(tmp_path / "empty")
    run_dir = copy_run(runs, "guided-z0", tmp_path / "dangling")
    (run_dir / "checkpoints" / "latest").write_text("step_00000099")
    with pytest.raises(CheckpointError, match="points at tag 'step_00000099'.*does not exist"):
        load_checkpoint(run_dir)


@pytest.mark.slow
def test_corrupt_checkpoints(tmp_path, runs):
    run_dir = copy_run(runs, "guided-z0", tmp_path / "truncated")
    states = tag_of(run_dir) / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tag_of(run_dir))  # the tag named: read as it is (a run folder falls back, below)
    artifact = tmp_path / "student.pt2"
    artifact.write_bytes((runs / "runs" / "baseline-z2" / "student" / "student.pt2").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(artifact)
    shard_run = copy_run(runs, "baseline-z2", tmp_path / "bad-shard")
    next(tag_of(shard_run).glob("*optim_states.pt")).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be consolidated"):
        load_checkpoint(tag_of(shard_run), trust=True)  # without trust the shards are never read


@pytest.mark.slow
def test_a_run_folder_whose_latest_tag_is_damaged_is_read_from_the_newest_intact_tag(tmp_path, runs, caplog):
    # The same verified finder as a resume (mgn.checkpoint.store.newest_intact_tag): a warning, then the older
    # tag.
    run_dir = copy_run(runs, "guided-z0", tmp_path / "damaged-latest")
    damaged = tag_of(run_dir)
    states = damaged / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    older = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p != damaged)
    assert older, "the fixture run keeps more than one tag"
    with caplog.at_level("WARNING", logger="mgn"):
        ckpt = load_checkpoint(run_dir)
    assert ckpt.path == older[-1]
    assert f"checkpoint {damaged} is damaged or incomplete" in caplog.text


def _rewrite_config(states_file: Path, section: str = "model", **changes) -> None:
    states = torch.load(states_file, map_location="cpu", weights_only=True)
    states["config"][section].update(changes)
    torch.save(states, states_file)


@pytest.mark.slow
def test_checkpoint_from_another_model_config(tmp_path, runs):
    # The config saved with the weights names another variant: the weights do not fit what it builds.
    run_dir = copy_run(runs, "guided-z0", tmp_path / "other-variant")
    (run_dir / "config.json").unlink()
    _rewrite_config(tag_of(run_dir) / "mp_rank_00_model_states.pt", image_model="mobileone_s1")
    with pytest.raises(CheckpointError, match="comes from another model config") as info:
        # the tag named: its manifest no longer matches, a run folder falls back
        load_checkpoint(tag_of(run_dir))
    assert "model.image_model='mobileone_s1'" in str(info.value) and "of another shape" in str(info.value)
    # The checkpoint was copied into a run whose config.json describes another model.
    run_dir = copy_run(runs, "guided-z0", tmp_path / "other-run")
    other = Config.load(run_dir / "config.json")
    other.model.num_classes = 3
    other.save(run_dir / "config.json")
    with pytest.raises(CheckpointError, match=r"model.num_classes: checkpoint 2 vs config.json 3"):
        load_checkpoint(run_dir)
    # A guided checkpoint whose saved config says another objective: its guidance weights do not fit.
    run_dir = copy_run(runs, "guided-z0", tmp_path / "objective")
    (run_dir / "config.json").unlink()
    _rewrite_config(tag_of(run_dir) / "mp_rank_00_model_states.pt", "objective", name="tram")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tag_of(run_dir), teacher=True)


def _unlabelled_shards(folder: Path, batch: list[dict]) -> str:
    import webdataset as wds
    from PIL import Image

    folder.mkdir()
    with wds.TarWriter(str(folder / "test-000000.tar")) as tar:
        for i, image in enumerate(batch[0]["image"]):
            pixels = (image.clamp(-1, 1) * 127 + 128).byte().permute(1, 2, 0).numpy()
            tar.write({"__key__": f"u{i:04d}", "jpg": Image.fromarray(pixels), "txt": "a caption"})
    (folder / "sizes.json").write_text(json.dumps({"test-000000.tar": len(batch[0]["image"])}))
    return str(folder / "test-*.tar")


@pytest.mark.slow
def test_shards_without_labels_are_rejected(runs, tmp_path):
    shards = _unlabelled_shards(tmp_path / "unlabelled", labelled_batches(1, with_text=False))
    with pytest.raises(ValueError, match="has no labels"):
        run(runs / "runs" / "baseline-z2" / "student", shards=shards, out_dir=tmp_path / "out", quiet=True)
    ckpt = load_checkpoint(runs / "runs" / "baseline-z2" / "student" / "student.safetensors")
    unlabelled = [{k: v for k, v in b.items() if k != "label"} for b in labelled_batches(1, with_text=False)]
    with pytest.raises(ValueError, match="no labels"):
        predict(ckpt, unlabelled, device=torch.device("cpu"))
    minus_one = labelled_batches(1, with_text=False)
    minus_one[0]["label"] = torch.full_like(minus_one[0]["label"], -1)
    with pytest.raises(ValueError, match=r"outside \[0, 2\).*unlabelled"):
        predict(ckpt, minus_one, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="no samples"):
        predict(ckpt, [], device=torch.device("cpu"))


def test_command_line_entry_reports_errors_without_a_traceback(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_entry", ROOT / "evaluate.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.main(["--ckpt", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error:") and "no such file or folder" in err


# --- pieces
# ------------------------------------------------------------------------------------------------------

def test_merge_drops_samples_read_twice_by_padded_ranks():
    a = Predictions(keys=["x", "y"], labels=np.array([0, 1]), student=np.array([[0.9, 0.1], [0.2, 0.8]]),
                    fusion_max_abs_diff=1e-6, fusion_max_logit=2.0, fusion_pred_agree=1.0, fusion_checked=2)
    b = Predictions(keys=["z", "x"], labels=np.array([1, 0]), student=np.array([[0.4, 0.6], [0.9, 0.1]]))
    merged = merge([a, b])
    assert merged.keys == ["x", "y", "z"] and merged.labels.tolist() == [0, 1, 1]
    assert merged.fusion_checked == 2 and merged.fusion_max_abs_diff == 1e-6
    assert summarize(merged, None)["student"] == classification_metrics(np.array([0, 1, 1]), merged.student)


def test_table_shows_student_teacher_and_kept():
    labels = np.array([0, 0, 1, 1, 1, 0])
    student = np.array([[.8, .2], [.4, .6], [.3, .7], [.6, .4], [.1, .9], [.7, .3]])
    teacher = np.array([[.9, .1], [.8, .2], [.2, .8], [.3, .7], [.1, .9], [.6, .4]])
    report = summarize(Predictions(keys=list("abcdef"), labels=labels, student=student, teacher=teacher), 0.9)
    assert report["teacher"]["accuracy"] == 1.0 and report["kept"]["accuracy"] == pytest.approx(4 / 6)
    table = format_table(report)
    assert "66.7%" in table and "recall at precision >= 0.9" in table and "confusion matrix, teacher" in table


class _CaptionReader(torch.nn.Module):
    """A teacher that ignores the image: class = parity of the first caption token; an empty caption -> 0."""

    cfg = preset_config("tiny")  # what teacher_and_reliance reads the image normalisation from

    def predict_captions(self, image, captions):
        from mgn.model.objectives import Prediction

        student = torch.zeros(len(image), 2)
        outs = []
        for caption in captions:
            cls = (caption["input_ids"][:, 0] % 2) * caption["attention_mask"][:, 0]
            outs.append(Prediction(student=student, teacher=torch.nn.functional.one_hot(cls, 2).float()))
        return outs


def test_caption_reliance_of_a_teacher_that_only_reads_captions():
    from mgn.eval.evaluate import teacher_and_reliance

    batches = labelled_batches(n_batches=3, batch=8)
    for b in batches:  # the caption gives the label away: the first token's parity
        b["input_ids"][:, 0] = 1000 + b["label"]
    labels = torch.cat([b["label"] for b in batches])
    preds, result = teacher_and_reliance(_CaptionReader(), batches, device=torch.device("cpu"))
    assert result["samples"] == 24 and len(preds.keys) == 24
    assert preds.labels.tolist() == labels.tolist()
    assert (preds.teacher.argmax(1) == labels.numpy()).all()  # the own caption: the teacher's predictions
    assert result["teacher_accuracy"] == 1.0 and result["swapped_caption_accuracy"] == 0.0
    assert result["changed_by_swap"] == 1.0
    assert result["empty_caption_accuracy"] == pytest.approx((labels == 0).float().mean().item())


def test_a_teacher_with_non_finite_weights_is_refused_before_it_is_scored():
    from mgn.eval.evaluate import teacher_and_reliance
    from mgn.model.finite import NonFiniteError

    reader = _CaptionReader()
    reader.register_buffer("scale", torch.tensor([float("nan")]))
    with pytest.raises(NonFiniteError, match="the guided teacher"):
        teacher_and_reliance(reader, labelled_batches(), device=torch.device("cpu"))
