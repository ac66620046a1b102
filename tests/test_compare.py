"""The comparison runner end to end on tiny data: the arms are paired, results resume, Slurm runs them too."""
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import compare
from mgn.compare.arms import load_arms
from mgn.compare.ledger import read_results
from mgn.data.writer import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["slurm_cluster"]  # the session fixture `slurm_cluster` (tests/slurm_cluster.py)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare-shards")
    write_synthetic(out, samples=160, image_size=64, seed=0, max_samples=40)
    return out


def argv(shards: Path, tmp: Path, *extra: str) -> list[str]:
    return ["--train-shards", str(shards / "train-*.tar"), "--test-shards", str(shards / "test-*.tar"),
            "--pretrained", "none", "--arms", "baseline,guided", "--seeds", "2", "--pilot-seeds", "2",
            "--ignore-pilot", "a tiny test: two seeds give no pilot reading", "--preset", "tiny",
            "--train.epochs", "1", "--train.eval_every", "-1", "--train.ckpt_every", "0",
            "--train.attention_images", "0", "--threads", "1", "--out", str(tmp / "out"), "--work",
            str(tmp / "work"),
            # the synthetic captions whole: the runner refuses guided arms on cut ones
            "--model.seq_len", "36", *extra]


def test_arms_are_data_and_a_bad_arm_is_named(tmp_path):
    extra = tmp_path / "arms.toml"
    extra.write_text('[guided-strong]\nabout = "x"\nobjective = { name = "guided", student_weight = 2.0 }\n')
    arms = load_arms(extra)
    assert arms["guided-strong"].stages[0].overrides == {"objective": {"name": "guided",
                                                                       "student_weight": 2.0}}
    assert "two-stage" in arms and [s.epochs_share for s in arms["two-stage"].stages] == [0.75, 0.25]
    extra.write_text('[typo]\nobjective = { nmae = "guided" }\n')
    with pytest.raises(ValueError, match=r"arm 'typo'.*nmae"):
        load_arms(extra)


def test_a_two_stage_arm_splits_the_budget_exactly_and_refuses_too_few_epochs(tmp_path):
    from mgn.compare.plan import Cell, Setting
    from mgn.config import preset_config

    arms = load_arms()
    setting = Setting("scarce", "scratch", "train-*.tar", "test-*.tar", 100)
    for epochs, expected in ((10, [8, 2]), (4, [3, 1]), (3, [2, 1])):
        base = preset_config("compare", {"train": {"epochs": epochs}}).to_dict()
        configs = Cell(setting, arms["two-stage"], 0, base).stage_configs(tmp_path)
        assert [c.train.epochs for c in configs] == expected
        assert configs[1].train.init_from == str(configs[0].run_dir)
    with pytest.raises(ValueError, match="1 epochs cannot be split into its 2 stages"):
        Cell(setting, arms["two-stage"], 0, preset_config("compare", {"train": {"epochs": 1}}).to_dict()
             ).stage_configs(tmp_path)


def test_a_stage_folder_from_another_config_is_set_aside_not_resumed(tmp_path):
    from mgn.compare.cell import set_aside_if_stale
    from mgn.config import preset_config

    cfg = preset_config("tiny", {"train": {"output_dir": str(tmp_path), "run_name": "arm-s0"}})
    cfg.run_dir.mkdir()
    other = preset_config("tiny", {"train": {"output_dir": str(tmp_path), "run_name": "arm-s0", "epochs": 3}})
    other.save(cfg.run_dir / "config.json")
    set_aside_if_stale(cfg)
    assert not cfg.run_dir.exists() and len(list(tmp_path.glob("arm-s0.stale-*"))) == 1
    cfg.run_dir.mkdir()
    cfg.save(cfg.run_dir / "config.json")
    set_aside_if_stale(cfg)  # the same config: kept, to be resumed
    assert cfg.run_dir.exists()


