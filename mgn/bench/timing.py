"""How to time a callable honestly: the same clock, warm-up and interleaving for every model timed.

    Timer            -> per-call milliseconds: CUDA events with synchronisation on GPU, perf_counter on CPU
    time_latency()   -> batch-1 latency samples, the models interleaved in rounds so drift hits them alike
    time_throughput()-> images/s of one model at a larger batch
    summary_stats()  -> percentiles, trimmed mean and spread of a list of samples
    count_flops()    -> forward FLOPs from torch's FlopCounterMode
    matmul_peak()    -> measured square-matmul FLOP/s: the practical peak of the device at this thread count
    cuda_math()      -> cuDNN autotuning on and TF32 off (strict fp32) for a timed section on CUDA, restored
    after with_tf32()      -> a runner with TF32 allowed for its own calls (the "tf32" row beside strict fp32)
    host_batch()     -> a batch as the loader hands it over (uint8 NHWC, or normalised float32 NCHW), pinned
    on CUDA end_to_end()     -> a runner from that host batch: copy to the device, cast, normalise, model
    at_own_size()    -> a runner for a model timed at its own input size (CLIP beside the student)
    environment()    -> the machine, versions and load, for the report

Used by mgn/bench/latency.py (the deployed student) and mgn/compare/report.py (the verdict's latency ratios).
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mgn import devices


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
    from scipy.stats import trim_mean  # scipy comes with scikit-learn

    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "trimmed_mean": float(trim_mean(a, 0.1)),
            "mean": float(a.mean()),
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
    return {"batch": int(inputs.shape[0]), "ms_per_batch_p50": median, "ms_per_img": median / inputs.shape[0],
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
            "gflops": 2 * size ** 3 / (best / 1e3) / 1e9,
            "median_gflops": 2 * size ** 3 / (np.median(ms) / 1e3) / 1e9}


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


@contextmanager
def cuda_math(device: torch.device, cudnn_benchmark: bool = True) -> Iterator[dict]:
    """On CUDA: cuDNN autotuning (fixed shapes: each shape's fastest kernel, found in the warm-up) and TF32
    off for matmul and cuDNN, so that "fp32" means IEEE fp32 (torch's default lets cuDNN convolutions run in
    TF32). The previous switches come back afterwards. Yields what the timed section ran with, for the
    report."""
    if device.type != "cuda":
        yield {"cudnn_benchmark": None, "tf32_matmul": None, "tf32_cudnn": None}
        return
    saved = (torch.backends.cudnn.benchmark, *_tf32_flags())
    torch.backends.cudnn.benchmark = cudnn_benchmark
    _set_tf32(False, False)
    try:
        yield {"cudnn_benchmark": cudnn_benchmark, "tf32_matmul": False, "tf32_cudnn": False}
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        _set_tf32(*saved[1:])


def with_tf32(fn: Callable) -> Callable:
    """`fn` with TF32 allowed for matmul and cuDNN during its own calls (the switches are read at kernel
    launch, so runners with and without TF32 can take turns in the same rounds)."""
    def run(*args, **kwargs):
        saved = _tf32_flags()
        _set_tf32(True, True)
        try:
            return fn(*args, **kwargs)
        finally:
            _set_tf32(*saved)

    return run


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def host_batch(batch: int, size: int, kind: str, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A batch in host memory as the loader hands it over: `uint8` NHWC pixels (what the workers collate), or
    `float` ImageNet-normalised float32 NCHW (what the main process makes of them for a CPU run). Pinned where
    the loader pins batches (mgn.devices.pins_batches: a GPU), so the copy can be asynchronous."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)
    if kind == "uint8":
        out = pixels
    elif kind == "float":
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out = ((pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous()
    else:
        raise ValueError(f"host batch kind {kind!r}: expected uint8 or float")
    return devices.pinned(out, device)


def end_to_end(model: Callable, device: torch.device, dtype: torch.dtype,
               memory_format: torch.memory_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """A runner from a host batch (see host_batch) to logits through training's own input path
    (mgn.data.decode.ModelInputs: the copy to the device, asynchronous from pinned memory, and for uint8 the
    normalisation there), then the cast to the timed dtype and layout, then the model."""
    from mgn.data.decode import ModelInputs  # the loader's module; timing alone does not need it

    inputs = ModelInputs(IMAGENET_MEAN, IMAGENET_STD, device)

    def run(host: torch.Tensor) -> torch.Tensor:
        return model(inputs.image(host).to(dtype).contiguous(memory_format=memory_format))

    return run


def at_own_size(model: nn.Module, own: int, timed: int):
    """A runner for a model whose input side differs from the timed one (CLIP): same batch, its own size."""
    if own == timed:
        return model
    # made once per batch size: the timing is the model's, not an allocation
    inputs: dict[int, torch.Tensor] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] not in inputs:
            inputs[x.shape[0]] = torch.randn(x.shape[0], x.shape[1], own, own, device=x.device, dtype=x.dtype)
        return model(inputs[x.shape[0]])

    return run


def environment(device: torch.device, threads: int) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "platform": platform.platform(), "device_type": device.type, "torch_threads": threads,
           "torch_interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
           "cpu": _cpu_name(), "mkldnn": torch.backends.mkldnn.is_available()}
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity:
        env["cpus_usable"] = len(affinity(0))
    if hasattr(os, "getloadavg"):
        # other processes competing for the cores inflate CPU latencies (2 threads on a busy 2-core machine:
        # ~30x)
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
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
