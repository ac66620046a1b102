"""Latency and throughput of the deployed student: reparameterized MobileOne + head.

    prepare(...)        -> the models to time: student unfused / fused, and plain timm MobileOne (fused)
                           of the same variant carrying the same weights
    check_equivalence() -> fused vs unfused and student vs plain outputs, before anything is timed
    time_latency()      -> batch-1 latency distributions, the models interleaved in rounds
    time_throughput()   -> images/s at larger batches
    matmul_peak()       -> measured fp32 (or fp16/bf16) matmul FLOP/s on the same device and threads
    run(...)            -> the whole of `python benchmark.py`: table + JSON

On CPU, time is `time.perf_counter` around each call with a stated thread count; on GPU, CUDA events
with synchronisation. Everything runs under `torch.inference_mode`, with fixed input shapes.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mgn.config import ModelConfig
from mgn.export import fuse_student, unfused_modules
from mgn.model import ImageClassifier

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STUDENT_UNFUSED, STUDENT_FUSED, PLAIN_FUSED = "student, unfused", "student, fused (deployed)", "plain timm, fused"
CLIP_TOWER = "CLIP zero-shot (image tower)"


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
    batch_sizes: tuple[int, ...] = (8, 32)  # throughput batch sizes
    throughput_iters: int = 10
    matmul_size: int = 2048
    compare_unfused: bool = True  # also time the unfused student (the only unfused model ever timed)
    rtol: float = 1e-3  # fused vs unfused: max |diff| / max |logit| (trained BN can amplify fp32 rounding)
    bn_warmup_batches: int = 4  # random init only: train-mode passes that give BatchNorm realistic statistics


class BenchmarkError(RuntimeError):
    pass


# --- the models -------------------------------------------------------------------------------------------

@dataclass
class Models:
    variant: str
    image_size: int
    num_classes: int
    weights: str  # where the weights came from, in words
    fused: nn.Module  # the deployed student
    plain: nn.Module  # timm.create_model(variant, num_classes=K), fused, same weights
    unfused: nn.Module | None = None
    notes: list[str] = field(default_factory=list)


def prepare(*, ckpt: str | None = None, variant: str = "mobileone_s4", image_size: int | None = None,
            num_classes: int = 2, bn_warmup_batches: int = 4, seed: int = 0, trust: bool = False) -> Models:
    """Student from a checkpoint (any kind mgn.evaluate reads), or random init of `variant`."""
    if ckpt:
        from mgn.artifacts import load_checkpoint  # noqa: PLC0415

        loaded = load_checkpoint(ckpt, trust=trust)
        cfg = loaded.cfg.model
        weights = f"{loaded.kind} checkpoint {loaded.path}"
        if loaded.kind == "student":  # an exported program: rebuild an nn.Module with its weights to time it
            fused = fuse_student(ImageClassifier(cfg))
            fused.load_state_dict(loaded.student.state_dict(), strict=True)
            unfused = None
            x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
            with torch.inference_mode():
                diff = (fused(x) - loaded.student(x)).abs().max().item()
            notes = [(f"artifact holds fused weights only: no unfused comparison; rebuilt module vs exported "
                      f"program max |diff| {diff:.2e}")]
        else:
            fused, unfused, notes = loaded.student, loaded.unfused_student, []
        if image_size and image_size != cfg.image_size:
            notes.append(f"timed at {image_size} px; the checkpoint was trained at {cfg.image_size} px")
        size = image_size or cfg.image_size
        variant, num_classes = cfg.image_model, cfg.num_classes
    else:
        size = image_size or 224
        cfg = ModelConfig(image_model=variant, image_size=size, num_classes=num_classes)
        torch.manual_seed(seed)
        unfused = ImageClassifier(cfg)
        warm_batchnorm(unfused, size, bn_warmup_batches, seed)
        fused = fuse_student(unfused)
        passes = f"{bn_warmup_batches} train-mode pass{'es' if bn_warmup_batches != 1 else ''}"
        weights = (f"random init (no checkpoint); BatchNorm statistics from {passes} on ImageNet-normalised "
                   f"smooth-noise images")
        notes = []
    if unfused is not None:
        unfused = unfused.eval()
    plain = plain_mobileone(variant, num_classes, fused)
    return Models(variant=variant, image_size=size, num_classes=num_classes, weights=weights, fused=fused.eval(),
                  plain=plain, unfused=unfused, notes=notes)


def realistic_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Photo-like inputs, ImageNet-normalised: a smooth 8x8 colour field upsampled, plus a little pixel noise."""
    coarse = torch.rand(n, 3, 8, 8, generator=generator)
    image = nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    image = (image + 0.1 * torch.rand(image.shape, generator=generator)).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (image - mean) / std