def test_settings_choose_and_order_the_plan_and_an_unknown_one_is_named(tmp_path):
    from mgn.compare.plan import Options, choose_settings, pilot_cells, plan, settings_for

    options = Options(work=tmp_path, arms=["baseline", "tram"])
    chosen = choose_settings(settings_for(options), ["decoys/standin-scene", "clean/scratch"])
    cells = plan(options, load_arms(), chosen, {"decoys/standin-scene": 6, "clean/scratch": 5})
    # pilots
    assert [c.setting.name for c in cells[:10]] == ["decoys/standin-scene"] * 5 + ["clean/scratch"] * 5
    # + controls (not oracle-caption: no label is flipped in either data set, so it would be the baseline)
    assert {c.arm.name for c in cells} == {"baseline", "tram", "oracle-attention", "oracle-teacher"}
    assert sum(c.setting.name == "decoys/standin-scene" for c in cells) == 6 * 4
    # where labels are flipped, it runs: the caption's label is then not the stored one
    noisy = choose_settings(settings_for(options), ["noisy/standin"])
    assert "oracle-caption" in {c.arm.name for c in plan(options, load_arms(), noisy, {"noisy/standin": 5})}
    assert pilot_cells(options, load_arms(), chosen) == cells[:10]
    assert not list(tmp_path.iterdir())  # choosing writes nothing
    assert list(choose_settings(settings_for(options), None)) == ["clean/standin"]  # the default: ~90 min
    with pytest.raises(ValueError, match=r"--settings: unknown \['plentiful/pretrained'\]; this plan has"):
        choose_settings(settings_for(options), ["plentiful/pretrained"])


def test_controls_never_run_on_your_own_data(tmp_path):
    from mgn.compare.plan import Options, Setting, chosen_arms

    yours = Setting("yours", "scratch", "train-*.tar", "test-*.tar", 100)
    assert chosen_arms(Options(arms=["all"]), load_arms(), yours) == [
        "baseline", "guided", "guided-unfrozen", "attend-fusion", "no-student-term", "two-stage", "distill",
        "tram",
        "attention-transfer", "caption-dropout"]
    with pytest.raises(ValueError, match="positive controls read the synthetic generator's ground truth"):
        chosen_arms(Options(arms=["guided", "oracle-teacher"]), load_arms(), yours)
    assert load_arms()["oracle-attention"].control and not load_arms()["distill"].control


def test_the_executors_one_loop_saves_each_row_at_once_and_reports_a_failure_without_stopping(tmp_path,
                                                                                              capsys):
    from mgn.compare.executors import collect
    from mgn.compare.plan import Cell, Setting
    from mgn.config import preset_config

    arms = load_arms()
    setting = Setting("scarce", "scratch", "train-*.tar", "test-*.tar", 100)
    base = preset_config("compare", {"train": {"epochs": 2}}).to_dict()
    failed, done = (Cell(setting, arms[name], 0, base) for name in ("guided", "baseline"))
    row = {"key": done.key, "student": {"accuracy": 0.5, "auroc": 0.625}, "train_seconds": 3.0}
    results = tmp_path / "out" / "results.jsonl"
    assert collect(iter([(failed, None, " (job 7): boom"), (done, row, "")]), 2, tmp_path,
                   results) == [failed.key]
    assert read_results(results) == [{**row, "train_samples_seen": 200}]  # 100 samples x 2 epochs
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "MGN compare: [1/2] scarce/scratch/guided/seed0 FAILED (job 7): boom"
    assert printed[1].startswith("MGN compare: [2/2] scarce/scratch/baseline/seed0: student acc 0.500 AUROC "
                                 "0.625 | "
                                 "train 3 s | elapsed")


class _RecordedJob:
    """A job of an earlier runner as submitit sees it: what sacct says, in turn, and what its tasks left."""

    def __init__(self, *states: str, results_on_disk: bool = False, failed: bool = False):
        self.job_id, self._states, self._done, self._failed = "7", list(states), results_on_disk, failed
        self.watcher = self

    def get_state(self, job_id: str, mode: str) -> str:
        assert job_id == "7" and mode == "force"  # the cached answer may predate the job
        return self._states.pop(0) if len(self._states) > 1 else self._states[0]

    def done(self) -> bool:
        return self._done

    def exception(self):
        return RuntimeError("task 0 failed") if self._failed else None


