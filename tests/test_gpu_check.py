"""benchmarks/gpu_check.sh: the GPU acceptance script runs end to end on CPU (--cpu), so it cannot rot; and
benchmarks/gpu_check_prepare.sh's bundle installs offline for the GPU test machine's Python 3.12."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PREPARE = ROOT / "benchmarks" / "gpu_check_prepare.sh"
STEPS = ["setup", "env", "train_demo", "evaluate_device", "evaluate_cpu", "bench_s0_bf16", "bench_s0_fp32",
         "bench_s4_bf16", "bench_s4_fp32", "host_syncs", "train_step"]


def report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report",
                                                  ROOT / "benchmarks" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_parses_and_answers_help():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True,
                          timeout=30)
    assert "--cpu" in done.stdout and "--bundle" in done.stdout and "train_step" in done.stdout
    assert "set -euo" not in done.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--gpus", "2"], capture_output=True, text=True, timeout=30,
                         check=False)
    assert bad.returncode == 2 and "unknown argument '--gpus'" in bad.stderr
    subprocess.run(["bash", "-n", str(PREPARE)], check=True)
    prepare = subprocess.run(["bash", str(PREPARE), "--help"], capture_output=True, text=True, check=True,
                             timeout=30)
    assert "64 MiB" in prepare.stdout and "set -euo" not in prepare.stdout


def test_the_gpu_steps_limits_fit_in_420_s_and_a_missing_bundle_stops_the_check(tmp_path):
    """The GPU test machine allows 8 minutes for the whole check: the steps' ceilings add up to <= 420 s."""
    done = subprocess.run(["bash", str(SCRIPT), "--limits"], capture_output=True, text=True, check=True,
                          timeout=30)
    lines = done.stdout.splitlines()
    limits = {name: int(seconds) for name, seconds in (line.split() for line in lines[:-1])}
    assert list(limits) == STEPS and lines[-1].startswith(f"sum {sum(limits.values())} ")
    assert sum(limits.values()) <= 420 and "gpu mode" in lines[-1]
    missing = subprocess.run(["bash", str(SCRIPT), "--bundle", str(tmp_path / "none"), "--out",
                              str(tmp_path / "o")], capture_output=True, text=True, timeout=30, check=False)
    assert missing.returncode == 2 and "gpu_check_prepare.sh" in missing.stderr


def test_the_environment_step_fails_when_deepspeed_does_not_import(tmp_path, monkeypatch):
    report = report_module()
    monkeypatch.setattr(report, "REQUIRED_MODULES", ("torch", "deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    assert report.environment("cpu", tmp_path / "env.json") == 1
    env = json.loads((tmp_path / "env.json").read_text())
    assert not env["ok"] and "import failed" in env["deepspeed"] and "torch" in env["modules"]
    assert any("cannot import deepspeed" in problem for problem in env["problems"])


def test_the_text_forward_must_be_timed_under_training_autocast_with_the_prepared_encoder():
    """train_step's verdict on a GPU: the text forward's figure exists, under bf16 autocast, timed on the
    stand-in that setup prepared (not one train_step.py built for itself)."""
    report = report_module()
    data = {"device": "cuda:0", "precision": "bf16", "micro_batch": 32, "shapes": report.PAPER_SHAPES,
            "text_model": {"path": "/o/train_step/text-standin-distilbert", "stand_in": True},
            "step_s": {"baseline": 0.1, "guided": 0.12}, "guided_over_baseline": 1.2, "loader_workers": 8,
            "data_wait_fraction": 0.01, "guided_samples_per_s_with_loader": 250.0,
            "text_forward_ms_per_sample": 0.05, "text_forward_autocast": "bfloat16"}
    ctx = {"mode": "gpu", "device": "cuda", "precision": "bf16",
           "results": {"setup": {"train_step_standin": "/o/train_step/text-standin-distilbert"}}}
    figures, failed, digest = report.train_step_figures(data, ctx)
    assert not failed and "text forward 0.0500 ms per sample" in digest
    assert report.train_step_figures({**data, "text_forward_autocast": "off"}, ctx)[1]
    assert report.train_step_figures({**data, "text_forward_ms_per_sample": None}, ctx)[1]
    assert report.train_step_figures({**data, "text_model": {"path": "/elsewhere"}}, ctx)[1]


def test_missing_requirements_finds_what_the_bundle_lacks(tmp_path):
    """The closure check CI runs on the bundle: a requirement neither installed nor assumed present, or
    installed at a version that does not satisfy it, is reported; another platform's and an extra's not."""
    report = report_module()

    def dist(name: str, version: str, *requires: str) -> None:
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires))

    dist("alpha", "1.0", "beta>=2", "torch", "gamma", "delta; sys_platform == 'win32'",
         "epsilon; extra == 'dev'")
    dist("beta", "1.5")
    missing = report.missing_requirements(tmp_path, ["torch"], python_version="3.12")
    assert missing == ["alpha needs beta>=2, the bundle has 1.5", "alpha needs gamma"]


