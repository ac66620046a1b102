"""One rank of the data-parallel checks in tests/test_distributed.py (launched by torchrun or by hand).

It drives the trainer's own pieces (rank detection, DeepSpeed engine, loss, BN sync, checkpoint) on
fixed in-memory batches and writes what it saw to `<out>/rank<R>.pt` for the test to compare.
    python tests/dist_worker.py OUT_DIR TEXT_MODEL_DIR
"""
import sys
from pathlib import Path

import torch

from mgn import distributed
from mgn.checkpoint import store
from mgn.checkpoint.store import TrainState
from mgn.config import Config, ModelConfig, TrainConfig
from mgn.model.objectives import build_objective
from mgn.train.engine import build_engine
from tests.conftest import calibrate_batchnorm

MICRO_BATCH = 4


def tiny_config(text_model: str) -> Config:
    return Config(model=ModelConfig(image_model="mobileone_s0", image_size=64, text_model=text_model,
                                    seq_len=16,
                                    fusion_dim=32, attention_heads=2),
                  train=TrainConfig(micro_batch=MICRO_BATCH, grad_clip=0.0, warmup_steps=1,
                                    label_smoothing=0.0))


def global_batch(seed: int, world_size: int) -> dict:
    """The same global batch on every rank; each rank then takes its slice."""
    g = torch.Generator().manual_seed(seed)
    n = MICRO_BATCH * world_size
    return {"image": torch.rand(n, 3, 64, 64, generator=g) * 4 - 2,
            "input_ids": torch.randint(5, 30, (n, 16), generator=g),
            "attention_mask": torch.ones(n, 16, dtype=torch.long),
            "label": torch.randint(0, 2, (n,), generator=g)}


def rank_slice(batch: dict, rank: int) -> dict:
    return {k: v[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH] for k, v in batch.items()}


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in module.parameters()])


def bn_buffers(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([b.detach().flatten().double() for n, b in module.named_buffers() if "running" in n])


def main(out_dir: Path, text_model: str) -> None:
    world = distributed.detect_world()
    device = distributed.init_distributed(world, timeout_s=60)
    cfg = tiny_config(text_model)
    torch.manual_seed(world.rank)  # different init per rank: DeepSpeed's start-up broadcast must fix it
    engine = build_engine(build_objective(cfg), cfg, device, total_steps=10)
    calibrate_batchnorm(engine.module.student, image_size=64)  # same inputs on every rank: equal buffers
    record = {"world": [world.rank, world.world_size, world.source], "initial": flat_params(engine.module),
              "backward_allreduce": engine.enable_backward_allreduce,
              "initial_state": {k: v.clone() for k, v in engine.module.state_dict().items()}}

    # 1. Gradient averaging, in eval mode so BatchNorm does not couple samples within a batch.
    engine.eval()
    batch = rank_slice(global_batch(0, world.world_size), world.rank)
    labels = batch.pop("label")
    engine.backward(engine(**batch, label=labels).loss)
    record["grads"] = torch.cat([p.grad.detach().flatten().double() if p.grad is not None
                                 else torch.zeros(p.numel(), dtype=torch.double)
                                 for p in engine.module.parameters()])
    engine.step()

    # 2. Training steps: parameters identical across ranks after each step; BN buffers drift apart.
    engine.train()
    record["params_per_step"] = []
    for step in range(3):
        batch = rank_slice(global_batch(1 + step, world.world_size), world.rank)
        labels = batch.pop("label")
        engine.backward(engine(**batch, label=labels).loss)
        engine.step()
        record["params_per_step"].append(flat_params(engine.module))
    record["bn_before_sync"] = bn_buffers(engine.module)
    distributed.sync_batchnorm_buffers(engine.module)
    record["bn_after_sync"] = bn_buffers(engine.module)

    # 3. Checkpoint round trip: save, train on, load, and check weights, optimizer and schedule are back.
    state = TrainState(step=4, epoch=0, batch_in_epoch=4)
    tag = store.save(engine, out_dir / "ckpt", state, cfg.to_dict(), keep_last=2, rank=world.rank,
                          world_size=world.world_size)
    saved = {"params": flat_params(engine.module), "lr": [g["lr"] for g in engine.optimizer.param_groups],
             "sched": engine.lr_scheduler.state_dict()["last_epoch"],
             "exp_avg": _first_exp_avg(engine)}
    batch = rank_slice(global_batch(9, world.world_size), world.rank)
    labels = batch.pop("label")
    engine.backward(engine(**batch, label=labels).loss)
    engine.step()
    record["moved_after_save"] = not torch.equal(saved["params"], flat_params(engine.module))
    loaded_state = store.load(engine, out_dir / "ckpt", tag, rank=world.rank, world_size=world.world_size)
    record["restored"] = {
        "params": torch.equal(saved["params"], flat_params(engine.module)),
        "lr": saved["lr"] == [g["lr"] for g in engine.optimizer.param_groups],
        "sched": saved["sched"] == engine.lr_scheduler.state_dict()["last_epoch"],
        "exp_avg": torch.equal(saved["exp_avg"], _first_exp_avg(engine)),
        "state": loaded_state == state,
    }
    torch.save(record, out_dir / f"rank{world.rank}.pt")
    distributed.barrier()


def _first_exp_avg(engine) -> torch.Tensor:
    optimizer = engine.optimizer
    param = optimizer.param_groups[0]["params"][0]
    return optimizer.state[param]["exp_avg"].detach().clone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