def test_a_restarted_runner_waits_out_sacct_lag_and_resubmits_only_failed_jobs():
    from mgn.compare.executors import worth_reattaching

    # sacct has not recorded the submission yet, then has: the job is re-attached, not submitted twice
    assert worth_reattaching(_RecordedJob("UNKNOWN", "PENDING"), patience_s=10)
    assert worth_reattaching(_RecordedJob("RUNNING"))
    assert not worth_reattaching(_RecordedJob("CANCELLED by 0"))
    assert not worth_reattaching(_RecordedJob("TIMEOUT"))
    # purged from sacct long after it ended: its results on disk decide
    assert worth_reattaching(_RecordedJob("UNKNOWN", results_on_disk=True), patience_s=0)
    assert not worth_reattaching(_RecordedJob("UNKNOWN", results_on_disk=True, failed=True), patience_s=0)
    assert not worth_reattaching(_RecordedJob("UNKNOWN"), patience_s=0)


def test_each_slurm_task_of_a_cell_gets_its_cpus_from_srun_too(tmp_path, sbatch_script):
    """srun does not inherit --cpus-per-task from the job (Slurm >= 22.05): the job's srun passes it."""
    from mgn.compare.executors import slurm_executor, slurm_parameters
    from mgn.compare.plan import Cell, Options, Setting

    options = Options(work=tmp_path, slurm=True, slurm_args={"nodes": 2, "gpus_per_node": 4,
                                                             "cpus_per_task": 6,
                                                             "partition": "gpu", "time": 60})
    cell = Cell(Setting("scarce", "scratch", "train-*.tar", "test-*.tar", 100), load_arms()["guided"], 1, {})
    parameters = slurm_parameters(options, cell)
    assert parameters["cpus_per_task"] == 6 and "--cpus-per-task=6" in parameters["slurm_srun_args"]
    assert (parameters["nodes"], parameters["tasks_per_node"], parameters["gpus_per_node"]) == (2, 4, 4)
    script = sbatch_script(slurm_executor(options, cell))
    assert "#SBATCH --cpus-per-task=6\n" in script and "#SBATCH --ntasks-per-node=4\n" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=6" in srun.split() and "--kill-on-bad-exit=1" in srun.split()


