"""The comparison runner end to end on tiny data: the arms are paired, results resume, Slurm runs them too."""
import json
from pathlib import Path

import pytest

import compare
from mgn.compare import load_arms, read_results
from mgn.shards import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["slurm_cluster"]  # the session fixture `slurm_cluster` (tests/slurm_cluster.py)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare-shards")
    write_synthetic(out, samples=160, image_size=64, seed=0, max_samples=40)
    return out


def argv(shards: Path, tmp: Path, *extra: str) -> list[str]:
    return ["--train-shards", str(shards / "train-*.tar"), "--test-shards", str(shards / "test-*.tar"),
            "--pretrained", "none", "--arms", "baseline,guided", "--seeds", "2", "--preset", "tiny",
            "--train.epochs", "1", "--train.eval_every", "-1", "--train.ckpt_every", "0",
            "--train.attention_images", "0", "--threads", "1", "--out", str(tmp / "out"), "--work", str(tmp / "work"),
            *extra]


def test_arms_are_data_and_a_bad_arm_is_named(tmp_path):
    extra = tmp_path / "arms.toml"
    extra.write_text('[guided-strong]\nabout = "x"\nobjective = { name = "guided", student_weight = 2.0 }\n')
    arms = load_arms(extra)
    assert arms["guided-strong"].stages[0].overrides == {"objective": {"name": "guided", "student_weight": 2.0}}
    assert "two-stage" in arms and [s.epochs_share for s in arms["two-stage"].stages] == [0.75, 0.25]
    extra.write_text('[typo]\nobjective = { nmae = "guided" }\n')
    with pytest.raises(ValueError, match=r"arm 'typo'.*nmae"):
        load_arms(extra)


@pytest.mark.slow
def test_two_arms_two_seeds_are_paired_written_and_resumed(shards, tmp_path, capsys):
    assert compare.main(argv(shards, tmp_path)) == 0
    printed = capsys.readouterr().out
    rows = read_results(tmp_path / "out" / "results.jsonl")
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("baseline", 0), ("baseline", 1), ("guided", 0),
                                                          ("guided", 1)]
    # Pairing, from what each real run recorded at its start: same student and first batch per seed.
    start = {(r["arm"], r["seed"]): r["start"] for r in rows}
    for seed in (0, 1):
        assert start[("baseline", seed)] == start[("guided", seed)]
    assert start[("baseline", 0)]["student_sha256"] != start[("baseline", 1)]["student_sha256"]
    assert start[("baseline", 0)]["first_batch_keys"] != start[("baseline", 1)]["first_batch_keys"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    entry = summary["settings"]["yours/scratch"]
    assert entry["pairing"]["verified"] and entry["arms"]["guided"]["flops_equal"]
    assert set(entry["arms"]["guided"]["reliance"]) >= {"swapped_caption_accuracy", "empty_caption_accuracy"}
    assert (tmp_path / "out" / "paired.png").stat().st_size > 1000
    assert "4 runs (0 already in" in printed and printed.strip().splitlines()[-1].startswith("Finding:")

    # The same command again: nothing to train. Drop one result: only that run is evaluated again, and its
    # finished training is not repeated (the stage's folder holds it with the same config).
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    (tmp_path / "out" / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    log = tmp_path / "work" / "cells" / "yours-scratch-guided-seed1.log"
    before = log.read_text()
    assert compare.main(argv(shards, tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "4 runs (3 already in" in printed and "[1/1] yours/scratch/guided/seed1" in printed
    assert "MGN: done step=" in before and "MGN: done step=" not in log.read_text()
    assert len(read_results(tmp_path / "out" / "results.jsonl")) == 4


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_runs_a_two_by_one_table(slurm_cluster, shards, tmp_path, capsys):
    extra = ["--slurm", "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "1", "--time", "10"]
    args = argv(shards, tmp_path, *extra)
    args[args.index("--seeds") + 1] = "1"
    assert compare.main(args) == 0, capsys.readouterr().err
    rows = read_results(tmp_path / "out" / "results.jsonl")
    assert sorted(r["arm"] for r in rows) == ["baseline", "guided"]
    printed = capsys.readouterr().out
    assert "submitted 2 Slurm jobs" in printed and "Finding:" in printed
    config = json.loads(Path(rows[0]["run_dirs"][0], "summary.json").read_text())
    assert config["world_size"] == 2  # an ordinary two-rank training job

