"""Where this process sits in the job, and the few collectives the trainer needs.

The rank environment comes from, in order: a launcher (torchrun, deepspeed, submitit's export:
RANK/WORLD_SIZE/LOCAL_RANK), an `srun` step (SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS,
master = first host of the node list, port from the job id), or a single local process. DeepSpeed
alone reads none of the Slurm variables and falls back to MPI discovery, so this module always
exports the five variables it needs before calling it.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mgn import devices
from mgn.cli import UserError

log = logging.getLogger("mgn")


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # launcher | slurm | single
    local_world_size: int = 1  # ranks on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_world(env: dict[str, str] | None = None) -> World:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"]),
                     env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "launcher",
                     int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))
    # SLURM_STEP_NUM_TASKS is set inside an srun step only: a batch script's own shell is not a rank.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        job_id = int(env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "0")))
        local = env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]
        return World(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                     int(env["SLURM_STEP_NUM_TASKS"]),
                     env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST",
                                                                  env["SLURM_JOB_NODELIST"])),
                     int(env.get("MASTER_PORT") or slurm_port(job_id)), "slurm", int(local or 1))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        log.warning("MGN: SLURM_PROCID is set but SLURM_STEP_NUM_TASKS is not: this process is the batch "
                    "script's "
                    "shell, not one of the job's %s tasks, and trains alone. Start it with srun "
                    "(slurm/train.sh "
                    "does) to train on every rank", env.get("SLURM_NTASKS"))
    return World(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)), "single")  # no port needed: see
    # init_distributed


def set_threads(world: World, workers: int, device: torch.device, env: dict[str, str] | None = None) -> str:
    """Give torch the CPUs this rank was given: OMP_NUM_THREADS if set, else what mgn.devices.torch_threads
    makes of Slurm's --cpus-per-task (or of the CPUs this process may run on, divided among the ranks of this
    node) beside `workers` loader processes. Returns a line for the log.

    Several torch processes that each use every core slow each other down 10-50x (their OpenMP threads spin
    for cores the others hold), so the split matters as soon as two ranks share a machine.
    """
    env = os.environ if env is None else env
    visible = len(os.sched_getaffinity(0))
    if env.get("OMP_NUM_THREADS"):
        threads, source = int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        if env.get("SLURM_CPUS_PER_TASK"):
            cpus, source = int(env["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK"
        else:
            cpus, source = (max(1, visible // world.local_world_size),
                            f"{visible} CPUs / {world.local_world_size} ranks")
        threads = devices.torch_threads(cpus, workers, device)
        if devices.is_gpu(device):
            source += f" - {workers} loader workers"
    torch.set_num_threads(threads)
    if threads * world.local_world_size > visible:
        log.warning("MGN: %d ranks x %d torch threads on %d visible CPUs: oversubscribed, expect a large "
                    "slowdown; "
                    "set OMP_NUM_THREADS to %d or less", world.local_world_size, threads, visible,
                    max(1, visible // world.local_world_size))
    return f"{threads} torch threads per rank ({source})"


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


# The master's port under Slurm: below Linux's ephemeral range (32768-60999 by default,
# net.ipv4.ip_local_port_range), where the kernel hands out ports to outgoing connections that a listening
# master could collide with.
SLURM_PORTS = (12000, 32000)


def slurm_port(job_id: int) -> int:
    """Same port on every task of a job (computed on each node from the job id alone), different for jobs
    likely to share a node, and never in the ephemeral range (SLURM_PORTS)."""
    low, high = SLURM_PORTS
    return low + job_id % (high - low)


class DeviceError(UserError, RuntimeError):
    """No usable device as asked: CUDA broken where GPUs were allocated, or more ranks than GPUs on a node."""


GPU_ALLOCATION_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")


def pick_device(name: str, local_rank: int = 0, flag: str = "--train.device",
                env: dict[str, str] | None = None) -> torch.device:
    """The device of this rank: `cuda` (the GPU of its local rank), `cpu`, or `auto`.

    `auto` is the GPU when CUDA works, else the CPU, except where GPUs were allocated to this process (Slurm's
    GPU variables, or CUDA_VISIBLE_DEVICES naming devices) and CUDA still does not work: a broken driver or a
    CPU-only torch on a GPU node must not turn a GPU job into a slow CPU one without a word. More ranks on a
    node than GPUs is an error too: two ranks on one GPU end in an obscure NCCL failure later. `flag` names
    the option that chooses the device, for the message.
    """
    env = os.environ if env is None else env
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(f"{flag} {name!r}: expected auto, cuda or cpu")
    if not torch.cuda.is_available():
        allocated = {k: env[k] for k in GPU_ALLOCATION_VARIABLES if env.get(k) not in (None, "", "-1",
                                                                                       "none")}
        if name == "cuda" or allocated:
            why = (f"GPUs were allocated ({', '.join(f'{k}={v}' for k, v in allocated.items())})"
                   if allocated else "a GPU was asked for")
            raise DeviceError(f"{why} but CUDA is not available to torch {torch.__version__} (no driver, or "
                              "a "
                               f"CPU-only build); fix the node or the install, or run on the CPU on purpose "
                               f"with {flag} cpu")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    # one GPU per task (srun --gpus-per-task 1, --gpu-bind): the one this process sees is its own
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise DeviceError(f"local rank {local_rank} has no GPU of its own: this node shows {count} GPU(s) to "
                          "the "
                           f"process; start at most {count} task(s) per node (srun --ntasks-per-node, "
                           "torchrun "
                           "--nproc_per_node), one per GPU, or give each task its own (srun --gpus-per-task "
                           "1)")
    return torch.device("cuda", local_rank)


def check_one_gpu_per_rank(device: torch.device) -> None:
    """After the process group is up: refuse two ranks on one GPU (the case pick_device cannot see: each rank
    shown the same single GPU). NCCL would fail later with an obscure message, so the ranks compare their GPUs
    through the process group's key-value store, which needs no NCCL collective."""
    if not devices.is_gpu(device) or world_size() == 1:
        return
    import socket

    store = dist.distributed_c10d._get_default_store()
    store.set(f"mgn/gpu/{dist.get_rank()}", f"{socket.gethostname()} "
                                            f"{torch.cuda.get_device_properties(device).uuid}")
    owners: dict[str, list[int]] = {}
    for rank in range(world_size()):
        owners.setdefault(store.get(f"mgn/gpu/{rank}").decode(), []).append(rank)
    shared = {gpu: ranks for gpu, ranks in owners.items() if len(ranks) > 1}
    if shared:
        gpu, ranks = next(iter(shared.items()))
        host, uuid = gpu.split(" ", 1)
        raise DeviceError(f"ranks {ranks} all use GPU {uuid} on {host}: each rank needs a GPU of its own; "
                          "give each "
                          f"task its own (srun --gpus-per-task 1) or start at most one task per GPU")


