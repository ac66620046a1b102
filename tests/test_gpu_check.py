"""benchmarks/gpu_check.sh: the GPU acceptance script runs end to end on CPU (--cpu), so it cannot rot."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "train_demo", "evaluate_device", "evaluate_cpu", "bench_s0_bf16", "bench_s0_fp32", "bench_s4_bf16",
         "bench_s4_fp32", "train_step"]


def report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "benchmarks" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_parses_and_answers_help():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True, timeout=30)
    assert "--cpu" in done.stdout and "train_step" in done.stdout and "set -euo" not in done.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--gpus", "2"], capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 2 and "unknown argument '--gpus'" in bad.stderr


def test_a_timeout_a_failure_and_a_skip_each_fail_the_check(tmp_path, capsys):
    """The verdict comes from the records the shell writes; no step is run here."""
    report = report_module()
    steps = tmp_path / "steps"
    steps.mkdir()
    base = {"command": ["python", "x.py"], "seconds": 1.0, "timeout_s": 10, "log": "x.log"}
    records = {"train_demo": {**base, "exit_code": 124, "timed_out": True, "artifact": str(tmp_path / "none.json")},
               "bench_s0_fp32": {**base, "exit_code": 2, "timed_out": False, "artifact": str(tmp_path / "none.json")},
               "evaluate_cpu": {"status": "skipped", "reason": "no checkpoint", "seconds": 0.0},
               "train_step": {**base, "exit_code": 0, "timed_out": False, "artifact": str(tmp_path / "missing.json")}}
    for name, record in records.items():
        (steps / f"{name}.json").write_text(json.dumps({"name": name, **record}))
    assert report.main(["summary", "--out", str(tmp_path), "--mode", "cpu", "--budget", "300", "--seconds", "12",
                        "--steps", *records]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["timeout", "fail", "skipped", "fail"]
    assert not summary["passed"] and summary["within_budget"] and summary["counts"]["timeout"] == 1
    assert "no " in summary["steps"][3]["reason"] and "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_the_gpu_acceptance_script_passes_on_cpu(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "PASS" in done.stdout and "key figures" in done.stdout  # the table

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["passed"] and [s["name"] for s in summary["steps"]] == STEPS
    for step in summary["steps"]:
        assert step["status"] == "pass" and step["seconds"] > 0 and step["timeout_s"] > 0, step
        record = json.loads((out / "steps" / f"{step['name']}.json").read_text())
        assert record["exit_code"] == 0 and record["figures"] and Path(record["artifact"]).exists()
        assert (out / "logs" / f"{step['name']}.log").exists()
    figures = {s["name"]: s["figures"] for s in summary["steps"]}

    train = figures["train_demo"]
    assert train["world_size"] == 1 and train["device"] == "cpu" and train["precision"] == "fp32"
    assert train["steps"] > 0 and train["samples_per_s"] > 0 and Path(train["student"]).exists()
    assert figures["evaluate_device"]["samples"] == figures["evaluate_cpu"]["samples"] > 0
    assert figures["evaluate_cpu"]["accuracy_diff_vs_device"] == 0  # both on CPU here
    for name in ("bench_s0_bf16", "bench_s0_fp32", "bench_s4_bf16", "bench_s4_fp32"):
        bench = figures[name]
        assert bench["variant"] == f"mobileone_{name.split('_')[1]}" and bench["precision"] == name.split("_")[2]
        assert bench["batch"] == 8 and bench["ms_per_img"] > 0 and bench["latency_ms_batch1_p50"] > 0
        assert bench["end_to_end_uint8_ms_per_img"] > 0 and bench["paper_ms_per_img"] == 0.13
        assert bench["comparable_to_paper"] is False  # tiny sizes: 64 px
    step = figures["train_step"]
    assert set(step["step_ms"]) == {"baseline", "bare", "guided", "guided_cached", "guided_blocks"}
    assert step["guided_over_baseline"] > 0 and step["guided_blocks_over_baseline"] > 0
    assert set(step["components_share_of_guided"]) == {"image_encoder", "text_encoder", "fusion", "attention",
                                                       "optimizer"}
    assert 0 <= step["data_wait_fraction"] < 1
    assert step["text_model"]["stand_in"] and step["shapes"]["text_hidden"] == 32
    assert (out / "benchmark" / "s4_fp32.json").exists() and (out / "train_step" / "train_step.json").exists()
