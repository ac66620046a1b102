"""GPU paths checked on CPU: what NCCL, CUDA and mixed precision need, without a GPU.

- every tensor the training log hands to a collective lives on the rank's device (NCCL refuses CPU tensors;
  the `meta` device stands in for a GPU here, so a CPU tensor shows up as the wrong device);
- a GPU job on a node where CUDA does not work stops with a clear message instead of training on the CPU,
  and more ranks than GPUs on a node is refused;
- the optimizer's skip of a non-finite update is one decision for all ranks when `agree` is given (ZeRO-1/2);
- bf16 is autocast over fp32 weights and fp32 BatchNorm statistics, never DeepSpeed's bf16 section.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mgn import devices, distributed
from mgn.train import engine, monitor
from mgn.config import preset_config
from mgn.train.guard import GuardedAdamW
from mgn.model.objectives import StepOutput, build_objective

ROOT = Path(__file__).resolve().parents[1]


def test_the_training_log_gives_the_collective_tensors_on_the_ranks_device(monkeypatch):
    seen = []

    def fake_all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
        seen.append(values.device)
        return torch.zeros(values.shape)

    monkeypatch.setattr(distributed, "all_reduce_mean", fake_all_reduce_mean)
    timer = monitor.StepTimer()
    device = torch.device("meta")  # stands in for the rank's GPU
    for _ in range(3):
        output = StepOutput(loss=torch.tensor(0.5, device=device), logits=torch.zeros(4, 2, device=device),
                            terms={"student_ce": torch.tensor(0.5, device=device)})
        timer.add(output, torch.zeros(4, dtype=torch.long, device=device))
    timer.total, timer.updates = 1.0, 3
    values = timer.scalars(device)
    assert seen == [device], "the log's collective got a tensor off the rank's device"
    assert {"train/loss", "train/student_ce", "train/accuracy", "train/samples_per_s"} <= set(values)


def test_a_gpu_job_without_working_cuda_stops_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError,
                       match=r"GPUs were allocated \(SLURM_GPUS_ON_NODE=4\).*--train.device cpu"):
        distributed.pick_device("auto", 0, env={"SLURM_GPUS_ON_NODE": "4"})
    with pytest.raises(RuntimeError, match="a GPU was asked for.*--device cpu"):
        distributed.pick_device("cuda", 0, flag="--device", env={})
    assert distributed.pick_device("cpu", 0, env={"SLURM_GPUS_ON_NODE": "4"}) == torch.device("cpu")
    assert distributed.pick_device("auto", 0, env={"CUDA_VISIBLE_DEVICES": ""}) == torch.device("cpu")


def test_more_ranks_than_gpus_on_a_node_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.pick_device("auto", 1, env={}) == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="local rank 2 has no GPU of its own: this node shows 2 GPU"):
        distributed.pick_device("auto", 2, env={})


def _optimizer(agree):
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 0.5)
    return param, GuardedAdamW([param], lr=0.1, agree=agree)


def test_the_skip_decision_is_one_for_all_ranks_when_agreed():
    # This rank's gradients are finite, but another rank's partition was not: the agreed decision skips here
    # too.
    param, optimizer = _optimizer(agree=lambda bad: torch.ones((), dtype=torch.bool))
    optimizer.step()
    assert optimizer.skipped and torch.equal(param.detach(), torch.ones(3))
    assert optimizer.state[param]["step"] == 0  # fused AdamW's found_inf: not even the step count moved
    # Without agreement (ZeRO-0, where every rank holds the same averaged gradients) the rank decides alone.
    param, optimizer = _optimizer(agree=None)
    optimizer.step()
    assert not optimizer.skipped and not torch.equal(param.detach(), torch.ones(3))
    # The rank's own verdict is what it offers to the others: a tensor on its device, never read on the host.
    offered = []
    param, optimizer = _optimizer(agree=lambda bad: offered.append(bad) or bad)
    param.grad[0] = float("nan")
    optimizer.step()
    assert [bool(v) for v in offered] == [True] and isinstance(offered[0], torch.Tensor) and optimizer.skipped
    # The trainer's verdict (a rank's non-finite loss) skips too.
    param, optimizer = _optimizer(agree=None)
    optimizer.skip_next_step = torch.ones((), dtype=torch.bool)
    optimizer.step()
    assert optimizer.skipped and torch.equal(param.detach(), torch.ones(3))


def test_bf16_is_autocast_over_fp32_weights_and_batchnorm():
    cfg = preset_config("tiny", {"objective": {"name": "baseline"}, "train": {"precision": "bf16"}})
    assert "bf16" not in engine.deepspeed_config(cfg) and "data_types" not in engine.deepspeed_config(cfg)
    objective = build_objective(cfg).train()
    cpu = torch.device("cpu")
    assert engine.precision(cfg, cpu) == "bf16"
    with engine.autocast(cfg, cpu):
        output = objective(torch.randn(2, 3, 64, 64), label=torch.tensor([0, 1]))
    assert output.logits.dtype == torch.bfloat16  # computed in bf16 ...
    assert output.loss.dtype == torch.float32  # ... the loss in fp32 (cross_entropy on .float())
    assert {p.dtype for p in objective.parameters()} == {torch.float32}  # fp32 master weights
    running = [b for m in objective.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var)]
    assert running and {b.dtype for b in running} == {torch.float32}
    assert all(torch.isfinite(b).all() for b in running)
    fp32 = preset_config("tiny", {"train": {"precision": "auto"}})
    assert engine.precision(fp32, cpu) == "fp32" and engine.precision(fp32, torch.device("cuda")) == "bf16"


def test_fp16_is_refused_with_the_allowed_choices():
    with pytest.raises(ValueError,
                       match=r"train.precision='fp16': expected one of \['auto', 'fp32', 'bf16'\]"):
        preset_config("tiny", {"train": {"precision": "fp16"}})


def test_a_gpu_runs_uint8_batches_normalise_on_the_device_to_the_cpu_paths_values(tmp_path):
    from mgn.data.loader import build_loader
    from mgn.data.decode import ModelInputs, image_normalisation
    from mgn.data.writer import write_synthetic

    write_synthetic(tmp_path, samples=40, image_size=64, seed=0, max_samples=16)
    cfg = preset_config("tiny", {"objective": {"name": "baseline"},
                                 "data": {"train_shards": str(tmp_path / "train-*.tar"),
                                          "test_shards": str(tmp_path / "test-*.tar"),
                                          "synthetic_samples": 0}})
    on_host = next(iter(build_loader(cfg, "test")))
    as_gpu = next(iter(build_loader(cfg, "test", batch_form="uint8")))
    # NHWC, a quarter the bytes
    assert as_gpu["image"].dtype == torch.uint8 and as_gpu["image"].shape[-1] == 3
    assert on_host["image"].dtype == torch.float32 and on_host["key"] == as_gpu["key"]
    cpu = torch.device("cpu")  # the arithmetic the GPU runs, run here
    inputs = ModelInputs(*image_normalisation(cfg.model), cpu)
    image = inputs(as_gpu)["image"]
    # the CPU's layout (mgn/devices.py)
    assert image.shape == on_host["image"].shape and image.is_contiguous()
    torch.testing.assert_close(image, on_host["image"], rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs(on_host)["image"], on_host["image"], rtol=0, atol=0)
    # the attention picture draws either form as the same pixels (a uint8 batch once crashed it: issue 32)
    torch.testing.assert_close(torch.from_numpy(inputs.display(as_gpu["image"], limit=3)),
                               torch.from_numpy(inputs.display(on_host["image"], limit=3)), rtol=0, atol=1e-5)


def test_a_persistent_test_loader_reads_the_same_samples_at_every_evaluation(tmp_path):
    from mgn.data.loader import build_loader
    from mgn.data.writer import write_synthetic

    write_synthetic(tmp_path, samples=60, image_size=32, seed=0, max_samples=16)
    cfg = preset_config("tiny", {"objective": {"name": "baseline"},
                                 "data": {"train_shards": str(tmp_path / "train-*.tar"), "num_workers": 2,
                                          "test_shards": str(tmp_path / "test-*.tar"),
                                          "synthetic_samples": 0}})
    loader = build_loader(cfg, "test", persistent=True)
    passes = [[key for batch in loader for key in batch["key"]] for _ in range(3)]
    assert passes[0] and passes[0] == passes[1] == passes[2]
    # the same workers served every pass
    assert loader._loader is not None and loader._loader.persistent_workers


def test_the_guard_clips_as_torch_does_and_takes_clipping_from_deepspeed_only_under_zero0():
    from mgn.config import preset_config
    from mgn.train.engine import deepspeed_config

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    for a, b in zip(weights, twins):
        a.grad = torch.randn_like(a) * 10  # a global norm far above 1: clipped
        b.grad = a.grad.clone()
    GuardedAdamW(weights, lr=0.1, clip=1.0).step()
    torch.nn.utils.clip_grad_norm_(twins, 1.0)
    torch.optim.AdamW(twins, lr=0.1, fused=True).step()
    assert all(torch.equal(a, b) for a, b in zip(weights, twins))  # bitwise: the same fused operations
    # ZeRO-0: the guard clips and DeepSpeed does not (a second pass); ZeRO-1/2: DeepSpeed clips the
    # partitions.
    for stage, deepspeed_clip in ((0, 0.0), (1, 0.5), (2, 0.5)):
        cfg = preset_config("tiny", {"train": {"zero_stage": stage, "grad_clip": 0.5}})
        assert deepspeed_config(cfg)["gradient_clipping"] == deepspeed_clip


# --- issue 32: what a GPU run meets that a CPU test never took
# -------------------------------------------------

def test_one_visible_gpu_per_task_is_the_tasks_own_whatever_its_local_rank(monkeypatch):
    # srun --gpus-per-task 1 / --gpu-bind: each task sees one GPU (its own), while SLURM_LOCALID counts up
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.pick_device("auto", 3, env={}) == torch.device("cuda", 0)


class _Store:
    """The process group's key-value store, as two ranks' processes share it."""

    def __init__(self):
        self.values = {}

    def set(self, key, value):
        self.values[key] = value.encode()

    def get(self, key):
        return self.values[key]


def test_two_ranks_shown_the_same_single_gpu_are_refused(monkeypatch):
    store = _Store()
    store.set("mgn/gpu/0", "node1 GPU-1234")  # rank 0 said so already
    monkeypatch.setattr(distributed.dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr("socket.gethostname", lambda: "node1")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (),
                                                                                 {"uuid": "GPU-1234"}))
    with pytest.raises(distributed.DeviceError, match=r"ranks \[0, 1\] all use GPU GPU-1234 on node1"):
        distributed.check_one_gpu_per_rank(torch.device("cuda", 0))
    store.set("mgn/gpu/0", "node2 GPU-1234")  # the same model of GPU on another node is another GPU
    distributed.check_one_gpu_per_rank(torch.device("cuda", 0))


def test_the_slurm_master_port_stays_below_the_ephemeral_range():
    ports = [distributed.slurm_port(job) for job in (0, 1, 12345, 19999, 20000, 987654321, 2**31 - 1)]
    assert all(1024 < p < 32768 for p in ports)  # Linux hands out 32768-60999 to outgoing connections
    assert len({distributed.slurm_port(j) for j in range(1000, 1100)}) == 100  # jobs on one node still differ


def test_a_gpu_ranks_cpus_go_to_its_loader_workers(monkeypatch):
    from mgn.distributed import World

    world = World(0, 0, 1, "127.0.0.1", 0, "slurm")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert "2 torch threads" in distributed.set_threads(world, 6, torch.device("cuda", 0),
                                                        env={"SLURM_CPUS_PER_TASK": "8"})
    assert "1 torch threads" in distributed.set_threads(world, 9, torch.device("cuda", 0),
                                                        env={"SLURM_CPUS_PER_TASK": "8"})
    assert "8 torch threads" in distributed.set_threads(world, 6, torch.device("cpu"),
                                                        env={"SLURM_CPUS_PER_TASK": "8"})


def test_the_fusion_keeps_the_image_embeddings_layout():
    # On a GPU the model is channels-last (mgn/devices.py); a text block in NCHW beside it made the fusion's
    # cat, and with it every fusion convolution, NCHW. The forward alone runs on the CPU in either layout.
    from mgn.model.networks import GuidancePath

    cfg = preset_config("tiny", {"objective": {"name": "guided"}, "model": {"image_size": 128}})
    path = GuidancePath(cfg.model, image_channels=16).eval().to(memory_format=torch.channels_last)
    embedding = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    block = torch.randn(2, path.text.hidden_size, 4, 4)
    captured = []
    path.fusion.layers[0].register_forward_hook(lambda module, args, out: captured.append(args[0]))
    with torch.no_grad():
        path(embedding, torch.nn.Identity(), text_block=block)
    assert captured[0].is_contiguous(memory_format=torch.channels_last) and not captured[0].is_contiguous()
    assert devices.memory_format(torch.device("cuda", 0)) == torch.channels_last
    assert devices.memory_format(torch.device("cpu")) == torch.contiguous_format


def _shards(tmp_path, samples=96):
    from mgn.data.writer import write_synthetic

    write_synthetic(tmp_path, samples=samples, image_size=32, seed=0, max_samples=16)
    return preset_config("tiny", {"objective": {"name": "baseline"},
                                  "data": {"train_shards": str(tmp_path / "train-*.tar"), "num_workers": 2,
                                           "test_shards": str(tmp_path / "test-*.tar"),
                                           "synthetic_samples": 0},
                                  "model": {"image_size": 32}, "train": {"micro_batch": 8}})


def test_persistent_training_workers_read_each_epoch_as_a_fresh_loader_would(tmp_path):
    from mgn.data.loader import build_loader

    cfg = _shards(tmp_path)
    loader = build_loader(cfg, "train", persistent=True)
    pids, epochs = [], []
    for epoch in (0, 1, 2):
        epochs.append([batch["key"] for batch in loader.epoch(epoch)])
        pids.append(sorted(w.pid for w in loader._iterator._workers))
    assert pids[0] == pids[1] == pids[2]  # the same worker processes served every epoch
    fresh = [[batch["key"] for batch in build_loader(cfg, "train", epoch=epoch)] for epoch in (0, 1, 2)]
    assert epochs == fresh and epochs[0] != epochs[1]
    resumed = [batch["key"] for batch in loader.epoch(1, skip_batches=3)]
    assert resumed == fresh[1][3:]
    loader.close()


def test_loader_workers_leave_the_run_signals_to_the_main_process(tmp_path):
    # Slurm signals every process of the step and Ctrl-C the whole process group; a worker that died of one
    # (forkserver and spawn workers start with the default action; this test's process has no handlers
    # either) ended the run with a traceback instead of a save.
    import os
    import signal as signals

    from mgn.data.loader import build_loader

    loader = build_loader(_shards(tmp_path), "test", persistent=True)
    first = [key for batch in loader for key in batch["key"]]
    for worker in loader._iterator._workers:
        for name in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT"):
            os.kill(worker.pid, getattr(signals, name))
    again = [key for batch in loader for key in batch["key"]]
    assert again == first and all(worker.is_alive() for worker in loader._iterator._workers)
    loader.close()


def test_a_loader_left_open_does_not_hold_up_the_exit(tmp_path):
    # Workers ignore SIGTERM; multiprocessing's exit handler terminates workers with it and then waits for
    # them.
    import subprocess
    import sys

    _shards(tmp_path)
    script = (f"from mgn.config import preset_config\nfrom mgn.data.loader import build_loader\n"
              f"cfg = preset_config('tiny', {{'objective': {{'name': 'baseline'}}, 'data': {{'train_shards': "
              f"'{tmp_path}/train-*.tar', 'test_shards': '{tmp_path}/test-*.tar', 'num_workers': 2, "
              f"'synthetic_samples': 0}}, 'model': {{'image_size': 32}}}})\n"
              f"loader = build_loader(cfg, 'train', persistent=True)\n"
              f"batches = iter(loader)\nnext(batches)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_rollback_loads_the_tag_rank_0_chose_on_every_rank(tmp_path, monkeypatch):
    # A stale listing of a shared folder on one node must not load other weights there: rank 0 picks the tag.
    from mgn.checkpoint import store
    from mgn.train import recovery
    from mgn.train.guard import Diverged

    cfg = preset_config("tiny", {"train": {"on_divergence": "rollback", "output_dir": str(tmp_path),
                                           "run_name": "r"}})
    listed, loaded = [], []
    monkeypatch.setattr(store, "has_checkpoints", lambda folder: True)
    monkeypatch.setattr(store, "newest_intact_tag", lambda folder: listed.append(folder) or folder / "stale")
    monkeypatch.setattr(recovery.distributed, "gather_objects",
                        lambda mine: [tmp_path / "r" / "step_00000010"])
    monkeypatch.setattr(store, "load", lambda engine, folder, tag, **kw: loaded.append(tag)
                        or store.TrainState(step=10))
    state = recovery.Recovery(cfg, rank=1).roll_back(Diverged("boom", step=12), None,
                                                     store.TrainState(step=13), world_size=2)
    assert listed == [] and loaded == ["step_00000010"] and state.rollbacks[0]["at_step"] == 12


@pytest.mark.parametrize("objective", ["baseline", "guided"])
def test_the_training_loop_waits_for_the_device_at_most_once_per_update(objective, tmp_path):
    # Counted as benchmarks/host_syncs.py counts it on a GPU: here, every read of a tensor's value in the hot
    # loop (item, bool, tolist, numpy, cpu), each of which would stop the host until the GPU caught up.
    from benchmarks.host_syncs import count_host_syncs, hot_loop_config

    _shards(tmp_path / "shards")
    result = count_host_syncs(hot_loop_config(objective, tmp_path / "shards", tmp_path / "runs", "cpu", None))
    assert result["updates"] >= 8
    # nothing in the hot loop reads a device value ...
    assert result["host_syncs"] == 0, result["first_syncs"]
    # ... but the flags, once per update, a step late
    assert result["lagged_flag_reads"] == result["updates"] - 1