def warm_batchnorm(model: nn.Module, image_size: int, batches: int, seed: int = 0) -> None:
    """Random-init BatchNorm statistics make MobileOne logits reach 1e7-1e8; use those of real-looking inputs."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(realistic_images(8, image_size, generator))
    for m in norms:
        m.momentum = 0.1
    model.eval()


def plain_mobileone(variant: str, num_classes: int, fused_student: nn.Module) -> nn.Module:
    """timm's own classifier of the same variant, fused, with the student's weights (encoder.* and head.*)."""
    plain = fuse_student(timm.create_model(variant, pretrained=False, num_classes=num_classes))
    weights = {}
    for key, value in fused_student.state_dict().items():
        weights[key.removeprefix("encoder.")] = value
    plain.load_state_dict(weights, strict=True)
    return plain.eval()


# --- equivalence -------------------------------------------------------------------------------------------

@torch.inference_mode()
def check_equivalence(models: Models, rtol: float, batch: int = 4, seed: int = 1) -> dict:
    """fp32 outputs on CPU: fused vs unfused (relative to the logit scale) and student vs plain timm.

    Inputs look like the BatchNorm warm-up images: on far-off inputs (e.g. N(0,1) pixels) a random-init
    network's activations explode, and fp32 rounding differences grow with them.
    """
    x = realistic_images(batch, models.image_size, torch.Generator().manual_seed(seed))
    fused = models.fused.float().cpu()(x)
    out = {"input": f"{batch} smooth-noise images of {models.image_size} px (ImageNet-normalised), fp32, CPU"}
    if models.unfused is not None:
        reference = models.unfused.float().cpu()(x)
        diff = (fused - reference).abs().max().item()
        scale = reference.abs().max().item()
        out["fused_vs_unfused"] = {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / max(scale, 1e-12),
                                   "rtol": rtol, "same_argmax": bool((fused.argmax(1) == reference.argmax(1)).all()),
                                   "ok": diff <= rtol * max(scale, 1e-12)}
    plain = models.plain.float().cpu()(x)
    diff = (fused - plain).abs().max().item()
    out["student_vs_plain"] = {"max_abs_diff": diff, "ok": diff <= rtol * max(plain.abs().max().item(), 1e-12)}
    return out


# --- timing ------------------------------------------------------------------------------------------------

def guard(model: nn.Module, name: str, allow_unfused: bool = False) -> None:
    """Refuse to time what is not the deployed form, unless it is the explicit unfused reference."""
    if model.training:
        raise BenchmarkError(f"{name}: model is in train mode; timing it would measure the wrong thing (call eval())")
    leftovers = unfused_modules(model)
    if leftovers and not allow_unfused:
        raise BenchmarkError(f"{name}: not reparameterized ({len(leftovers)} BatchNorm/branch modules left, e.g. "
                             f"{leftovers[:3]}); fuse it, or time it only as the unfused comparison")


class Timer:
    """Per-call wall time: CUDA events on GPU (synchronised), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object], calls: int) -> list[float]:
        """Milliseconds for each of `calls` calls."""
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
            torch.cuda.synchronize()
            for start, end in zip(starts, ends):
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in zip(starts, ends)]
        out = []
        for _ in range(calls):
            tick = time.perf_counter()
            fn()
            out.append((time.perf_counter() - tick) * 1e3)
        return out


def summary_stats(ms: list[float]) -> dict:
    from scipy.stats import trim_mean  # noqa: PLC0415 - scipy comes with scikit-learn

    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "trimmed_mean": float(trim_mean(a, 0.1)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "std": float(a.std()), "n": len(a)}


@torch.inference_mode()
def time_latency(runners: dict[str, Callable], inputs: torch.Tensor, timer: Timer, warmup: int, iters: int,
                 rounds: int) -> dict[str, list[float]]:
    """Batch-1 latency samples per model; models take turns over `rounds` so slow drift affects all alike."""
    for fn in runners.values():
        for _ in range(warmup):
            fn(inputs)
    samples = {name: [] for name in runners}
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    for calls in per_round:
        for name, fn in runners.items():
            samples[name] += timer(lambda fn=fn: fn(inputs), calls)
    return samples


