"""Latency and throughput of the deployed student: reparameterized MobileOne + head.

    prepare(...)         -> the models to time: student unfused / fused, and plain timm MobileOne (fused)
                            of the same variant carrying the same weights
    check_equivalence()  -> fused vs unfused and student vs plain outputs, before anything is timed
    require_deployable() -> refuse to time a model in train mode, or one not reparameterized
    run(...)             -> the whole of `python benchmark.py`: check, time, table + JSON
    format_report()      -> the table printed from the JSON

How each model is timed (clocks, interleaved rounds, throughput, FLOPs, matmul peak, the machine) is
mgn/timing.py. On CPU, time is `time.perf_counter` around each call with a stated thread count; on GPU,
CUDA events with synchronisation. Everything runs under `torch.inference_mode`, with fixed input shapes.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from mgn import timing
from mgn.config import ModelConfig
from mgn.distributed import pick_device
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


# --- what may be timed ----------------------------------------------------------------------------------------

def require_deployable(model: nn.Module, name: str, allow_unfused: bool = False) -> None:
    """Refuse to time what is not the deployed form, unless it is the explicit unfused reference."""
    if model.training:
        raise BenchmarkError(f"{name}: model is in train mode; timing it would measure the wrong thing (call eval())")
    leftovers = unfused_modules(model)
    if leftovers and not allow_unfused:
        raise BenchmarkError(f"{name}: not reparameterized ({len(leftovers)} BatchNorm/branch modules left, e.g. "
                             f"{leftovers[:3]}); fuse it, or time it only as the unfused comparison")


def select_device(name: str) -> torch.device:
    """--device auto | cpu | cuda | cuda:N through mgn.distributed.pick_device (cuda:N: the GPU of local rank N)."""
    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise BenchmarkError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if index and torch.cuda.is_available() and int(index) >= torch.cuda.device_count():
        raise BenchmarkError(f"--device {name}: this machine shows {torch.cuda.device_count()} GPU(s) to torch")
    try:
        return pick_device(kind, int(index or 0), flag="--device")
    except RuntimeError as error:  # no CUDA, or no GPU N: one line from the command, not a traceback
        raise BenchmarkError(f"--device {name}: {error}") from error


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
    device = select_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    threads = torch.get_num_threads()
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    models = prepare(ckpt=ckpt, variant=variant, image_size=image_size, num_classes=num_classes,
                     bn_warmup_batches=s.bn_warmup_batches, trust=trust)
    equivalence = check_equivalence(models, s.rtol)
    failed = [k for k in ("fused_vs_unfused", "student_vs_plain") if k in equivalence and not equivalence[k]["ok"]]
    if failed:
        raise BenchmarkError(f"outputs disagree before timing ({', '.join(failed)}): {json.dumps(equivalence)}")

    candidates, sizes = timed_models(models, s.compare_unfused, clip)
    flops, runners = make_runners(candidates, sizes, models.image_size, s, device)
    if s.precision != "fp32":  # what the reduced precision costs in accuracy, on the timed device
        equivalence["reduced_precision_vs_fp32"] = reduced_precision_check(models, runners[STUDENT_FUSED], s, device)
    results, latency, peak = measure(runners, flops, models.image_size, s, device)
    ratios = latency_ratios(results, latency)
    if CLIP_TOWER in results:
        results[CLIP_TOWER]["image_size"] = sizes[CLIP_TOWER]
    report = {
        "model": {"variant": models.variant, "image_size": models.image_size, "num_classes": models.num_classes,
                  "weights": models.weights, "notes": models.notes,
                  "timed": "student = MobileOne encoder + ClassifierHead(avg, fc); plain = timm.create_model(variant, "
                           "num_classes=K) with the same weights; fused = timm reparameterize_model in eval mode"},
        "settings": {**asdict(s), "batch_sizes": list(s.batch_sizes), "device": str(device), "torch_threads": threads,
                     "timer": "CUDA events + synchronize" if device.type == "cuda" else "time.perf_counter per call",
                     "inference_mode": True},
        "environment": {**timing.environment(device, threads), "load_average_1min_start": load_at_start},
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


def timed_models(models: Models, compare_unfused: bool, clip: str | None) -> tuple[dict, dict]:
    """The models to time, by their name in the report, and the input side each is timed at."""
    candidates = {STUDENT_FUSED: models.fused, PLAIN_FUSED: models.plain}
    if compare_unfused and models.unfused is not None:
        candidates = {STUDENT_UNFUSED: models.unfused, **candidates}
    sizes = dict.fromkeys(candidates, models.image_size)
    if clip:  # the paper's other baseline, timed by the same protocol at its own input size
        from mgn.clip import load_clip  # noqa: PLC0415

        clip_model = load_clip(clip)
        candidates[CLIP_TOWER] = clip_model
        sizes[CLIP_TOWER] = clip_model.image_size
    return candidates, sizes


def memory_format(s: Settings) -> torch.memory_format:
    return torch.channels_last if s.channels_last else torch.contiguous_format


def make_runners(candidates: dict[str, nn.Module], sizes: dict[str, int], size: int, s: Settings,
                 device: torch.device) -> tuple[dict[str, int], dict]:
    """FLOPs per image of each model (fp32, CPU), and its timed copy: on the device, in the precision and memory
    format asked for, compiled if asked, fed at its own input size."""
    flops, runners = {}, {}
    for name, model in candidates.items():
        require_deployable(model, name, allow_unfused=name in (STUDENT_UNFUSED, CLIP_TOWER))
        flops[name] = timing.count_flops(model.float().cpu(), torch.zeros(1, 3, sizes[name], sizes[name]))
        model = copy.deepcopy(model).to(device=device, dtype=DTYPES[s.precision], memory_format=memory_format(s)).eval()
        runners[name] = timing.at_own_size(torch.compile(model) if s.compile else model, sizes[name], size)
    return flops, runners


def reduced_precision_check(models: Models, fused_runner, s: Settings, device: torch.device) -> dict:
    """The timed fused student in fp16/bf16 against the fp32 one on CPU, on the same images."""
    x = realistic_images(4, models.image_size, torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = models.fused.float().cpu()(x)
        low = fused_runner(x.to(device, DTYPES[s.precision]).contiguous(memory_format=memory_format(s))).float().cpu()
    return {"precision": s.precision, "max_abs_diff": (low - reference).abs().max().item(),
            "max_abs_logit": reference.abs().max().item(),
            "same_argmax": bool((low.argmax(1) == reference.argmax(1)).all())}


def measure(runners: dict, flops: dict[str, int], size: int, s: Settings,
            device: torch.device) -> tuple[dict, dict[str, list[float]], dict]:
    """Batch-1 latency (interleaved), throughput at each batch size, and the matmul peak they are set against."""
    dtype, layout, timer = DTYPES[s.precision], memory_format(s), timing.Timer(device)
    one = torch.randn(1, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=layout)
    latency = timing.time_latency(runners, one, timer, s.warmup, s.iters, s.rounds)
    results = {}
    for name in runners:
        stats = timing.summary_stats(latency[name])
        results[name] = {"flops_per_image": flops[name], "latency_ms_batch1": stats,
                         "achieved_gflops_batch1": flops[name] / (stats["p50"] / 1e3) / 1e9, "throughput": []}
    for batch in s.batch_sizes:
        inputs = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=layout)
        for name, fn in runners.items():
            point = timing.time_throughput(fn, inputs, timer, warmup=2, iters=s.throughput_iters)
            point["achieved_gflops"] = flops[name] * batch / (point["ms_per_batch_p50"] / 1e3) / 1e9
            results[name]["throughput"].append(point)
    peak = timing.matmul_peak(device, dtype, s.matmul_size, timer)
    for entry in results.values():
        entry["fraction_of_matmul_peak_batch1"] = entry["achieved_gflops_batch1"] / peak["gflops"]
        for point in entry["throughput"]:
            point["fraction_of_matmul_peak"] = point["achieved_gflops"] / peak["gflops"]
    return results, latency, peak


def latency_ratios(results: dict, latency: dict[str, list[float]]) -> dict:
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
    return ratios


def _half_ratio(samples: list[float]) -> float:
    half = len(samples) // 2
    return float(np.median(samples[half:]) / np.median(samples[:half])) if half else float("nan")


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