@pytest.fixture
def mgn_warnings(caplog, monkeypatch):
    """The warnings of the 'mgn' logger so far (a training run earlier in the session may have stopped it
    propagating)."""
    monkeypatch.setattr(logging.getLogger("mgn"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="mgn")
    return lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_cut_last_line_is_left_out_reported_once_and_moved_aside_by_the_next_row(tmp_path, mgn_warnings):
    from mgn.compare.ledger import append_result

    results = tmp_path / "results.jsonl"
    whole, cut = json.dumps({"key": "a", "seed": 0}), json.dumps({"key": "b", "seed": 1})
    results.write_text(whole + "\n" + cut[:len(cut) // 2])  # a crash while the second row was written
    assert read_results(results) == read_results(results) == [{"key": "a", "seed": 0}]  # that run: not done
    assert mgn_warnings() == [f"MGN: {results} line 2 is cut off (its writer stopped mid-line): left out, so "
                              f"what it records counts as not done; the next line appended moves it to "
                              f"{results}.cut"]
    append_result(results, {"key": "b", "seed": 1})  # the run done again: its own line, not glued to the cut
    assert read_results(results) == [{"key": "a", "seed": 0}, {"key": "b", "seed": 1}]
    assert (tmp_path / "results.jsonl.cut").read_text() == cut[:len(cut) // 2] + "\n"
    assert len(mgn_warnings()) == 1  # once, in all
    results.write_text(whole + "\n{not json\n")  # a damaged line inside: named once, with what is wrong
    assert read_results(results) == read_results(results) == [{"key": "a", "seed": 0}]
    assert mgn_warnings()[1].startswith(f"MGN: {results} line 2 is not JSON (Expecting property name")
    assert len(mgn_warnings()) == 2


def test_a_study_resumed_after_a_cut_line_runs_that_cell_once_and_its_table_and_pilot_agree(
        tmp_path, monkeypatch, mgn_warnings):
    """The probe: the pilot's second row cut in half, the study resumed. Before, the row done again was glued
    onto the cut one and lost, the pilot read as incomplete, and the cell ran a second time for the table."""
    from mgn.compare import runner
    from mgn.compare.ledger import append_result
    from mgn.compare.plan import Options

    options = Options(work=tmp_path / "work", out=tmp_path / "out", settings=["clean/scratch"],
                      arms=["baseline"], pilot_seeds=2, seeds=2, ignore_pilot="a test")
    results = options.out / "results.jsonl"
    ran, verdict = [], {}

    def execute(pending, settings, options, results_file):  # each cell "runs": its row appended
        for cell in pending:
            ran.append(cell.key)
            append_result(results_file, {
                "key": cell.key, "fingerprint": cell.fingerprint(options.work), "setting": cell.setting.name,
                "arm": cell.arm.name, "seed": cell.seed, "validation": {"student": {"accuracy": 0.8}},
                "train_seconds": 1.0, "train_samples_seen": 1})

    monkeypatch.setattr(runner, "prepare", lambda *args: None)
    monkeypatch.setattr(runner, "check_captions", lambda *args: None)
    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(runner, "write_verdict", lambda options, arms, settings, rows, bench: verdict.update(
        rows=rows, bench=bench))
    settings = runner.choose_settings(runner.settings_for(options), options.settings)
    execute(runner.pilot_cells(options, runner.load_arms(), settings), settings, options, results)
    lines = results.read_text().splitlines()
    results.write_text(lines[0] + "\n" + lines[1][:len(lines[1]) // 2])
    ran.clear()

    runner.run(options)
    seed1 = "clean/scratch/baseline/seed1"
    assert ran.count(seed1) == 1
    assert verdict["bench"]["clean/scratch"]["pilot"]["seeds"] == [0, 1]
    assert sorted(r["seed"] for r in verdict["rows"] if r["arm"] == "baseline") == [0, 1]
    assert [w for w in mgn_warnings() if "results.jsonl line 2" in w] == [mgn_warnings()[0]]  # one line, once
    assert all(json.loads(line) for line in results.read_text().splitlines())


def _state(pid: int) -> str:
    """A process's state letter; 'gone' once it is reaped (a zombie, 'Z', is dead too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _cell_stand_in(tmp: Path) -> list[str]:
    """A 'cell' that writes its pid to tmp/pid, notes a Ctrl-C in tmp/interrupted, would sleep a minute."""
    script = ("import os, sys, time\n"
              "open(sys.argv[1] + '/pid', 'w').write(str(os.getpid()))\n"
              "try:\n    time.sleep(60)\n"
              "except KeyboardInterrupt:\n    open(sys.argv[1] + '/interrupted', 'w').close()\n")
    return [sys.executable, "-c", script, str(tmp)]


def _wait_for(path: Path, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while not (path.exists() and path.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


def test_a_cell_dies_with_its_runner_even_when_the_runner_is_killed(tmp_path):
    """The probe: compare.py SIGKILLed mid-study left its cell training on, beside the same command again."""
    from mgn.compare.cell import run_child

    command = _cell_stand_in(tmp_path)
    runner = multiprocessing.get_context("fork").Process(target=run_child, args=(command, tmp_path / "log"))
    runner.start()
    _wait_for(tmp_path / "pid")
    cell = int((tmp_path / "pid").read_text())
    runner.kill()
    runner.join()
    deadline = time.time() + 10
    while _state(cell) not in ("gone", "Z") and time.time() < deadline:
        time.sleep(0.05)
    assert _state(cell) in ("gone", "Z"), "the cell outlived its runner"


def test_ctrl_c_at_the_runner_reaches_the_cell_in_its_own_group_and_nothing_is_left(tmp_path):
    from mgn.compare.cell import run_child

    def press_ctrl_c() -> None:  # the terminal's Ctrl-C reaches the runner's group only, no longer the cell's
        _wait_for(tmp_path / "pid")
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_child(_cell_stand_in(tmp_path), tmp_path / "cell.log")
    assert (tmp_path / "interrupted").exists()  # passed on: a training cell saves and stops
    assert _state(int((tmp_path / "pid").read_text())) == "gone"


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
    assert ("2 runs planned so far (0 already in" in printed
            and printed.strip().splitlines()[-1].startswith("Finding:"))
    assert "runs its arms anyway: --ignore-pilot 'a tiny test" in printed
    row = rows[0]  # scored once on the test set and on the validation split carved from the training shards
    assert row["test_samples"] == 24 and row["validation"]["samples"] == 34
    assert set(row["per_sample"]) == {"test", "validation"} and row["per_sample"]["test"]["n"] == 24
    predictions = Path(row["run_dirs"][-1], "predictions-test.jsonl").read_text().splitlines()
    assert len(predictions) == 24 and set(json.loads(predictions[0])) == {"key", "label", "log_probs"}
    assert entry["arms"]["guided"]["vs_baseline"]["samples"]["samples"] == 24

    # The same command again: nothing to train. Cut the last result in half, as a crash while writing it
    # would: only that run is evaluated again, its row on a line of its own, and its finished training is not
    # repeated (the stage's folder holds it with the same config).
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    (tmp_path / "out" / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n"
                                                    + lines[-1][:len(lines[-1]) // 2])
    log = tmp_path / "work" / "cells" / "yours-scratch-guided-seed1.log"
    before = log.read_text()
    assert compare.main(argv(shards, tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "4 runs planned so far (3 already in" in printed and "[1/1] yours/scratch/guided/seed1" in printed
    assert "MGN: done step=" in before and "MGN: done step=" not in log.read_text()
    assert len(read_results(tmp_path / "out" / "results.jsonl")) == 4
    assert (tmp_path / "out" / "results.jsonl.cut").read_text() == lines[-1][:len(lines[-1]) // 2] + "\n"

    # Committed results on a fresh checkout (no run folders): the table is written again, nothing trained,
    # and the deployment costs are the ones measured with the runs.
    measured = (json.loads((tmp_path / "out" / "summary.json").read_text())
                ["settings"]["yours/scratch"]["arms"])
    (tmp_path / "work").rename(tmp_path / "elsewhere")
    assert compare.main(argv(shards, tmp_path)) == 0
    printed = capsys.readouterr().out
    assert ("4 runs planned so far (4 already in" in printed and "not measured again" in printed
            and "[1/" not in printed)
    again = json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]["yours/scratch"]["arms"]
    assert again["guided"]["latency_ratio"] == measured["guided"]["latency_ratio"]
    assert again["guided"]["flops_equal"] is True


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_runs_a_two_by_one_table_and_a_restarted_runner_reattaches(slurm_cluster, shards, tmp_path,
                                                                         capsys):
    import os
    import subprocess
    import sys
    import time

    # The test cluster allocates GPUs on nodes without CUDA: the runs train on the CPU on purpose.
    extra = ["--slurm", "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "1", "--time", "10",
             "--train.device", "cpu"]
    args = argv(shards, tmp_path, *extra)
    args[args.index("--seeds") + 1] = args[args.index("--pilot-seeds") + 1] = "1"
    # The runner submits the pilot's job and is killed while it runs: it goes on in Slurm.
    first = subprocess.Popen([sys.executable, "compare.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ledger = tmp_path / "work" / "slurm" / "submitted.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_results(ledger)) < 1:
        time.sleep(1)
    first.kill()
    first.communicate(timeout=30)
    assert len(read_results(ledger)) == 1
    # Started again: it re-attaches to the pilot's job instead of submitting it again, then submits the arm's.
    assert compare.main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "0 Slurm jobs submitted, 1 already queued or done re-attached" in printed and "Finding:" in printed
    assert "1 Slurm jobs submitted, 0 already queued or done re-attached" in printed
    assert len(read_results(ledger)) == 2
    rows = read_results(tmp_path / "out" / "results.jsonl")
    assert sorted(r["arm"] for r in rows) == ["baseline", "guided"]
    assert all("validation" in r and "per_sample" in r for r in rows)
    summary = json.loads(Path(rows[0]["run_dirs"][0], "summary.json").read_text())
    assert summary["world_size"] == 2  # an ordinary two-rank training job


def test_the_code_version_is_dirty_for_changed_code_not_for_the_results_the_runs_write(tmp_path, monkeypatch):
    # a study's own results.jsonl is tracked; its first finished run once marked every later run '+dirty'
    import subprocess

    from mgn.compare import cell

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "benchmarks" / "results" / "bench").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "bench" / "results.jsonl").write_text("")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    monkeypatch.setattr(cell, "REPO", tmp_path)
    commit = cell.code_version()
    assert len(commit) >= 7 and not commit.endswith("+dirty")
    (tmp_path / "benchmarks" / "results" / "bench" / "results.jsonl").write_text("{}\n")
    assert cell.code_version() == commit
    (tmp_path / "code.py").write_text("x = 2\n")
    assert cell.code_version() == commit + "+dirty"