@torch.inference_mode()
def time_throughput(fn: Callable, inputs: torch.Tensor, timer: Timer, warmup: int, iters: int) -> dict:
    for _ in range(max(1, warmup)):
        fn(inputs)
    ms = timer(lambda: fn(inputs), iters)
    median = float(np.median(ms))
    return {"batch": int(inputs.shape[0]), "ms_per_batch_p50": median,
            "images_per_s": inputs.shape[0] / (median / 1e3), "n": len(ms)}


def count_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """Forward FLOPs (a multiply-add counts 2) from torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(inputs)
    return int(counter.get_total_flops())


@torch.inference_mode()
def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, timer: Timer, reps: int = 10) -> dict:
    """Best observed square-matmul FLOP/s: the practical peak of this device at this thread count."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = timer(lambda: a @ b, 3)  # warmup
    ms = timer(lambda: a @ b, reps)
    best = min(ms)
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "best_ms": best,
            "gflops": 2 * size ** 3 / (best / 1e3) / 1e9, "median_gflops": 2 * size ** 3 / (np.median(ms) / 1e3) / 1e9}


# --- environment -------------------------------------------------------------------------------------------

def environment(device: torch.device, threads: int) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "platform": platform.platform(), "device_type": device.type, "torch_threads": threads,
           "torch_interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
           "cpu": _cpu_name(), "mkldnn": torch.backends.mkldnn.is_available()}
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity:
        env["cpus_usable"] = len(affinity(0))
    if hasattr(os, "getloadavg"):
        # other processes competing for the cores inflate CPU latencies (2 threads on a busy 2-core machine: ~30x)
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# --- the command ---------------------------------------------------------------------------------------------

def tiny_settings(settings: Settings) -> Settings:
    """Seconds-long run for tests and smoke checks: few iterations, small batches and matmul."""
    return replace(settings, warmup=2, iters=12, rounds=2, batch_sizes=(4,), throughput_iters=3, matmul_size=256,
                   bn_warmup_batches=1)


