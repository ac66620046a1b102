"""Latency and throughput of the deployed student: reparameterized MobileOne + head (or another timm backbone
as trained).

    require_deployable() -> refuse to time a model in train mode, or one not reparameterized
    run(...)             -> the whole of `python benchmark.py`: check, time, table + JSON

The models to time (student unfused / fused, plain timm model of the same backbone with the same weights)
and the check that they agree are mgn/bench/models.py; the table printed from the JSON is
mgn/bench/report.py. How each model is timed (clocks, interleaved rounds, throughput, FLOPs, matmul peak,
the machine) is mgn/bench/timing.py. On CPU, time is `time.perf_counter` around each call with a stated thread
count; on GPU, CUDA events with synchronisation, cuDNN autotuning on and TF32 off ("fp32" is IEEE fp32; a
separate `tf32` row shows what TF32 gives). Everything runs under `torch.inference_mode`, with fixed input
shapes.

Model-only times start from a batch already on the device. The deployed student is also timed end to end,
from a host batch (uint8 NHWC as the loader's workers make it, and normalised float32) that is copied to
the device (from pinned memory on GPU), cast and normalised there. Throughput is reported as ms/img at the
largest batch too, beside the paper's throughput figure for MobileOne-S4 (0.13 ms/img on a V100).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mgn.bench import timing
from mgn.bench.models import Models, check_equivalence, prepare, realistic_images
from mgn.bench.report import (
    CLIP_TOWER,
    PLAIN_FUSED,
    STUDENT_FUSED,
    STUDENT_TF32,
    STUDENT_UNFUSED,
    format_report,
)
from mgn.distributed import pick_device
from mgn.model.export import has_reparameterization, unfused_modules

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HOST_INPUTS = ("uint8", "float")  # end-to-end: the host batch's form (mgn.bench.timing.host_batch)
# Defaults that depend on the device (a Settings field left at None takes these): an H200 needs large batches
# to be busy, and a matmul large enough to reach its peak.
DEVICE_DEFAULTS = {"cpu": {"batch_sizes": (8, 32), "throughput_iters": 10, "matmul_size": 2048},
                   "cuda": {"batch_sizes": (32, 64, 128, 256, 512), "throughput_iters": 20,
                            "matmul_size": 8192}}
# Issue 25: the paper's MobileOne-S4 figure is a throughput (batched) figure, not batch-1 latency.
PAPER_THROUGHPUT = {"model": "mobileone_s4", "image_size": 224, "device": "NVIDIA V100", "ms_per_img": 0.13,
                    "kind": "throughput at a large batch (ms per image), not batch-1 latency"}


@dataclass
class Settings:
    device: str = "auto"
    precision: str = "fp32"  # fp32 | fp16 | bf16
    channels_last: bool = False
    compile: bool = False  # torch.compile the timed models
    threads: int = 0  # CPU threads for torch; 0: torch's default
    warmup: int = 10
    iters: int = 100  # timed batch-1 calls per model
    rounds: int = 5  # the models take turns in this many rounds, so drift hits them alike
    batch_sizes: tuple[int, ...] | None = None  # throughput batch sizes; None: DEVICE_DEFAULTS of the device
    throughput_iters: int | None = None
    matmul_size: int | None = None
    compare_unfused: bool = True  # also time the unfused student (the only unfused model ever timed)
    rtol: float = 1e-3  # fused vs unfused: max |diff| / max |logit| (trained BN can amplify fp32 rounding)
    bn_warmup_batches: int = 4  # random init only: train-mode passes that give BatchNorm realistic statistics
    end_to_end: bool = True  # also time the deployed student from a host batch (copy + cast + normalise)
    tf32_row: bool = True  # CUDA, fp32, no compile: also time the deployed student with TF32 allowed
    cudnn_benchmark: bool = True  # CUDA: cuDNN autotuning for the fixed shapes timed


class BenchmarkError(RuntimeError):
    pass


# --- what may be timed
# ----------------------------------------------------------------------------------------

def require_deployable(model: nn.Module, name: str, allow_unfused: bool = False) -> None:
    """Refuse to time what is not the deployed form, unless it is the explicit unfused reference."""
    if model.training:
        raise BenchmarkError(f"{name}: model is in train mode; timing it would measure the wrong thing (call "
                             "eval())")
    leftovers = unfused_modules(model) if has_reparameterization(model) else []  # others deploy as trained
    if leftovers and not allow_unfused:
        raise BenchmarkError(f"{name}: not reparameterized ({len(leftovers)} BatchNorm/branch modules left, "
                             "e.g. "
                             f"{leftovers[:3]}); fuse it, or time it only as the unfused comparison")


def select_device(name: str) -> torch.device:
    """--device auto | cpu | cuda | cuda:N through mgn.distributed.pick_device (cuda:N: the GPU of local rank
    N)."""
    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise BenchmarkError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if index and torch.cuda.is_available() and int(index) >= torch.cuda.device_count():
        raise BenchmarkError(f"--device {name}: this machine shows {torch.cuda.device_count()} GPU(s) to "
                             "torch")
    try:
        return pick_device(kind, int(index or 0), flag="--device")
    except RuntimeError as error:  # no CUDA, or no GPU N: one line from the command, not a traceback
        raise BenchmarkError(f"--device {name}: {error}") from error


# --- the command
# ---------------------------------------------------------------------------------------------

def device_defaults(settings: Settings, device: torch.device) -> Settings:
    """Fill the fields left at None with the defaults of the device type (DEVICE_DEFAULTS)."""
    defaults = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    return replace(settings, **{k: v for k, v in defaults.items() if getattr(settings, k) is None})


def tiny_settings(settings: Settings) -> Settings:
    """Seconds-long run for tests and smoke checks: few iterations, small batches and matmul. BatchNorm still
    gets 4 warm-up passes (milliseconds at 64 px): with one, MobileOne-S4's random-init logits reach ~100 and
    fp32 rounding alone fails the fused vs unfused check."""
    return replace(settings, warmup=2, iters=12, rounds=2, batch_sizes=(4,), throughput_iters=3,
                   matmul_size=256,
                   bn_warmup_batches=4)


def run(settings: Settings, *, ckpt: str | None = None, variant: str = "mobileone_s4",
        image_size: int | None = None,
        num_classes: int = 2, out: str | Path | None = None, quiet: bool = False, trust: bool = False,
        clip: str | None = None) -> dict:
    """Prepare, check, time, report. Returns the JSON-able result (also written to `out`)."""
    s = settings
    if s.precision not in DTYPES:
        raise ValueError(f"--precision {s.precision!r}: expected one of {sorted(DTYPES)}")
    device = select_device(s.device)
    s = device_defaults(s, device)
    if device.type == "cuda":
        # the timer's synchronize() and the pinned copies use the current device
        torch.cuda.set_device(device)
    if s.threads:
        torch.set_num_threads(s.threads)
    threads = torch.get_num_threads()
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    models = prepare(ckpt=ckpt, variant=variant, image_size=image_size, num_classes=num_classes,
                     bn_warmup_batches=s.bn_warmup_batches, trust=trust)
    equivalence = check_equivalence(models, s.rtol)
    failed = [k for k in ("fused_vs_unfused",
                          "student_vs_plain") if k in equivalence and not equivalence[k]["ok"]]
    if failed:
        raise BenchmarkError(f"outputs disagree before timing ({', '.join(failed)}): "
                             f"{json.dumps(equivalence)}")

    with timing.cuda_math(device, s.cudnn_benchmark) as math:
        candidates, sizes = timed_models(models, s.compare_unfused, clip)
        flops, runners = make_runners(candidates, sizes, models.image_size, s, device)
        if s.precision != "fp32":  # what the reduced precision costs in accuracy, on the timed device
            equivalence["reduced_precision_vs_fp32"] = reduced_precision_check(models, runners[STUDENT_FUSED],
                                                                               s,
                                                                               device)
        results, latency, peak, end_to_end = measure(runners, flops, models.image_size, s, device)
        environment = timing.environment(device, threads)
    ratios = latency_ratios(results, latency)
    if CLIP_TOWER in results:
        results[CLIP_TOWER]["image_size"] = sizes[CLIP_TOWER]
    report = {
        "model": {"variant": models.variant, "image_size": models.image_size,
                  "num_classes": models.num_classes,
                  "weights": models.weights, "notes": models.notes,
                  "timed": "student = timm encoder + ClassifierHead(avg, fc); plain = timm.create_model("
                           "variant, num_classes=K) with the same weights; fused = timm "
                           "reparameterize_model in eval mode (a backbone without one: as trained)"},
        "settings": {**asdict(s), "batch_sizes": list(s.batch_sizes), "device": str(device),
                     "torch_threads": threads,
                     "timer": "CUDA events + synchronize" if device.type == "cuda" else "time.perf_counter "
                                                                                        "per call",
                     "inference_mode": True, "defaults_of": device.type, "math": math_used(s, device, math),
                     **{k: v for k, v in math.items() if v is not None}},
        "environment": {**environment, "load_average_1min_start": load_at_start},
        "equivalence": equivalence, "models": results, "ratios": ratios, "matmul_peak": peak,
        "end_to_end": end_to_end,
        "largest_batch": largest_batch(results, end_to_end, models, s),
    }
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    if not quiet:
        print(format_report(report))
        if out:
            print(f"wrote {out}")
    return report


def timed_models(models: Models, compare_unfused: bool, clip: str | None) -> tuple[dict, dict]:
    """The models to time, by their name in the report, and the input side each is timed at."""
    candidates = {STUDENT_FUSED: models.fused, PLAIN_FUSED: models.plain}
    if compare_unfused and models.unfused is not None:
        candidates = {STUDENT_UNFUSED: models.unfused, **candidates}
    sizes = dict.fromkeys(candidates, models.image_size)
    if clip:  # the paper's other baseline, timed by the same protocol at its own input size
        from mgn.eval.clip import load_clip

        clip_model = load_clip(clip)
        candidates[CLIP_TOWER] = clip_model
        sizes[CLIP_TOWER] = clip_model.image_size
    return candidates, sizes


def math_used(s: Settings, device: torch.device, math: dict) -> str:
    """In words, what "precision" meant for the timed rows."""
    if device.type != "cuda":
        return f"{s.precision} on CPU (no TF32)"
    if s.precision == "fp32":
        tf32 = f"; the {STUDENT_TF32!r} row allows TF32" if has_tf32_row(s, device) else ""
        return (f"IEEE fp32: TF32 off for matmul and cuDNN (torch.backends.cuda.matmul.allow_tf32 = "
                f"torch.backends.cudnn.allow_tf32 = False){tf32}")
    return f"{s.precision} weights and inputs (TF32 switches off; they do not apply to {s.precision} kernels)"


def has_tf32_row(s: Settings, device: torch.device) -> bool:
    return device.type == "cuda" and s.precision == "fp32" and s.tf32_row and not s.compile


def memory_format(s: Settings) -> torch.memory_format:
    return torch.channels_last if s.channels_last else torch.contiguous_format


def make_runners(candidates: dict[str, nn.Module], sizes: dict[str, int], size: int, s: Settings,
                 device: torch.device) -> tuple[dict[str, int], dict]:
    """FLOPs per image of each model (fp32, CPU), and its timed copy: on the device, in the precision and
    memory format asked for, compiled if asked, fed at its own input size."""
    flops, runners = {}, {}
    for name, model in candidates.items():
        require_deployable(model, name, allow_unfused=name in (STUDENT_UNFUSED, CLIP_TOWER))
        flops[name] = timing.count_flops(model.float().cpu(), torch.zeros(1, 3, sizes[name], sizes[name]))
        model = copy.deepcopy(model).to(device=device, dtype=DTYPES[s.precision],
                                        memory_format=memory_format(s)).eval()
        runners[name] = timing.at_own_size(torch.compile(model) if s.compile else model, sizes[name], size)
    if has_tf32_row(s, device):  # the same timed module, with TF32 allowed during its calls
        flops[STUDENT_TF32] = flops[STUDENT_FUSED]
        runners[STUDENT_TF32] = timing.with_tf32(runners[STUDENT_FUSED])
    return flops, runners


def reduced_precision_check(models: Models, fused_runner, s: Settings, device: torch.device) -> dict:
    """The timed fused student in fp16/bf16 against the fp32 one on CPU, on the same images."""
    x = realistic_images(4, models.image_size, torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = models.fused.float().cpu()(x)
        low = fused_runner(x.to(device,
                                DTYPES[s.precision]).contiguous(memory_format=memory_format(s))).float().cpu()
    return {"precision": s.precision, "max_abs_diff": (low - reference).abs().max().item(),
            "max_abs_logit": reference.abs().max().item(),
            "same_argmax": bool((low.argmax(1) == reference.argmax(1)).all())}


def measure(runners: dict, flops: dict[str, int], size: int, s: Settings,
            device: torch.device) -> tuple[dict, dict[str, list[float]], dict, dict | None]:
    """Batch-1 latency (interleaved), throughput at each batch size, the matmul peak they are set against, and
    the deployed student end to end from host batches (timed in the same rounds and at the same batch
    sizes)."""
    dtype, layout, timer = DTYPES[s.precision], memory_format(s), timing.Timer(device)
    one = torch.randn(1, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=layout)
    e2e = {kind: timing.end_to_end(runners[STUDENT_FUSED], device, dtype, layout) for kind in HOST_INPUTS} \
        if s.end_to_end else {}
    hosts = {kind: timing.host_batch(1, size, kind, device) for kind in e2e}
    # each end-to-end runner ignores the device batch it is handed and starts from its own host batch
    timed = {**runners, **{f"end-to-end {kind}": (lambda x, fn=fn, kind=kind: fn(hosts[kind]))
                           for kind, fn in e2e.items()}}
    latency = timing.time_latency(timed, one, timer, s.warmup, s.iters, s.rounds)
    results = {}
    for name in runners:
        stats = timing.summary_stats(latency[name])
        results[name] = {"flops_per_image": flops[name], "latency_ms_batch1": stats,
                         "achieved_gflops_batch1": flops[name] / (stats["p50"] / 1e3) / 1e9, "throughput": []}
    end_to_end = end_to_end_report(device, latency, results) if e2e else None
    for batch in s.batch_sizes:
        inputs = torch.randn(batch, 3, size, size, device=device,
                             dtype=dtype).contiguous(memory_format=layout)
        for name, fn in runners.items():
            point = throughput_point(fn, inputs, batch, timer, s)
            if "ms_per_batch_p50" in point:
                point["achieved_gflops"] = flops[name] * batch / (point["ms_per_batch_p50"] / 1e3) / 1e9
            results[name]["throughput"].append(point)
        del inputs
        for kind, fn in e2e.items():
            host = timing.host_batch(batch, size, kind, device)
            point = throughput_point(fn, host, batch, timer, s)
            model_only = results[STUDENT_FUSED]["throughput"][-1].get("ms_per_batch_p50")
            if "ms_per_batch_p50" in point and model_only:
                point["model_only_ms_per_batch_p50"] = model_only
                point["over_model_only"] = point["ms_per_batch_p50"] / model_only
            end_to_end["inputs"][kind]["throughput"].append(point)
    peak = timing.matmul_peak(device, dtype, s.matmul_size, timer)
    peaks = {name: peak for name in results}
    if STUDENT_TF32 in results:
        peaks[STUDENT_TF32] = peak["tf32"] = timing.with_tf32(timing.matmul_peak)(device, dtype,
                                                                                  s.matmul_size, timer)
    for name, entry in results.items():
        entry["fraction_of_matmul_peak_batch1"] = entry["achieved_gflops_batch1"] / peaks[name]["gflops"]
        for point in entry["throughput"]:
            if "achieved_gflops" in point:
                point["fraction_of_matmul_peak"] = point["achieved_gflops"] / peaks[name]["gflops"]
    return results, latency, peak, end_to_end


def throughput_point(fn, inputs: torch.Tensor, batch: int, timer: timing.Timer, s: Settings) -> dict:
    """One throughput measurement; a batch that does not fit in GPU memory is recorded as such, not fatal."""
    try:
        return timing.time_throughput(fn, inputs, timer, warmup=2, iters=s.throughput_iters)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"batch": batch, "error": "CUDA out of memory"}


def end_to_end_report(device: torch.device, latency: dict[str, list[float]], results: dict) -> dict:
    pinned = device.type == "cuda"
    copy = "copied to the GPU (non_blocking) from pinned host memory" if pinned else "(on CPU: no copy)"
    forms = {"uint8": "uint8 NHWC pixels as the loader's workers collate them; cast and normalised on the "
                      "device",
             "float": "ImageNet-normalised float32 NCHW, as the main process hands batches over today; cast "
                      "on "
                      "the device"}
    out = {"model": STUDENT_FUSED, "pinned": pinned,
           "includes": f"host batch {copy}, cast to the timed dtype and layout, normalised, then the model; "
                       f"model-only rows start from a batch already on the device", "inputs": {}}
    model_p50 = results[STUDENT_FUSED]["latency_ms_batch1"]["p50"]
    for kind in HOST_INPUTS:
        stats = timing.summary_stats(latency.pop(f"end-to-end {kind}"))
        out["inputs"][kind] = {"input": forms[kind], "latency_ms_batch1": stats,
                               "latency_over_model_only_p50": stats["p50"] / model_p50, "throughput": []}
    return out


def largest_batch(results: dict, end_to_end: dict | None, models: Models, s: Settings) -> dict | None:
    """ms/img of the deployed student at the largest batch that ran, beside the paper's throughput figure."""
    points = [p for p in results[STUDENT_FUSED]["throughput"] if "ms_per_img" in p]
    if not points:
        return None
    point = max(points, key=lambda p: p["batch"])
    out = {"model": STUDENT_FUSED, "batch": point["batch"], "precision": s.precision,
           "ms_per_img": point["ms_per_img"],
           "images_per_s": point["images_per_s"]}
    for name, key in ((PLAIN_FUSED, "plain_ms_per_img"), (STUDENT_TF32, "tf32_ms_per_img")):
        match = [p for p in results.get(name, {}).get("throughput", []) if p["batch"] == point["batch"]]
        if match and "ms_per_img" in match[0]:
            out[key] = match[0]["ms_per_img"]
    for kind, entry in (end_to_end or {}).get("inputs", {}).items():
        match = [p for p in entry["throughput"] if p["batch"] == point["batch"] and "ms_per_img" in p]
        if match:
            out[f"end_to_end_{kind}_ms_per_img"] = match[0]["ms_per_img"]
    same = models.variant == PAPER_THROUGHPUT["model"] and models.image_size == PAPER_THROUGHPUT["image_size"]
    out["paper"] = PAPER_THROUGHPUT
    out["over_paper"] = point["ms_per_img"] / PAPER_THROUGHPUT["ms_per_img"]
    out["comparable_to_paper"] = same
    if not same:
        out["note"] = (f"timed {models.variant} at {models.image_size} px; the paper's figure is "
                       f"{PAPER_THROUGHPUT['model']} at {PAPER_THROUGHPUT['image_size']} px")
    return out


def latency_ratios(results: dict, latency: dict[str, list[float]]) -> dict:
    p50 = {name: r["latency_ms_batch1"]["p50"] for name, r in results.items()}
    trimmed = {name: r["latency_ms_batch1"]["trimmed_mean"] for name, r in results.items()}
    ratios = {"student_over_plain_p50": p50[STUDENT_FUSED] / p50[PLAIN_FUSED],
              "student_over_plain_trimmed_mean": trimmed[STUDENT_FUSED] / trimmed[PLAIN_FUSED],
              # noise floor: how much the same model's p50 moves between the first and second half of its
              # samples
              "student_p50_half_to_half": _half_ratio(latency[STUDENT_FUSED])}
    if STUDENT_UNFUSED in results:
        ratios["unfused_over_fused_p50"] = p50[STUDENT_UNFUSED] / p50[STUDENT_FUSED]
    if CLIP_TOWER in results:
        ratios["student_over_clip_p50"] = p50[STUDENT_FUSED] / p50[CLIP_TOWER]
    return ratios


def _half_ratio(samples: list[float]) -> float:
    half = len(samples) // 2
    return float(np.median(samples[half:]) / np.median(samples[:half])) if half else float("nan")
