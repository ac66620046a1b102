"""benchmark.py: checks equivalence before timing, refuses the wrong model, writes a complete, valid JSON."""
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mgn.bench import timing
from mgn.bench.latency import (
    BenchmarkError,
    Settings,
    device_defaults,
    has_tf32_row,
    math_used,
    require_deployable,
    run,
    tiny_settings,
)
from mgn.bench.models import check_equivalence, prepare
from mgn.bench.report import PLAIN_FUSED, STUDENT_FUSED, STUDENT_UNFUSED
from mgn.config import Config, ModelConfig
from mgn.model.export import export_student
from mgn.bench.timing import summary_stats

ROOT = Path(__file__).resolve().parents[1]


def strict_json(path: Path) -> dict:
    def no_nan(token):
        raise ValueError(f"not valid JSON: {token}")

    return json.loads(path.read_text(), parse_constant=no_nan)


def entry_main():
    spec = importlib.util.spec_from_file_location("benchmark_entry", ROOT / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_tiny_cpu_run_writes_valid_json_with_the_equivalence_check(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert entry_main()(["--tiny", "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    report = strict_json(out)
    printed = capsys.readouterr().out
    assert "check fused vs unfused" in printed and "random init" in printed and "matmul peak" in printed

    eq = report["equivalence"]
    assert eq["fused_vs_unfused"]["ok"] and eq["fused_vs_unfused"]["same_argmax"]
    assert eq["fused_vs_unfused"]["relative"] <= 1e-4 and eq["student_vs_plain"]["max_abs_diff"] <= 1e-5
    assert eq["fused_vs_unfused"]["max_abs_logit"] < 1e4  # warmed BatchNorm: no 1e7 logits from random init
    assert set(report["models"]) == {STUDENT_UNFUSED, STUDENT_FUSED, PLAIN_FUSED}
    for entry in report["models"].values():
        lat = entry["latency_ms_batch1"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["n"] == 12
        assert entry["throughput"][0]["batch"] == 4 and entry["throughput"][0]["images_per_s"] > 0
        assert entry["flops_per_image"] > 0 and entry["fraction_of_matmul_peak_batch1"] > 0
    # the fused network does fewer FLOPs (MobileOne-S0 has 4 training-time branches); same FLOPs as plain timm
    assert (report["models"][STUDENT_FUSED]["flops_per_image"]
            == report["models"][PLAIN_FUSED]["flops_per_image"])
    assert (report["models"][STUDENT_UNFUSED]["flops_per_image"]
            > 2 * report["models"][STUDENT_FUSED]["flops_per_image"])
    assert report["ratios"]["student_over_plain_p50"] > 0 and report["ratios"]["unfused_over_fused_p50"] > 0
    assert report["matmul_peak"]["gflops"] > 0
    env, settings = report["environment"], report["settings"]
    assert env["torch"] == torch.__version__ and env["timm"] and env["device_type"] == "cpu"
    assert (settings["torch_threads"] == env["torch_threads"] == 1
            and settings["timer"].startswith("time.perf_counter"))
    assert report["model"]["variant"] == "mobileone_s0" and report["model"]["image_size"] == 64
    # end to end from a host batch, and ms/img at the largest batch beside the paper's throughput figure
    e2e = report["end_to_end"]
    assert e2e["model"] == STUDENT_FUSED and not e2e["pinned"] and set(e2e["inputs"]) == {"uint8", "float"}
    for entry in e2e["inputs"].values():
        assert entry["latency_ms_batch1"]["n"] == 12 and entry["throughput"][0]["batch"] == 4
        assert (entry["throughput"][0]["model_only_ms_per_batch_p50"] > 0
                and entry["throughput"][0]["ms_per_img"] > 0)
    big = report["largest_batch"]
    point = report["models"][STUDENT_FUSED]["throughput"][0]
    assert big["batch"] == 4 and big["ms_per_img"] == point["ms_per_img"] == point["ms_per_batch_p50"] / 4
    assert big["paper"]["ms_per_img"] == 0.13 and big["comparable_to_paper"] is False and "note" in big
    assert big["end_to_end_uint8_ms_per_img"] > 0 and "tf32_ms_per_img" not in big
    assert settings["math"] == "fp32 on CPU (no TF32)" and settings["defaults_of"] == "cpu"
    assert "throughput at batch 4 (fp32)" in printed and "0.13 ms/img" in printed and "from uint8" in printed


def test_gpu_defaults_and_the_fp32_tf32_switches_without_a_gpu():
    """What a GPU run would use, checked where none is: defaults by device, TF32 off for fp32, a tf32 row."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on_cpu = device_defaults(Settings(), cpu)
    assert on_cpu.batch_sizes == (8, 32) and on_cpu.matmul_size == 2048 and on_cpu.throughput_iters == 10
    on_gpu = device_defaults(Settings(), cuda)
    assert on_gpu.batch_sizes[-2:] == (256,
                                       512) and on_gpu.matmul_size >= 8192 and on_gpu.throughput_iters == 20
    assert device_defaults(Settings(batch_sizes=(64,)), cuda).batch_sizes == (64,)  # explicit wins
    assert has_tf32_row(on_gpu, cuda) and not has_tf32_row(on_gpu, cpu)
    assert not has_tf32_row(dataclasses.replace(on_gpu, precision="bf16"), cuda)
    assert not has_tf32_row(dataclasses.replace(on_gpu, compile=True), cuda)
    assert "TF32 off" in math_used(on_gpu, cuda, {}) and "tf32" in math_used(on_gpu, cuda, {})

    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    with timing.cuda_math(cpu) as used:  # nothing changes on CPU
        assert used["tf32_matmul"] is None and torch.backends.cudnn.allow_tf32 == saved[2]
    seen = []
    with timing.cuda_math(cuda) as used:  # the switches are plain flags: settable without a GPU
        assert used == {"cudnn_benchmark": True, "tf32_matmul": False, "tf32_cudnn": False}
        assert torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        probe = timing.with_tf32(lambda: seen.append((torch.backends.cuda.matmul.allow_tf32,
                                                      torch.backends.cudnn.allow_tf32)))
        probe()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32  # restored
    assert seen == [(True, True)]
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32) == saved


def test_end_to_end_from_uint8_normalises_as_the_host_does():
    cpu = torch.device("cpu")
    seen = []
    runner = timing.end_to_end(lambda x: seen.append(x) or x.sum(), cpu, torch.float32, torch.channels_last)
    pixels = timing.host_batch(2, 8, "uint8", cpu)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 8, 8, 3)
    runner(pixels)
    runner(timing.host_batch(2, 8, "float", cpu))
    from_uint8, from_float = seen
    assert from_uint8.shape == from_float.shape == (2, 3, 8, 8) and from_uint8.is_contiguous(
        memory_format=torch.channels_last)
    # same pixels, same normalisation
    torch.testing.assert_close(from_uint8, from_float, atol=1e-5, rtol=1e-5)


def test_refuses_to_time_a_train_mode_or_unfused_model():
    models = prepare(variant="mobileone_s0", image_size=64, bn_warmup_batches=1)
    require_deployable(models.fused, "fused")  # the deployed form passes
    require_deployable(models.unfused, "unfused reference", allow_unfused=True)
    with pytest.raises(BenchmarkError, match="not reparameterized"):
        require_deployable(models.unfused, "unfused")
    with pytest.raises(BenchmarkError, match="train mode"):
        require_deployable(models.fused.train(), "fused")


def test_a_broken_fusion_stops_the_run_before_timing(monkeypatch):
    models = prepare(variant="mobileone_s0", image_size=64, bn_warmup_batches=1)
    with torch.no_grad():
        models.fused.encoder.stem.reparam_conv.weight.mul_(1.5)
    eq = check_equivalence(models, rtol=1e-4)
    assert not eq["fused_vs_unfused"]["ok"] and eq["fused_vs_unfused"]["relative"] > 1e-3
    monkeypatch.setattr("mgn.bench.latency.prepare", lambda **kwargs: models)
    with pytest.raises(BenchmarkError, match="outputs disagree before timing"):
        run(tiny_settings(Settings(device="cpu")), variant="mobileone_s0", image_size=64, quiet=True)


def test_benchmarks_an_exported_student_with_its_own_config(tmp_path):
    cfg = Config(model=ModelConfig(image_model="mobileone_s0", image_size=64, num_classes=3))
    student = prepare(variant="mobileone_s0", image_size=64, num_classes=3, bn_warmup_batches=1).unfused
    path = export_student(student, cfg, tmp_path, formats=("safetensors",))
    settings = dataclasses.replace(tiny_settings(Settings(device="cpu")), batch_sizes=(2,), iters=4)
    report = run(settings, ckpt=str(path), quiet=True)
    assert report["model"]["num_classes"] == 3 and report["model"]["weights"].startswith("student checkpoint")
    assert "fused_vs_unfused" not in report["equivalence"] and report["equivalence"]["student_vs_plain"]["ok"]
    assert set(report["models"]) == {STUDENT_FUSED, PLAIN_FUSED}
    assert any("fused weights only" in note for note in report["model"]["notes"])


def test_latency_summary_statistics():
    samples = list(np.arange(1, 101, dtype=float))  # 1 .. 100 ms
    stats = summary_stats(samples)
    assert stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01) and stats["trimmed_mean"] == pytest.approx(50.5)
    assert stats["min"] == 1 and stats["max"] == 100 and stats["n"] == 100
    assert summary_stats([1.0] * 9 + [1000.0])["trimmed_mean"] == pytest.approx(1.0)  # one outlier trimmed


def run_script(tmp_path: Path, name: str, *args: str) -> dict:
    """A standalone benchmark script's JSON, from a run in `tmp_path` (its relative paths, e.g. shards, land
    there)."""
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args, "--out", str(out)],
                   check=True, cwd=tmp_path, timeout=300, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_loader_and_resume_benchmarks_run_and_write_their_figures(tmp_path):
    """The standalone benchmark scripts call the loader's internals; this keeps them in step with it."""
    # stored token ids, tokens, and precomputed caption blocks (data.text_blocks), in alternating epochs
    loader = run_script(tmp_path, "loader_throughput", "--samples", "256", "--workers", "1", "--epochs", "3",
                        "--bare-seconds", "0.3", "--captions", "ids", "tokens", "blocks", "--block-shape",
                        "32,2,2")
    assert loader["images"] == 256 and loader["bare"]["samples_per_s"] > 0
    assert loader["captions"] == ["ids", "tokens", "blocks"]
    assert [(run["captions"], run["workers"], run["samples"]) for run in loader["loader"]] == [
        ("ids", 1, 768), ("tokens", 1, 768), ("blocks", 1, 768)]
    assert all(run["samples_per_s"] > 0 and run["cores_per_gpu"] > 0 for run in loader["loader"])
    resume = run_script(tmp_path, "resume_startup", "--samples", "2000", "--shards", str(tmp_path / "shards"))
    assert resume["workers"] == 2 and resume["batches_per_epoch"] > 0
    assert all(resume[f"{way}_{at}%_s"] > 0 for way in ("raw_skip", "decode_and_discard") for at in (10, 90))


@pytest.mark.slow
def test_the_train_step_benchmark_times_a_bare_pytorch_step_beside_the_engines(tmp_path):
    """benchmarks/train_step.py builds the trainer's engines itself; a tiny run keeps it in step with them."""
    step = run_script(tmp_path, "train_step", "--preset", "tiny", "--steps", "1", "--rounds", "1", "--warmup",
                      "1",
                      "--workers", "0", "--components")
    assert list(step["step_s"])[:3] == ["baseline", "bare", "guided"] and min(step["step_s"].values()) > 0
    assert step["guided_blocks_over_baseline"] == step["step_s"]["guided_blocks"] / step["step_s"]["baseline"]
    assert list(step["components_s"]) == ["image_encoder", "text_encoder", "fusion", "attention", "optimizer"]
    assert min(step["components_s"].values()) > 0 and "part:fusion" not in step["step_s"]
    assert len(step["step_s_rounds"]["bare"]) == 1 and step["warmup_steps"] == 1
    assert step["baseline_over_bare"] == step["step_s"]["baseline"] / step["step_s"]["bare"]
    assert step["precision"] == "fp32" and step["device"] == "cpu" and 0 <= step["data_wait_fraction"] < 1


def test_a_lead_is_confirmed_on_the_fresh_seeds_alone(tmp_path):
    """benchmarks/confirm_seeds.py: the rows of the other seeds do not enter the figures."""
    # looked at
    accuracy = {("baseline", 0): 0.50, ("tram", 0): 0.70, ("baseline", 1): 0.50, ("tram", 1): 0.60,
                ("baseline", 2): 0.60, ("tram", 2): 0.61, ("baseline", 3): 0.60, ("tram", 3): 0.59,  # fresh
                ("baseline", 4): 0.60, ("tram", 4): 0.60}
    rows = [{"setting": "clean/standin", "arm": arm, "seed": seed, "student": {"accuracy": value}}
            for (arm, seed), value in accuracy.items()]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_script(tmp_path, "confirm_seeds", str(results), "--setting", "clean/standin", "--arms", "tram",
                     "--seeds", "2-4")
    paired = out["arms"]["tram"]["paired"]
    assert out["seeds"] == paired["seeds"] == [2, 3, 4]
    assert paired["diffs"] == pytest.approx([0.01, -0.01, 0.0]) and paired["mean"] == pytest.approx(0.0)
    assert (paired["wins"], paired["ties"], paired["losses"]) == (1, 1, 1)
    assert out["arms"]["tram"]["sample_level"] is None  # these rows kept no per-sample record
