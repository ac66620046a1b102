"""GPU paths checked on CPU: what NCCL, CUDA and mixed precision need, without a GPU.

- every tensor the training log hands to a collective lives on the rank's device (NCCL refuses CPU tensors;
  the `meta` device stands in for a GPU here, so a CPU tensor shows up as the wrong device);
- a GPU job on a node where CUDA does not work stops with a clear message instead of training on the CPU,
  and more ranks than GPUs on a node is refused;
- the optimizer's skip of a non-finite update is one decision for all ranks when `agree` is given (ZeRO-1/2);
- bf16 is autocast over fp32 weights and fp32 BatchNorm statistics, never DeepSpeed's bf16 section.
"""
from __future__ import annotations

import pytest
import torch

from mgn import distributed, engine, monitor
from mgn.config import preset_config
from mgn.guard import GuardedAdamW
from mgn.objectives import StepOutput, build_objective


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
    with pytest.raises(RuntimeError, match=r"GPUs were allocated \(SLURM_GPUS_ON_NODE=4\).*--train.device cpu"):
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
    # This rank's gradients are finite, but another rank's partition was not: the agreed decision skips here too.
    param, optimizer = _optimizer(agree=lambda bad: True)
    optimizer.step()
    assert optimizer.skipped and torch.equal(param.detach(), torch.ones(3))
    # Without agreement (ZeRO-0, where every rank holds the same averaged gradients) the rank decides alone.
    param, optimizer = _optimizer(agree=None)
    optimizer.step()
    assert not optimizer.skipped and not torch.equal(param.detach(), torch.ones(3))
    # The rank's own verdict is what it offers to the others.
    offered = []
    param, optimizer = _optimizer(agree=lambda bad: offered.append(bad) or bad)
    param.grad[0] = float("nan")
    optimizer.step()
    assert offered == [True] and optimizer.skipped


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
    with pytest.raises(ValueError, match=r"train.precision='fp16': expected one of \['auto', 'fp32', 'bf16'\]"):
        preset_config("tiny", {"train": {"precision": "fp16"}})


def test_a_gpu_runs_uint8_batches_normalise_on_the_device_to_the_cpu_paths_values(tmp_path):
    from mgn.data import build_loader
    from mgn.decode import DeviceNormaliser
    from mgn.model import image_normalisation
    from mgn.shards import write_synthetic
    from mgn.train import model_inputs

    write_synthetic(tmp_path, samples=40, image_size=64, seed=0, max_samples=16)
    cfg = preset_config("tiny", {"objective": {"name": "baseline"},
                                 "data": {"train_shards": str(tmp_path / "train-*.tar"),
                                          "test_shards": str(tmp_path / "test-*.tar"), "synthetic_samples": 0}})
    on_host = next(iter(build_loader(cfg, "test")))
    on_device = next(iter(build_loader(cfg, "test", on_device=True)))
    assert on_device["image"].dtype == torch.uint8 and on_device["image"].shape[-1] == 3  # NHWC, a quarter the bytes
    assert on_host["image"].dtype == torch.float32 and on_host["key"] == on_device["key"]
    cpu = torch.device("cpu")  # the normaliser's arithmetic, run here where the GPU would run it
    normaliser = DeviceNormaliser(*image_normalisation(cfg.model.image_model), cpu)
    image = model_inputs(on_device, cpu, captions=False, normaliser=normaliser)["image"]
    assert image.shape == on_host["image"].shape and image.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(image, on_host["image"], rtol=0, atol=1e-6)


def test_a_persistent_test_loader_reads_the_same_samples_at_every_evaluation(tmp_path):
    from mgn.data import build_loader
    from mgn.shards import write_synthetic

    write_synthetic(tmp_path, samples=60, image_size=32, seed=0, max_samples=16)
    cfg = preset_config("tiny", {"objective": {"name": "baseline"},
                                 "data": {"train_shards": str(tmp_path / "train-*.tar"), "num_workers": 2,
                                          "test_shards": str(tmp_path / "test-*.tar"), "synthetic_samples": 0}})
    loader = build_loader(cfg, "test", persistent=True)
    passes = [[key for batch in loader for key in batch["key"]] for _ in range(3)]
    assert passes[0] and passes[0] == passes[1] == passes[2]
    assert loader._loader is not None and loader._loader.persistent_workers  # the same workers served every pass


def test_the_guard_clips_as_torch_does_and_takes_clipping_from_deepspeed_only_under_zero0():
    from mgn.config import preset_config
    from mgn.engine import deepspeed_config

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    for a, b in zip(weights, twins):
        a.grad = torch.randn_like(a) * 10  # a global norm far above 1: clipped
        b.grad = a.grad.clone()
    GuardedAdamW(weights, lr=0.1, clip=1.0).step()
    torch.nn.utils.clip_grad_norm_(twins, 1.0)
    torch.optim.AdamW(twins, lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(weights, twins))  # bitwise: the same fused operations
    # ZeRO-0: the guard clips and DeepSpeed does not (a second pass); ZeRO-1/2: DeepSpeed clips the partitions.
    for stage, deepspeed_clip in ((0, 0.0), (1, 0.5), (2, 0.5)):
        cfg = preset_config("tiny", {"train": {"zero_stage": stage, "grad_clip": 0.5}})
        assert deepspeed_config(cfg)["gradient_clipping"] == deepspeed_clip
