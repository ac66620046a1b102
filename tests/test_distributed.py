"""Data-parallel training over gloo: rank detection, gradient averaging, BN sync, checkpoints."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgn.distributed import detect_world, first_host, slurm_port
from mgn.model.objectives import build_objective
from tests.conftest import free_port
from tests.dist_worker import MICRO_BATCH, global_batch, tiny_config

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                    "LOCAL_RANK",
                                                                     "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def run_torchrun(out: Path, text_model: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER),
           str(out), text_model]
    result = subprocess.run(cmd, env=base_env(), cwd=ROOT, timeout=240, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def run_by_hand(out: Path, text_model: str) -> None:
    """Two plain processes with the variables srun + our launcher scripts would set."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = base_env() | dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), text_model], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]


@pytest.fixture(scope="module", params=["torchrun", "by_hand"])
def records(request, tmp_path_factory, bert32):
    out = tmp_path_factory.mktemp(request.param)
    (run_torchrun if request.param == "torchrun" else run_by_hand)(out, bert32)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], bert32


pytestmark = pytest.mark.slow


def test_both_ranks_took_part(records):
    (r0, r1), _ = records
    assert (r0["world"][:2], r1["world"][:2]) == ([0, 2], [1, 2]) and r0["world"][2] == "launcher"


def test_parameters_identical_across_ranks_after_every_step(records):
    (r0, r1), _ = records
    assert torch.equal(r0["initial"], r1["initial"])  # DeepSpeed broadcast the (rank-seeded) init
    for step0, step1 in zip(r0["params_per_step"], r1["params_per_step"]):
        assert torch.equal(step0, step1)
    assert not torch.equal(r0["params_per_step"][0], r0["params_per_step"][-1])  # training did move them


def test_gradients_are_the_average_of_the_concatenated_batch(records):
    (r0, r1), text_model = records
    assert torch.equal(r0["grads"], r1["grads"])
    cfg = tiny_config(text_model)
    reference = build_objective(cfg)
    reference.load_state_dict(r0["initial_state"])
    reference.eval()
    batch = global_batch(0, world_size=2)  # both ranks' slices, in one process
    labels = batch.pop("label")
    assert len(labels) == 2 * MICRO_BATCH
    reference(**batch, label=labels).loss.backward()
    expected = torch.cat([p.grad.flatten().double() if p.grad is not None else torch.zeros(p.numel(),
                          dtype=torch.double) for p in reference.parameters()])
    assert expected.abs().sum() > 0
    # Relative to the whole gradient's norm: a sum instead of a mean, or a rank's own unreduced gradient,
    # would be off by ~100%; fp32 summation order (8 samples vs. 2 x 4) accounts for ~1e-6.
    relative_error = ((r0["grads"] - expected).norm() / expected.norm()).item()
    assert relative_error < 1e-4, relative_error


def test_one_rank_skips_deepspeeds_gradient_all_reduce_and_keeps_the_gradient(records, tmp_path):
    (r0, _), text_model = records
    assert r0["backward_allreduce"]  # two ranks average their gradients
    env = base_env() | dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port()))
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path), text_model], env=env, cwd=ROOT,
                          timeout=240,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    alone = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert not alone["backward_allreduce"]  # a bucket reduced with itself and copied back: skipped
    reference = build_objective(tiny_config(text_model))
    reference.load_state_dict(alone["initial_state"])
    reference.eval()
    batch = global_batch(0, world_size=1)
    labels = batch.pop("label")
    reference(**batch, label=labels).loss.backward()
    expected = torch.cat([p.grad.flatten().double() if p.grad is not None else torch.zeros(p.numel(),
                          dtype=torch.double) for p in reference.parameters()])
    assert torch.equal(alone["grads"], expected)  # the engine's gradient is the plain backward's, untouched


def test_batchnorm_buffers_drift_and_are_equal_after_sync(records):
    (r0, r1), _ = records
    assert (r0["bn_before_sync"] - r1["bn_before_sync"]).abs().max() > 1e-3  # DeepSpeed never syncs them
    torch.testing.assert_close(r0["bn_after_sync"], r1["bn_after_sync"], rtol=0, atol=1e-6)


def test_checkpoint_restores_weights_optimizer_schedule_and_position(records):
    (r0, r1), _ = records
    for record in (r0, r1):
        assert record["moved_after_save"]
        assert record["restored"] == {"params": True, "lr": True, "sched": True, "exp_avg": True,
                                      "state": True}


# --- rank detection, no processes needed ---------------------------------------------------------------
def test_world_from_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_STEP_NODELIST": "gpu[07-09,12]"}
    world = detect_world(env)
    assert (world.rank, world.local_rank, world.world_size, world.source) == (5, 1, 8, "slurm")
    assert world.master_addr == "gpu07" and world.master_port == slurm_port(4242)


def test_batch_script_shell_is_not_a_rank():
    """Inside sbatch but outside srun there is no step: run single-process instead of waiting for peers."""
    world = detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1",
                          "SLURM_JOB_NODELIST": "n1"})
    assert (world.world_size, world.source) == (1, "single")


def test_launcher_variables_win_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"}
    world = detect_world(env)
    assert (world.rank, world.world_size, world.master_addr, world.master_port) == (1, 2, "n1", 1234)


ONE_PROCESS_GROUP = """
import socket, sys, torch.distributed as dist
from mgn import distributed
held = socket.socket()
held.bind(("0.0.0.0", int(sys.argv[1])))
held.listen()
distributed.init_distributed(distributed.detect_world(), 60, "cpu")
print(dist.get_world_size(), dist.get_rank())
"""


@pytest.mark.parametrize("variables", [{}, {"RANK": "0", "WORLD_SIZE": "1"}],
                         ids=["single", "launcher of one"])
def test_a_one_process_run_needs_no_port_even_where_its_master_port_is_taken(variables):
    # CI failed four tests with EADDRINUSE: one process rendezvoused over TCP on a port something else held
    port = free_port()
    done = subprocess.run([sys.executable, "-c", ONE_PROCESS_GROUP, str(port)], cwd=ROOT, timeout=120,
                          env=base_env() | variables | {"MASTER_PORT": str(port)}, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["1", "0"]


@pytest.mark.parametrize("nodelist,first", [("n1", "n1"), ("n[1-2]", "n1"), ("gpu[07-09,12],cpu1", "gpu07"),
                                            ("node-a,node-b", "node-a")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first