def init_distributed(world: World, timeout_s: int, device_name: str = "auto",
                     flag: str = "--train.device") -> torch.device:
    """Export the rank variables, pick the device, and start the process group through DeepSpeed."""
    import deepspeed  # heavy import

    if dist.is_initialized():  # a second run in the same process (mgn.train.loop.run's keep_process_group)
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
    os.environ.update(RANK=str(world.rank), LOCAL_RANK=str(world.local_rank),
                      WORLD_SIZE=str(world.world_size),
                      MASTER_ADDR=world.master_addr, MASTER_PORT=str(world.master_port))
    device = pick_device(device_name, world.local_rank, flag)
    if devices.is_gpu(device):
        torch.cuda.set_device(device)
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (~25 s of g++) used only by its
    # inference kernels; training over gloo does not need it (and NCCL never uses it).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = datetime.timedelta(seconds=timeout_s)
    if world.world_size == 1:
        # One process meets no one: an in-memory store instead of a TCP rendezvous, so there is no port to
        # pick or to collide on (a port found free, then taken before the store listened, or one inherited
        # from a shell's MASTER_PORT that another job holds, failed single runs with EADDRINUSE). DeepSpeed
        # then wraps the group it finds.
        dist.init_process_group(devices.backend(device), store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    deepspeed.init_distributed(dist_backend=devices.backend(device), auto_mpi_discovery=False, verbose=False,
                               timeout=timeout)
    check_one_gpu_per_rank(device)
    return device


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small float tensor (a copy; the input is untouched)."""
    out = values.detach().clone().float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on at least one."""
    return any_rank_each([flag], device)[0]


def any_rank_each(flags: list, device: torch.device) -> list[bool]:
    """For each flag (a bool or a 0-d tensor), whether it is true on at least one rank: one all-reduce, read
    at once (a host sync: outside the training loop's hot path, which uses `max_over_ranks` and reads a step
    late)."""
    values = torch.stack([torch.as_tensor(f, device=device).float().reshape(()) for f in flags])
    return [bool(v) for v in max_over_ranks(values).tolist()]


def max_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over ranks of a small tensor on the rank's device, in place; queued, not
    waited for (NCCL orders it on the device's stream: no host sync)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def sync_batchnorm_buffers(model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics across ranks.

    DeepSpeed broadcasts parameters once and never BatchNorm buffers, so each rank's running stats
    drift with its own data. On GPU SyncBatchNorm keeps them equal; on CPU (no SyncBatchNorm) this
    runs before every evaluation and checkpoint, like timm's `--dist-bn reduce`.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer /= dist.get_world_size()


def is_initialized() -> bool:
    """Whether this process's group is up (started here, or by a caller that runs several trainings in it)."""
    return dist.is_initialized()


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def gather_objects(obj):
    """List of `obj` from every rank (in rank order), on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down while the interpreter is whole: a rank that exits with gloo's
    threads still alive can abort in interpreter finalization ("terminate called without an
    active exception", seen here when one rank of an evaluation returned before the other)."""
    if dist.is_initialized():
        dist.destroy_process_group()
