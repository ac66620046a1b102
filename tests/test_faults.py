"""Fault injection on the real trainer: killed ranks, damaged checkpoints, NaN losses, a full disk, an
epoch-end resume. Each test proves one promise of README's "What happens when things fail"."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mgn.run_paths import RunPaths
from mgn.data.writer import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
DRIVER = "tests/fault_train.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault-shards")
    write_synthetic(out, samples=320, image_size=64, seed=0, max_samples=64)
    return out


def env(**extra: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                      "LOCAL_RANK",
                                                                      "MASTER_", "MGN_"))}
    return clean | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | extra


def args(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    """train.py's flags for a tiny run, run by tests/fault_train.py: train.py with the MGN_* faults of the
    environment installed (tests/faults.py)."""
    return [DRIVER, "--preset", "tiny", "--data.train_shards", str(shards / "train-*.tar"),
            "--data.test_shards", str(shards / "test-*.tar"), "--data.synthetic_samples", "0",
            "--train.output_dir", str(out), "--train.run_name", name, "--train.log_every", "1", *extra]


def torchrun(*rest: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *rest]


def run(cmd: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    if cmd[0] == DRIVER:
        cmd = [sys.executable, *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=600)


def final_weights(run_dir: Path) -> dict:
    tag = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def ledger(prefix: Path, rank: int, upto: int | None = None) -> list[str]:
    """The sample keys behind each update on one rank (lines 'update key key ...'), up to update `upto`."""
    lines = Path(f"{prefix}.rank{rank}").read_text().splitlines()
    return [line for line in lines if upto is None or int(line.split()[0]) <= upto]


def test_a_rank_killed_mid_epoch_resumes_to_bitwise_the_same_weights_and_samples(shards, tmp_path):
    flags = ("--train.epochs", "2", "--train.ckpt_every", "3", "--train.keep_last", "0", "--data.num_workers",
             "2")
    reference = run(torchrun(*args(shards, tmp_path, "reference", *flags)),
                    MGN_KEY_LEDGER=str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    victim = subprocess.Popen(torchrun(*args(shards, tmp_path, "killed", *flags)), cwd=ROOT,
                              env=env(MGN_KEY_LEDGER=str(tmp_path / "killed")), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for line in victim.stdout:  # step 7 is mid-epoch (17 updates per epoch), past the checkpoint at 6
            if "MGN: step 7/" in line:
                os.kill(_rank_pid(victim.pid, rank=1), signal.SIGKILL)
                break
        victim.communicate(timeout=120)
    finally:
        victim.kill()
    assert victim.returncode != 0
    run_dir = tmp_path / "killed"
    resumed_from = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert resumed_from == 6
    for rank in (0, 1):  # what the killed run did after its last checkpoint is done again: forget it
        kept = ledger(tmp_path / "killed", rank, upto=resumed_from)
        Path(f"{tmp_path / 'killed'}.rank{rank}").write_text("\n".join(kept) + "\n")
    resumed = run(torchrun(*args(shards, tmp_path, "killed", *flags, "--train.resume", "auto")),
                  MGN_KEY_LEDGER=str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000006'}" in resumed.stdout
    for rank in (0, 1):
        assert ledger(tmp_path / "killed", rank) == ledger(tmp_path / "ref", rank)
    ours, theirs = final_weights(run_dir), final_weights(tmp_path / "reference")
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.fixture(scope="module")
def checkpointed(shards, tmp_path_factory) -> Path:
    """One finished single-rank run with verified checkpoints at steps 10, 20, 30 and its last step, 34."""
    out = tmp_path_factory.mktemp("checkpointed")
    result = run(args(shards, out, "base", "--train.epochs", "1", "--train.ckpt_every", "10",
                      "--train.keep_last", "0",
                      "--objective.name", "baseline"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "base"


@pytest.mark.parametrize("damage", ["truncate", "delete", "unfinished"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(checkpointed, shards, tmp_path,
                                                                         damage):
    run_dir = tmp_path / "base"
    shutil.copytree(checkpointed, run_dir)
    latest = run_dir / "checkpoints" / "step_00000034"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == latest.name
    states = latest / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    elif damage == "delete":
        states.unlink()
    else:  # killed while writing: the manifest comes last, so it is missing
        (latest / "manifest.json").unlink()
    (run_dir / "summary.json").unlink()
    result = run(args(shards, tmp_path, "base", "--train.epochs", "2", "--train.ckpt_every", "10",
                      "--objective.name", "baseline", "--train.resume", "auto"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"checkpoint {latest} is damaged or incomplete" in result.stdout + result.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000030'}" in result.stdout


def test_a_missing_rank_file_is_a_warning_naming_what_is_lost(checkpointed, shards, tmp_path):
    run_dir = tmp_path / "base"
    shutil.copytree(checkpointed, run_dir)
    tag = run_dir / "checkpoints" / "step_00000034"
    (tag / "rank_00000.pt").unlink()
    from mgn.checkpoint.store import _write_manifest  # the file was never written: a manifest that agrees

    manifest = json.loads((tag / "manifest.json").read_text())
    _write_manifest(tag, **{k: v for k, v in manifest.items() if k != "files"})
    (run_dir / "summary.json").unlink()
    result = run(args(shards, tmp_path, "base", "--train.epochs", "2", "--objective.name", "baseline",
                      "--train.resume", "auto"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank_00000.pt is missing: rank 0's random-number state is lost" in result.stdout + result.stderr


def test_nan_on_one_rank_is_skipped_by_all_and_repeated_nan_stops_the_run(shards, tmp_path):
    once = run(torchrun(*args(shards, tmp_path, "once", "--train.ckpt_every", "5")), MGN_INJECT_NAN="4:1")
    assert once.returncode == 0, once.stdout[-3000:] + once.stderr[-3000:]
    assert ("MGN: step 4 skipped: non-finite loss, gradient or BatchNorm statistic on some rank (1 in a row"
            in once.stdout)
    weights = final_weights(tmp_path / "once")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

    again = run(torchrun(*args(shards, tmp_path, "again", "--train.ckpt_every", "2",
                               "--train.max_skipped_steps", "3")), MGN_INJECT_NAN="5:0,6:1,7:0")
    assert again.returncode != 0
    log = again.stdout + again.stderr
    assert "3 updates in a row (steps 5-7) had a non-finite loss, gradient or BatchNorm statistic" in log
    assert "--train.run_name again --train.resume auto" in log
    # No checkpoint is written during a run of skipped updates (a rollback must land before the trouble): the
    # one of update 6, in the middle of the run of NaNs, was not; the last good one is that of update 4.
    assert f"Last good checkpoint: {tmp_path / 'again' / 'checkpoints' / 'step_00000004'}" in log
    assert not (tmp_path / "again" / "checkpoints" / "step_00000006").exists()
    for tag in (tmp_path / "again" / "checkpoints").glob("step_*"):
        states = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)["module"]
        assert all(torch.isfinite(v).all() for v in states.values() if v.is_floating_point()), tag
    assert not (tmp_path / "again" / "student").exists()
    # The advice works: resumed with a lower learning rate, which replaces the checkpoint's, the run finishes.
    resumed = run(torchrun(*args(shards, tmp_path, "again", "--train.ckpt_every", "2", "--train.resume",
                                 "auto",
                                 "--train.lr_image", "1e-5")))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "learning rates from this run's config, not the checkpoint's" in resumed.stdout
    assert "image 0.0001 -> 1e-05" in resumed.stdout


def test_a_full_disk_is_a_clear_error_before_writing(shards, small_tmpfs):
    small = small_tmpfs("3m")
    result = run(args(shards, small, "full", "--train.ckpt_every", "5", "--objective.name", "baseline"))
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert f"not enough disk space to save a checkpoint in {small / 'full' / 'checkpoints'}" in log
    assert "Nothing was written" in log
    assert not (small / "full" / "checkpoints" / "latest").exists()
    assert not list((small / "full" / "checkpoints").glob("step_*"))


def test_resuming_from_an_epochs_last_step_repeats_no_tensorboard_point(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 34 updates an epoch
    flags = ("--train.epochs", "2", "--train.ckpt_every", "34", "--train.keep_last", "0")
    first = run(args(shards, tmp_path, "edge", *flags))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = tmp_path / "edge"
    shutil.rmtree(run_dir / "checkpoints" / "step_00000068")
    (run_dir / "checkpoints" / "latest").write_text("step_00000034")
    resumed = run(args(shards, tmp_path, "edge", *flags, "--train.resume", "auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "new best student accuracy" not in resumed.stdout.split("resumed from")[1].split("eval step 68")[0]
    acc = EventAccumulator(str(RunPaths(run_dir).tensorboard), size_guidance={"scalars": 0, "images": 0,
                                                                              "tensors": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), tag
    for tag in acc.Tags()["images"]:
        steps = [e.step for e in acc.Images(tag)]
        assert len(steps) == len(set(steps)), tag


def _rank_pid(launcher_pid: int, rank: int, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return int(child)
        time.sleep(0.5)
    raise TimeoutError(f"rank {rank} worker not found")


def test_a_save_that_fails_on_one_rank_ends_every_rank_with_one_line_and_no_hang(shards, tmp_path):
    # DeepSpeed's save is collective; a write that raised on rank 0 alone took it out of the save while rank 1
    # waited in DeepSpeed's barrier, and both hung until the collective timeout (tiny: 120 s).
    start = time.monotonic()
    result = run(torchrun(*args(shards, tmp_path, "full", "--train.ckpt_every", "3")), MGN_FAIL_SAVE="0")
    took = time.monotonic() - start
    out = result.stdout + result.stderr
    assert result.returncode != 0 and took < 100, (took, out[-3000:])
    # torchrun's own report of the ranks follows
    assert "Traceback" not in out.split("torch/distributed/elastic")[0]
    errors = [line for line in out.splitlines() if "train.py: error:" in line]
    assert len(errors) == 2 and all("writing checkpoint" in line and "failed" in line
                                    for line in errors), errors
    assert all("no earlier checkpoint exists" in line for line in errors)
    assert "No space left on device (injected by MGN_FAIL_SAVE)" in out  # rank 0 says what failed there
    assert not (tmp_path / "full" / "checkpoints" / "step_00000003").exists()  # the partial tag was removed


def _start(cmd: list[str], extra_env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env() | (extra_env or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _read_until(process: subprocess.Popen, marker: str, lines: list[str]) -> None:
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return
    raise AssertionError(f"{marker!r} never came: {''.join(lines)[-3000:]}")


def test_a_second_run_in_a_folder_in_use_stops_with_one_line_naming_the_holder(shards, tmp_path):
    # Both once exited 0 in one folder: metrics.csv held both runs' rows, config and student were the
    # second's.
    first = _start(args(shards, tmp_path, "busy", "--train.epochs", "2"))
    lines = []
    try:
        _read_until(first, "MGN: config", lines)  # training under way, no checkpoint yet
        for extra in ((), ("--train.resume", "auto")):
            second = run(args(shards, tmp_path, "busy", *extra))
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            assert second.stderr.strip().splitlines() == [
                f"train.py: error: {tmp_path / 'busy'} is in use by another run (pid {first.pid} on "
                f"{__import__('socket').gethostname()}, since " + second.stderr.split(", since ")[1].strip()]
        lines += first.communicate(timeout=400)[0].splitlines(keepends=True)
    finally:
        first.kill()
    assert first.returncode == 0, "".join(lines)[-3000:]
    rows = [tuple(row.split(",")[:3])
            for row in (tmp_path / "busy" / "metrics.csv").read_text().splitlines()[1:]]
    assert rows and len(rows) == len(set(rows))  # one run's rows: no (step, epoch, role) twice
    assert (tmp_path / "busy" / ".lock").read_text() == ""  # released: cleared on a clean exit


def test_a_lock_left_by_a_run_that_died_is_taken_over_with_a_line(shards, tmp_path):
    (tmp_path / "dead").mkdir()
    (tmp_path / "dead" / ".lock").write_text('{"host": "gone", "pid": 12345, "since": '
                                             '"2026-01-01T00:00:00"}\n')
    result = run(args(shards, tmp_path, "dead"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (f"took over {tmp_path / 'dead' / '.lock'}: its holder (pid 12345 on gone, since "
            "2026-01-01T00:00:00) "
            f"ended without releasing it") in result.stdout


@pytest.mark.parametrize("stop", ["ctrl-c", "ctrl-c twice", "sigterm"])
def test_ctrl_c_or_sigterm_saves_names_the_resume_and_exits_4_without_a_traceback(shards, tmp_path, stop):
    # Ctrl-C once printed a 36-line KeyboardInterrupt traceback (about 130 with loader workers) and saved
    # nothing; SIGTERM saved but exited 0, so `train.py && evaluate.py` went on with an unfinished run.
    process = _start(args(shards, tmp_path, "stopped", "--train.epochs", "2", "--data.num_workers", "2"),
                     # a save slow enough that the second Ctrl-C always comes during it (on a busy CI machine
                     # the whole save once ended before the second signal was sent)
                     extra_env={"MGN_SLOW_SAVE": "20"} if stop == "ctrl-c twice" else None,
                     # its own process group: Ctrl-C reaches the workers too, as at a TTY
                     start_new_session=True)
    lines = []
    try:
        _read_until(process, "MGN: step 2/", lines)
        group = os.getpgid(process.pid)
        os.killpg(group, signal.SIGTERM if stop == "sigterm" else signal.SIGINT)
        if stop == "ctrl-c twice":
            _read_until(process, "MGN: Ctrl-C: saving", lines)
            os.killpg(group, signal.SIGINT)
        lines += process.communicate(timeout=300)[0].splitlines(keepends=True)
    finally:
        process.kill()
    out = "".join(lines)
    assert process.returncode == 4, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    checkpoints = tmp_path / "stopped" / "checkpoints"
    if stop == "ctrl-c twice":
        assert "MGN: Ctrl-C again: stopping now, without saving" in out
        return
    [saved] = [line for line in lines if "MGN: stopped at step" in line]
    tag = (checkpoints / "latest").read_text().strip()
    assert (f"checkpoint {checkpoints / tag}; to continue: --train.run_name stopped --train.resume auto"
            in saved)
    resumed = run(args(shards, tmp_path, "stopped", "--train.epochs", "2", "--train.resume", "auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
