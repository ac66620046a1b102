"""What a run on a GPU does differently from one on the CPU: every branch on the device type, each with its
reason.

The rest of the project asks here instead of testing `device.type` itself, so the differences are one short
list a reader can check, and CI (CPU only) can take the GPU's paths on purpose: `--data.batch_form uint8`
hands the CPU a GPU run's batches and `--train.precision bf16` its arithmetic. What still differs is what
must:

    batch_form        uint8 NHWC batches on a GPU, float NCHW on the CPU (`auto`; either runs on either)
    pins_batches      page-locked host memory, filled by the loader's pin thread: GPU only
    memory_format     channels-last on a GPU; NCHW on the CPU, where channels-last training crashes (below)
    default_precision bf16 autocast on a GPU, fp32 on the CPU
    backend           NCCL for GPU tensors, gloo for CPU tensors
    configure_kernels cuDNN autotuning or determinism: GPU only
    sync_batchnorm    SyncBatchNorm: GPU only
    torch_threads     a GPU rank's CPUs go to its loader workers; a CPU rank keeps them for its arithmetic
    peak_memory_mb    the CUDA allocator's peak, or the process's resident peak
    random_states     the CUDA generator's state too, where CUDA exists
    HostCopy          a device tensor read a step late: a CUDA event to wait on, none on the CPU

(mgn/bench/timing.py and mgn/bench/latency.py time models with CUDA events on a GPU and a wall clock on the
CPU: how a benchmark measures, not what a run computes.)
"""
from __future__ import annotations

import resource

import torch


def is_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def batch_form(choice: str, device: torch.device) -> str:
    """'uint8' or 'float' for `data.batch_form`. auto: uint8 on a GPU, where a quarter of float32's bytes
    crosses PCIe and the GPU normalises them for free; float on the CPU, where there is no copy to shrink and
    the main process's numpy normalisation (one thread) does not wait for the cores the model's threads
    hold."""
    if choice != "auto":
        return choice
    return "uint8" if is_gpu(device) else "float"


def pins_batches(device: torch.device) -> bool:
    """Whether the loader pins its batches (in DataLoader's pin thread, off the training loop): page-locked
    host memory lets the copy to a GPU run without blocking; it needs the CUDA driver, and a CPU run copies
    nothing."""
    return is_gpu(device)


def pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` in page-locked memory where batches are pinned (pins_batches), else as it is."""
    return tensor.pin_memory() if pins_batches(device) else tensor


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout of the model and its image inputs. channels-last on a GPU: cuDNN's convolutions run in it
    without transposes. NCHW on the CPU: torch 2.14.1's CPU backward of MobileOne in channels-last corrupts
    the heap (a MobileOne-S0 forward and backward at 96 px, batch 32: 4 of 4 runs ended in a segmentation
    fault or an abort, 0 of 4 in NCHW; this project's 2-core EPYC, `python
    benchmarks/channels_last_cpu.py`)."""
    return torch.channels_last if is_gpu(device) else torch.contiguous_format


def default_precision(device: torch.device) -> str:
    """`train.precision auto`: bf16 autocast on a GPU (tensor cores, half the activation memory); fp32 on the
    CPU, where bf16 convolutions are slower than fp32 on most processors. Either runs on either."""
    return "bf16" if is_gpu(device) else "fp32"


def backend(device: torch.device) -> str:
    """The process group's backend: NCCL moves GPU tensors only; gloo moves CPU tensors."""
    return "nccl" if is_gpu(device) else "gloo"


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning for the fixed input shapes (fastest), or, when asked, deterministic algorithms
    (slower; bitwise-repeatable runs on the same GPU and software). The CPU has no cuDNN and is repeatable
    either way."""
    if not is_gpu(device):
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def sync_batchnorm(module: torch.nn.Module, device: torch.device, world_size: int,
                   wanted: bool) -> torch.nn.Module:
    """`train.sync_batchnorm`: batch statistics over all ranks. torch's SyncBatchNorm runs on GPU tensors
    only; a CPU run keeps per-rank statistics and averages the running ones before every evaluation and
    checkpoint (mgn.distributed.sync_batchnorm_buffers) either way."""
    if not (wanted and is_gpu(device) and world_size > 1):
        return module
    import timm  # keeps timm's BatchNormAct2d activations, where torch's converter drops them

    return timm.layers.convert_sync_batchnorm(module)


def torch_threads(cpus: int, workers: int, device: torch.device) -> int:
    """A rank's torch threads from the CPUs it was given. On a GPU the rank's own process launches kernels and
    waits, so its CPUs go to its loader workers, which decode every image: CPUs - workers, at least 1. On the
    CPU the rank's process does the arithmetic and keeps its CPUs; its workers mostly wait for it."""
    return max(1, cpus - workers) if is_gpu(device) else max(1, cpus)


def peak_memory_mb(device: torch.device) -> float:
    """The CUDA allocator's peak on a GPU; on the CPU the process's peak resident memory (Linux reports
    KiB)."""
    if is_gpu(device):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_states() -> dict[str, torch.Tensor]:
    """Every generator a run draws from: torch's CPU one, and CUDA's where CUDA exists (dropout on a GPU)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_random_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class HostCopy:
    """A small tensor on the device, copied to the host without waiting and read later. The training loop
    reads its flags (stop signal, skipped update) one update late, when the copy has long finished, instead of
    stopping the CPU at every update until the GPU catches up. On a GPU: a non-blocking copy into page-locked
    memory and a CUDA event to wait on; on the CPU the copy is done when it is made."""

    def __init__(self, values: torch.Tensor, device: torch.device):
        self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=pins_batches(device))
        self.host.copy_(values.detach(), non_blocking=True)
        self.copied = None
        if is_gpu(device):
            self.copied = torch.cuda.Event()
            self.copied.record()

    def read(self) -> list:
        """The values: the one place the training loop waits for the device (a moment, once the update after
        the one that made them has been queued)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()
