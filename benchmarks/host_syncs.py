"""How often the training loop makes the host wait for the device, counted on the real trainer: per update, in
the hot loop (every micro-batch's forward, backward and step, and each update's bookkeeping, the lagged read
of the update before it included; logging, evaluation and checkpoints are off).

    python benchmarks/host_syncs.py                     # CPU: baseline and guided, tiny preset
    # on a GPU (gpu_check.sh):
    python benchmarks/host_syncs.py --device cuda --text-model DIR --out host_syncs.json

On a GPU, torch.cuda.set_sync_debug_mode("warn") warns at every call that synchronizes the host with the
device, torch's own inside DeepSpeed and cuDNN included; they are counted. On the CPU nothing synchronizes, so
what is counted is what would on a GPU: a tensor's value read (item, bool, float, tolist, numpy, cpu), caught
by a dispatch mode and by wrapping those methods. Either way the loop's one intended wait per update, the
lagged read of its flags (mgn.devices.HostCopy.read), is counted apart. Prints a line per objective and writes
JSON; exits 1 when an objective's hot loop waits more than once per update.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgn import devices, distributed  # noqa: E402
from mgn.train import loop  # noqa: E402
from mgn.config import PACKAGED_MINILM, Config, preset_config  # noqa: E402
from mgn.shards import write_synthetic  # noqa: E402

VALUE_READS = ("tolist", "numpy", "cpu")  # Tensor methods that copy a device tensor's value to the host


class SyncCounter(TorchDispatchMode):
    """Counts, while `active`, the calls that make the host wait for the device, and the lagged flag reads."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.active = device, False
        self.syncs, self.reads, self.where = 0, 0, []
        self._saved = {}

    def install(self) -> None:
        """Wrap the value-reading methods and HostCopy.read (undone by `uninstall`)."""
        read = devices.HostCopy.read
        self._saved = {("HostCopy", "read"): read,
                       **{("Tensor", name): getattr(torch.Tensor, name) for name in VALUE_READS}}

        def counted_read(copy):
            self.reads += self.active
            active, self.active = self.active, False
            gpu = active and devices.is_gpu(self.device)
            if gpu:  # the intended wait, counted here: not also as a synchronizing call
                torch.cuda.set_sync_debug_mode("default")
            try:
                with _disable_current_modes():
                    return read(copy)
            finally:
                self.active = active
                if gpu:
                    torch.cuda.set_sync_debug_mode("warn")

        devices.HostCopy.read = counted_read
        for name in VALUE_READS:
            setattr(torch.Tensor, name, self._counting(self._saved[("Tensor", name)], name))

    def uninstall(self) -> None:
        devices.HostCopy.read = self._saved[("HostCopy", "read")]
        for name in VALUE_READS:
            setattr(torch.Tensor, name, self._saved[("Tensor", name)])

    def _counting(self, original, name):
        def call(tensor, *args, **kwargs):
            if self.active and not devices.is_gpu(self.device):  # on a GPU, the debug mode reports real syncs
                self._count(name)
            return original(tensor, *args, **kwargs)
        return call

    def _count(self, what: str) -> None:
        self.syncs += 1
        self.where.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not devices.is_gpu(self.device):
            self._count(str(func))
        return func(*args, **(kwargs or {}))

    def watch(self, method):
        """`method` of the Trainer, counted while it runs (on a GPU through torch's sync debug mode)."""
        counter = self

        def run(trainer, *args, **kwargs):
            counter.active = True
            gpu = devices.is_gpu(counter.device)
            with warnings.catch_warnings(record=True) as caught, counter:
                warnings.simplefilter("always")
                if gpu:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    return method(trainer, *args, **kwargs)
                finally:
                    if gpu:
                        torch.cuda.set_sync_debug_mode("default")
                    counter.active = False
                    for warning in caught:
                        if "synchroniz" in str(warning.message):
                            counter._count(f"{Path(warning.filename).name}:{warning.lineno}")
        return run


def count_host_syncs(cfg: Config) -> dict:
    """Train `cfg` (in this process, its process group kept for another run) with the hot loop watched; the
    counts per update."""
    device = torch.device("cuda" if cfg.train.device == "cuda" else "cpu")
    counter = SyncCounter(device)
    updates = []
    micro_batch = loop.Trainer._micro_batch
    watched = counter.watch(micro_batch)

    def counted(trainer, *args, **kwargs):
        boundary = watched(trainer, *args, **kwargs)
        updates.extend([1] if boundary else [])
        return boundary

    loop.Trainer._micro_batch = counted
    counter.install()
    try:
        # the group started here and kept: DeepSpeed cannot build its groups twice in one process
        distributed.init_distributed(distributed.detect_world(), cfg.train.dist_timeout_s, cfg.train.device)
        loop.run(cfg)
    finally:
        counter.uninstall()
        loop.Trainer._micro_batch = micro_batch
    return {"objective": cfg.objective.name, "device": str(device), "updates": len(updates),
            "host_syncs": counter.syncs, "host_syncs_per_update": counter.syncs / max(len(updates), 1),
            "lagged_flag_reads": counter.reads, "first_syncs": counter.where[:10]}


def hot_loop_config(objective: str, shards: Path, out: Path, device: str, text_model: str | None) -> Config:
    """The tiny preset, everything but the hot loop off: no log lines, evaluations or checkpoints in it."""
    return preset_config("tiny", {
        "objective": {"name": objective},
        "model": {"image_size": 32, **({"text_model": text_model} if text_model else {})},
        "data": {"train_shards": str(shards / "train-*.tar"), "test_shards": str(shards / "test-*.tar"),
                 "synthetic_samples": 0, "num_workers": 0},
        "train": {"device": device, "micro_batch": 8, "log_every": 10**6, "eval_every": -1, "ckpt_every": 0,
                  "attention_images": 0, "output_dir": str(out), "run_name": objective}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--objectives", default="baseline,guided")
    parser.add_argument("--text-model", default=None, help=f"model.text_model (default: the tiny preset's, "
                                                            f"{PACKAGED_MINILM})")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="host-syncs-"))
    write_synthetic(work / "shards", samples=96, image_size=32, seed=0, max_samples=32,
                    tokenizer=args.text_model or PACKAGED_MINILM)
    results = [count_host_syncs(hot_loop_config(name, work / "shards", work / "runs", args.device,
                                                args.text_model))
               for name in args.objectives.split(",")]
    for r in results:
        print(f"{r['objective']:>10} on {r['device']}: {r['host_syncs']} host syncs in {r['updates']} "
              "updates' hot "
              f"loop, and {r['lagged_flag_reads']} lagged flag reads" +
              (f" (first: {', '.join(r['first_syncs'])})" if r["host_syncs"] else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": args.device, "objectives": results}, indent=2) + "\n")
    return 0 if all(r["host_syncs"] == 0 and r["lagged_flag_reads"] <= r["updates"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
