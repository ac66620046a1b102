"""A diverging run stops clean (one line, exit code 3, nothing non-finite saved) or rolls back by itself.

The divergence is real: the reviewer's learning rate of 1e6, or a one-update learning-rate spike
(MGN_INJECT_LR_SPIKE, tests/faults.py) that drives the BatchNorm statistics to inf while the loss that
step is still finite."""
import json
from pathlib import Path

import pytest
import torch

from tests.test_faults import args, env, ledger, run, shards  # noqa: F401 - `shards` is a fixture

pytestmark = pytest.mark.slow

SPIKE = {"MGN_INJECT_LR_SPIKE": "12:1e30"}  # update 12; the checkpoint of update 10 predates it


def all_finite(run_dir: Path) -> bool:
    tags = list((run_dir / "checkpoints").glob("step_*"))
    for tag in tags:
        weights = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu",
                             weights_only=True)["module"]
        if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            return False
    return bool(tags)


def test_the_reviewers_lr_1e6_run_ends_in_one_clean_message(shards, tmp_path):  # noqa: F811
    result = run(args(shards, tmp_path, "lr", "--train.lr_image", "1e6", "--train.lr_head", "1e6",
                      "--train.ckpt_every", "5"))
    out = result.stdout + result.stderr
    assert result.returncode == 3, out[-3000:]
    assert "Traceback" not in out
    stopped = [line for line in result.stdout.splitlines() if "MGN: stopped:" in line]
    assert len(stopped) == 1, out[-3000:]
    assert ("updates in a row" in stopped[0]
            and "non-finite loss, gradient or BatchNorm statistic" in stopped[0])
    assert "Lower the learning rate" in stopped[0]
    checkpoints = tmp_path / "lr" / "checkpoints"
    assert not checkpoints.exists() or all_finite(tmp_path / "lr")  # nothing non-finite was ever written


def test_a_spike_under_stop_names_the_last_good_checkpoint_and_the_resume(shards, tmp_path):  # noqa: F811
    result = run(args(shards, tmp_path, "stop", "--train.ckpt_every", "10", "--train.max_skipped_steps", "2"),
                 **SPIKE)
    out = result.stdout + result.stderr
    assert result.returncode == 3, out[-3000:]
    assert "Traceback" not in out
    assert f"Last good checkpoint: {tmp_path / 'stop' / 'checkpoints' / 'step_00000010'}" in result.stdout
    assert "--train.run_name stop --train.resume auto --train.lr_" in result.stdout
    assert all_finite(tmp_path / "stop")
    assert list((tmp_path / "stop" / "tb").rglob("events.out.tfevents.*"))  # TensorBoard written and closed


def test_a_spike_under_rollback_goes_back_skips_the_batches_and_finishes_finite(
        shards, tmp_path):  # noqa: F811
    result = run(args(shards, tmp_path, "rb", "--train.ckpt_every", "10", "--train.max_skipped_steps", "2",
                      "--train.on_divergence", "rollback", "--train.rollback_skip_updates", "1",
                      "--train.rollback_lr_scale", "0.5"), MGN_KEY_LEDGER=str(tmp_path / "ledger"), **SPIKE)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "MGN: rollback 1/3:" in result.stdout
    summary = json.loads((tmp_path / "rb" / "summary.json").read_text())
    [record] = summary["rollbacks"]
    assert record["resumed_step"] == 10 and record["at_step"] == 14 and record["lr_scale"] == 0.5
    # the run learns of a skipped update one update later (mgn/train/loop.py), so update 15's micro-batch was
    # read too
    assert record["skipped_micro_batches"] == 5 and record["margin_micro_batches"] == 1
    skipped = (tmp_path / "rb" / "rollbacks" / "rollback_1.rank0.txt").read_text().split()
    assert len(skipped) == (5 + 1) * 8  # micro-batches since the checkpoint and the margin, 8 samples each
    # The updates after the rollback read none of the skipped samples: the ledger's second update 11 onwards.
    lines = ledger(tmp_path / "ledger", 0)
    restart = [i for i, line in enumerate(lines) if line.split()[0] == "11"][1]
    trained_after = {key for line in lines[restart:] for key in line.split()[1:]}
    assert trained_after and not trained_after & set(skipped)
    assert all_finite(tmp_path / "rb")
    assert torch.isfinite(torch.tensor([summary["student_accuracy"]])).all()