def test_a_timeout_a_failure_and_a_skip_each_fail_the_check(tmp_path, capsys):
    """The verdict comes from the records the shell writes; no step is run here."""
    report = report_module()
    steps = tmp_path / "steps"
    steps.mkdir()
    base = {"command": ["python", "x.py"], "seconds": 1.0, "timeout_s": 10, "log": "x.log"}
    records = {"train_demo": {**base, "exit_code": 124, "timed_out": True,
                              "artifact": str(tmp_path / "none.json")},
               "bench_s0_fp32": {**base, "exit_code": 2, "timed_out": False,
                                 "artifact": str(tmp_path / "none.json")},
               "evaluate_cpu": {"status": "skipped", "reason": "no checkpoint", "seconds": 0.0},
               "train_step": {**base, "exit_code": 0, "timed_out": False,
                              "artifact": str(tmp_path / "missing.json")}}
    for name, record in records.items():
        (steps / f"{name}.json").write_text(json.dumps({"name": name, **record}))
    assert report.main(["summary", "--out", str(tmp_path), "--mode", "cpu", "--budget", "300", "--seconds",
                        "12",
                        "--steps", *records]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["timeout", "fail", "skipped", "fail"]
    assert not summary["passed"] and summary["within_budget"] and summary["counts"]["timeout"] == 1
    assert "no " in summary["steps"][3]["reason"] and "FAIL" in capsys.readouterr().out


# The GPU test machine's interpreter and platform, as gpu_check_prepare.sh downloads for them: what pip would
# pick there. Both platform names: pip widens the legacy manylinux2014 to manylinux2010 (psutil's wheel), not
# manylinux_2_17.
GPU_MACHINE_PIP = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                   "--only-binary=:all:",
                   "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


@pytest.mark.slow
def test_the_bundle_is_under_64_mib_and_installs_offline_for_python_3_12(tmp_path):
    """What CI can check of the GPU test machine's install: the prepared folder (downloaded and built from
    scratch here) travels (< 64 MiB), installs with no index for CPython 3.12 on manylinux x86-64, leaves
    nothing its packages need uncovered, and unpacks to the same packages where the machine has no pip."""
    report = report_module()
    bundle = tmp_path / "bundle"
    done = subprocess.run(["bash", str(PREPARE), "--out", str(bundle)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size < 64 * 2**20 and "MiB in" in done.stdout
    assert not list((bundle / "text").glob("*.safetensors")) and (bundle / "text" / "tokenizer.json").exists()
    wanted = report.requirement_lines(bundle)
    assert {line.split("==")[0] for line in wanted} >= {"deepspeed", "pydantic", "pydantic-core", "hjson",
                                                        "webdataset", "braceexpand"}

    target = tmp_path / "site"
    report.install_bundle(bundle, target, GPU_MACHINE_PIP)
    installed = {d.name.split("-")[0].lower().replace("_", "-") for d in target.glob("*.dist-info")}
    assert installed == {line.split("==")[0] for line in wanted}
    assumed = report.read_names(bundle / "assumed-present.txt")
    assert report.missing_requirements(target, assumed, python_version="3.12") == []

    unpacked = tmp_path / "unpacked"
    report.unpack_wheels(bundle / "wheels", wanted, unpacked)
    assert {d.name for d in unpacked.glob("*.dist-info")} == {d.name for d in target.glob("*.dist-info")}
    assert (unpacked / "deepspeed" / "__init__.py").exists()
    assert list((unpacked / "pydantic_core").glob("*cpython-312*.so"))  # the machine's Python, not this one


@pytest.mark.slow
def test_the_gpu_acceptance_script_passes_on_cpu(tmp_path):
    out, results = tmp_path / "check", tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(out), "--results", str(results)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "PASS" in done.stdout and "key figures" in done.stdout  # the table
    assert "text forward, ms per sample: " in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["passed"] and [s["name"] for s in summary["steps"]] == STEPS
    for step in summary["steps"]:
        assert step["status"] == "pass" and step["seconds"] > 0 and step["timeout_s"] > 0, step
        record = json.loads((out / "steps" / f"{step['name']}.json").read_text())
        assert record["exit_code"] == 0 and record["figures"] and Path(record["artifact"]).exists()
        assert (out / "logs" / f"{step['name']}.log").exists()
    figures = {s["name"]: s["figures"] for s in summary["steps"]}

    setup = figures["setup"]  # no bundle on CPU: the text encoders alone, from the installed package
    assert setup["bundle"] is None and setup["text_encoder"] == str(out / "text" / "minilm")
    assert (out / "text" / "minilm" / "model.safetensors").exists() and setup["text_encoder_parameters"] > 0
    assert figures["env"]["versions"]["deepspeed"] and figures["env"]["deepspeed_accelerator"] == "cpu"

    train = figures["train_demo"]
    assert train["world_size"] == 1 and train["device"] == "cpu" and train["precision"] == "fp32"
    assert train["steps"] > 0 and train["samples_per_s"] > 0 and Path(train["student"]).exists()
    assert figures["evaluate_device"]["samples"] == figures["evaluate_cpu"]["samples"] > 0
    assert figures["evaluate_cpu"]["accuracy_diff_vs_device"] == 0  # both on CPU here
    for name in ("bench_s0_bf16", "bench_s0_fp32", "bench_s4_bf16", "bench_s4_fp32"):
        bench = figures[name]
        assert (bench["variant"] == f"mobileone_{name.split('_')[1]}"
                and bench["precision"] == name.split("_")[2])
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
    assert step["text_forward_ms_per_sample"] > 0 and step["text_forward_autocast"] == "off"  # fp32 on CPU
    assert summary["text_forward"]["ms_per_sample"] == step["text_forward_ms_per_sample"]
    assert (out / "benchmark" / "s4_fp32.json").exists() and (out / "train_step" / "train_step.json").exists()
    config = json.loads((out / "runs" / "demo" / "config.json").read_text())
    assert config["model"]["text_model"] == str(out / "text" / "minilm")  # setup's encoder, not the package's

    # --results: what a report needs, without weights, shards or installed packages
    assert (results / "summary.json").exists() and (results / "steps" / "train_step.json").exists()
    assert (results / "train_step" / "train_step.json").exists()
    assert (results / "logs" / "train_demo.log").exists()
    assert not list(results.rglob("*.safetensors")) and not (results / "text").exists()