def run(settings: Settings, *, ckpt: str | None = None, variant: str = "mobileone_s4", image_size: int | None = None,
        num_classes: int = 2, out: str | Path | None = None, quiet: bool = False, trust: bool = False,
        clip: str | None = None) -> dict:
    """Prepare, check, time, report. Returns the JSON-able result (also written to `out`)."""
    s = settings
    if s.precision not in DTYPES:
        raise ValueError(f"--precision {s.precision!r}: expected one of {sorted(DTYPES)}")
    device = _pick_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    threads = torch.get_num_threads()
    dtype = DTYPES[s.precision]
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    models = prepare(ckpt=ckpt, variant=variant, image_size=image_size, num_classes=num_classes,
                     bn_warmup_batches=s.bn_warmup_batches, trust=trust)
    equivalence = check_equivalence(models, s.rtol)
    failed = [k for k in ("fused_vs_unfused", "student_vs_plain") if k in equivalence and not equivalence[k]["ok"]]
    if failed:
        raise BenchmarkError(f"outputs disagree before timing ({', '.join(failed)}): {json.dumps(equivalence)}")

    candidates = {STUDENT_FUSED: models.fused, PLAIN_FUSED: models.plain}
    if s.compare_unfused and models.unfused is not None:
        candidates = {STUDENT_UNFUSED: models.unfused, **candidates}
    size = models.image_size
    sizes = dict.fromkeys(candidates, size)
    if clip:  # the paper's other baseline, timed by the same protocol at its own input size
        from mgn.clip import load_clip  # noqa: PLC0415

        clip_model = load_clip(clip)
        candidates[CLIP_TOWER] = clip_model
        sizes[CLIP_TOWER] = clip_model.image_size
    memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
    flops, runners = {}, {}
    for name, model in candidates.items():
        guard(model, name, allow_unfused=name in (STUDENT_UNFUSED, CLIP_TOWER))
        flops[name] = count_flops(model.float().cpu(), torch.zeros(1, 3, sizes[name], sizes[name]))
        model = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=memory_format).eval()
        runners[name] = at_own_size(torch.compile(model) if s.compile else model, sizes[name], size)

    if dtype != torch.float32:  # what the reduced precision costs in accuracy, on the timed device
        x = realistic_images(4, size, torch.Generator().manual_seed(1))
        with torch.inference_mode():
            reference = models.fused.float().cpu()(x)
            low = runners[STUDENT_FUSED](x.to(device, dtype).contiguous(memory_format=memory_format)).float().cpu()
        equivalence["reduced_precision_vs_fp32"] = {"precision": s.precision,
                                                    "max_abs_diff": (low - reference).abs().max().item(),
                                                    "max_abs_logit": reference.abs().max().item(),
                                                    "same_argmax": bool((low.argmax(1) == reference.argmax(1)).all())}
    timer = Timer(device)
    one = torch.randn(1, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    latency = time_latency(runners, one, timer, s.warmup, s.iters, s.rounds)
    results = {}
    for name in runners:
        stats = summary_stats(latency[name])
        results[name] = {"flops_per_image": flops[name], "latency_ms_batch1": stats,
                         "achieved_gflops_batch1": flops[name] / (stats["p50"] / 1e3) / 1e9, "throughput": []}
    for batch in s.batch_sizes:
        inputs = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        for name, fn in runners.items():
            point = time_throughput(fn, inputs, timer, warmup=2, iters=s.throughput_iters)
            point["achieved_gflops"] = flops[name] * batch / (point["ms_per_batch_p50"] / 1e3) / 1e9
            results[name]["throughput"].append(point)
    peak = matmul_peak(device, dtype, s.matmul_size, timer)
    for entry in results.values():
        entry["fraction_of_matmul_peak_batch1"] = entry["achieved_gflops_batch1"] / peak["gflops"]
        for point in entry["throughput"]:
            point["fraction_of_matmul_peak"] = point["achieved_gflops"] / peak["gflops"]

    p50 = {name: r["latency_ms_batch1"]["p50"] for name, r in results.items()}
    trimmed = {name: r["latency_ms_batch1"]["trimmed_mean"] for name, r in results.items()}
    ratios = {"student_over_plain_p50": p50[STUDENT_FUSED] / p50[PLAIN_FUSED],
              "student_over_plain_trimmed_mean": trimmed[STUDENT_FUSED] / trimmed[PLAIN_FUSED],
              # noise floor: how much the same model's p50 moves between the first and second half of its samples
              "student_p50_half_to_half": _half_ratio(latency[STUDENT_FUSED])}
    if STUDENT_UNFUSED in results:
        ratios["unfused_over_fused_p50"] = p50[STUDENT_UNFUSED] / p50[STUDENT_FUSED]
    if CLIP_TOWER in results:
        ratios["student_over_clip_p50"] = p50[STUDENT_FUSED] / p50[CLIP_TOWER]
        results[CLIP_TOWER]["image_size"] = sizes[CLIP_TOWER]
    report = {
        "model": {"variant": models.variant, "image_size": size, "num_classes": models.num_classes,
                  "weights": models.weights, "notes": models.notes,
                  "timed": "student = MobileOne encoder + ClassifierHead(avg, fc); plain = timm.create_model(variant, "
                           "num_classes=K) with the same weights; fused = timm reparameterize_model in eval mode"},
        "settings": {**asdict(s), "batch_sizes": list(s.batch_sizes), "device": str(device), "torch_threads": threads,
                     "timer": "CUDA events + synchronize" if device.type == "cuda" else "time.perf_counter per call",
                     "inference_mode": True},
        "environment": {**environment(device, threads), "load_average_1min_start": load_at_start},
        "equivalence": equivalence, "models": results, "ratios": ratios, "matmul_peak": peak,
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


def at_own_size(model: nn.Module, own: int, timed: int):
    """A runner for a model whose input side differs from the timed one (CLIP): same batch, its own size."""
    if own == timed:
        return model
    inputs: dict[int, torch.Tensor] = {}  # made once per batch size: the timing is the model's, not an allocation

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] not in inputs:
            inputs[x.shape[0]] = torch.randn(x.shape[0], x.shape[1], own, own, device=x.device, dtype=x.dtype)
        return model(inputs[x.shape[0]])

    return run


def _half_ratio(samples: list[float]) -> float:
    half = len(samples) // 2
    return float(np.median(samples[half:]) / np.median(samples[:half])) if half else float("nan")


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device visible")
    return torch.device(name)


def format_report(r: dict) -> str:
    s, env, m = r["settings"], r["environment"], r["model"]
    load = max(env.get("load_average_1min_start") or 0, env.get("load_average_1min") or 0)
    busy = (f"\nWARNING: 1-min load average reached {load} while this run used {s['torch_threads']} threads on "
            f"{env.get('cpus_usable', env['cpu_count'])} CPUs: other processes shared the cores, so the CPU "
            f"figures are not representative" if env["device_type"] == "cpu" and load > s["torch_threads"] + 0.5 else "")
    spread = max(e["latency_ms_batch1"]["p99"] / e["latency_ms_batch1"]["p50"] for e in r["models"].values())
    if spread > 3:
        busy += (f"\nWARNING: unstable timings (p99 up to {spread:.1f}x p50): something else ran during the "
                 f"measurement; rerun on a quiet machine")
    where = (f"{env.get('gpu')} (driver {env.get('driver')}, CUDA {env.get('cuda')})" if env["device_type"] == "cuda"
             else f"CPU {env['cpu']}, {s['torch_threads']} torch thread{'s' if s['torch_threads'] != 1 else ''}")
    options = f"{', channels_last' if s['channels_last'] else ''}{', torch.compile' if s['compile'] else ''}"
    lines = [(f"MGN benchmark: {m['variant']} + head, {m['num_classes']} classes, {m['image_size']} px, "
              f"{s['precision']}{options} on {where}"),
             f"weights: {m['weights']}{busy}", *[f"note: {n}" for n in m["notes"]]]
    eq = r["equivalence"]
    if "fused_vs_unfused" in eq:
        e = eq["fused_vs_unfused"]
        lines.append(f"check fused vs unfused: max |diff| {e['max_abs_diff']:.2e} on logits up to {e['max_abs_logit']:.3g}"
                     f" (relative {e['relative']:.1e} <= {e['rtol']:g}) {'OK' if e['ok'] else 'FAIL'}")
    if "reduced_precision_vs_fp32" in eq:
        e = eq["reduced_precision_vs_fp32"]
        lines.append(f"{e['precision']} vs fp32 (fused student): max |diff| {e['max_abs_diff']:.2e} on logits up to "
                     f"{e['max_abs_logit']:.3g}, same class: {e['same_argmax']}")
    e = eq["student_vs_plain"]
    lines.append(f"check student vs plain timm {m['variant']}: max |diff| {e['max_abs_diff']:.2e} "
                 f"{'OK' if e['ok'] else 'FAIL'}")
    batches = s["batch_sizes"]
    header = (f"{'model':<28}{'p50 ms':>9}{'p90':>8}{'p99':>8}{'trim.mean':>10}"
              + "".join(f"{f'img/s@{b}':>11}" for b in batches) + f"{'GFLOP/img':>10}{'GFLOP/s':>9}{'% peak':>8}")
    lines += ["batch-1 latency over {} calls per model (interleaved in {} rounds), throughput at larger batches:".format(
        s["iters"], s["rounds"]), header, "-" * len(header)]
    for name, e in r["models"].items():
        lat = e["latency_ms_batch1"]
        row = f"{name:<28}{lat['p50']:>9.2f}{lat['p90']:>8.2f}{lat['p99']:>8.2f}{lat['trimmed_mean']:>10.2f}"
        row += "".join(f"{p['images_per_s']:>11.1f}" for p in e["throughput"])
        row += (f"{e['flops_per_image'] / 1e9:>10.3f}{e['achieved_gflops_batch1']:>9.1f}"
                f"{100 * e['fraction_of_matmul_peak_batch1']:>7.1f}%")
        lines.append(row)
    ratios = r["ratios"]
    if "unfused_over_fused_p50" in ratios:
        lines.append(f"fused speed-up over unfused (p50): {ratios['unfused_over_fused_p50']:.2f}x")
    if "student_over_clip_p50" in ratios:
        lines.append(f"student / CLIP image tower latency (p50): {ratios['student_over_clip_p50']:.3f}; CLIP runs at "
                     f"{r['models'][CLIP_TOWER]['image_size']} px, the student at {m['image_size']} px")
    lines.append(f"student / plain timm latency: {ratios['student_over_plain_p50']:.2f} (p50), "
                 f"{ratios['student_over_plain_trimmed_mean']:.2f} (trimmed mean); noise: the student's own p50 moves "
                 f"by {ratios['student_p50_half_to_half']:.2f}x between halves of its samples")
    peak = r["matmul_peak"]
    lines.append(f"matmul peak ({peak['dtype']} {peak['size']}x{peak['size']}, same device and threads): "
                 f"{peak['gflops']:.1f} GFLOP/s; GFLOP/s and % peak above are at batch 1 (p50)")
    return "\n".join(lines)
