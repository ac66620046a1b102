"""Training step time: every objective (guided MGN and its variants) vs. the image-only baseline, side by side.

The engines are built in one process and timed in alternating rounds on the same in-memory batches,
so machine noise hits them alike. "guided" encodes every caption (a first epoch); "guided_cached"
has `model.text_cache` on and has seen the captions (later epochs). A second pass feeds the guided
engine from the real loader to measure the data-wait fraction of step time.

    python benchmarks/train_step.py                        # demo preset, CPU
    python benchmarks/train_step.py --preset paper --workers 8   # on a GPU node (needs paper shards)
Goals: guided/baseline step-time ratio <= 1.5; data wait < 5% with enough workers.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgn import distributed  # noqa: E402
from mgn.config import OBJECTIVES, PRESETS, Config, preset_config  # noqa: E402
from mgn.data import build_loader  # noqa: E402
from mgn.objectives import build_objective  # noqa: E402
from mgn.train import build_engine, ensure_demo_shards, model_inputs  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader(cfg: Config, world):
    return build_loader(cfg, "train", rank=world.rank, world_size=world.world_size, captions=True)


def step(engine, batch: dict, cfg: Config, device: torch.device) -> None:
    inputs = model_inputs(batch, device, next(engine.module.parameters()).dtype, cfg.uses_captions)
    engine.backward(engine(**inputs, label=batch["label"].to(device)).loss)
    engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="loader workers for the data-wait pass")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args()

    cached = {"freeze_text": True, "text_cache": 10**6}
    variants = {"baseline": ({"name": "baseline"}, {}),
                "guided": ({"name": "guided"}, {"freeze_text": True, "text_cache": 0}),  # encodes every caption
                "guided_cached": ({"name": "guided"}, cached),
                # every other objective, with the text cache of later epochs: the cost line of each variant
                **{name: ({"name": name}, cached) for name in OBJECTIVES if name not in ("baseline", "guided")},
                "caption_dropout": ({"name": "guided", "caption_dropout": 0.5}, cached)}
    configs = {name: preset_config(args.preset, {"objective": objective, "model": model,
                                                 "data": {"num_workers": args.workers}})
               for name, (objective, model) in variants.items()}
    world = distributed.detect_world()
    device = distributed.init_distributed(world, timeout_s=300)
    ensure_demo_shards(configs["guided"])
    engines = {}
    for mode, cfg in configs.items():
        torch.manual_seed(0)
        engines[mode] = build_engine(build_objective(cfg), cfg, device, total_steps=10**6)
        engines[mode].train()
    batches = []
    for batch in loader(configs["guided"], world):
        batches.append(batch)
        if len(batches) == args.steps:
            break

    times = {mode: [] for mode in engines}
    for mode, engine in engines.items():  # warmup: allocator, kernels, lazy init
        for batch in batches[:2]:
            step(engine, batch, configs[mode], device)
    for _ in range(args.rounds):
        for mode, engine in engines.items():
            synchronize(device)
            start = time.perf_counter()
            for batch in batches:
                step(engine, batch, configs[mode], device)
            synchronize(device)
            times[mode].append((time.perf_counter() - start) / len(batches))

    # Data-wait pass: the guided engine fed by the real loader.
    wait = total = 0.0
    samples = 0
    tick = time.perf_counter()
    for i, batch in enumerate(loader(configs["guided"], world)):
        fetched = time.perf_counter()
        step(engines["guided"], batch, configs["guided"], device)
        synchronize(device)
        done = time.perf_counter()
        if i >= 2:  # skip worker start-up
            wait += fetched - tick
            total += done - tick
            samples += len(batch["label"])
        tick = done
        if i + 1 == args.steps + 2:
            break

    micro_batch = configs["guided"].train.micro_batch
    result = {
        "preset": args.preset, "device": str(device), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "micro_batch": micro_batch, "steps_per_round": args.steps, "rounds": args.rounds,
        "step_s": {mode: statistics.median(t) for mode, t in times.items()},
        "step_s_rounds": times,
        "loader_workers": args.workers,
        "guided_samples_per_s_with_loader": samples / total,
        "data_wait_fraction": wait / total,
    }
    result["guided_over_baseline"] = result["step_s"]["guided"] / result["step_s"]["baseline"]
    result["guided_cached_over_baseline"] = result["step_s"]["guided_cached"] / result["step_s"]["baseline"]
    for mode in engines:
        result[f"{mode}_samples_per_s"] = micro_batch / result["step_s"][mode]
    if world.is_main:
        print(f"MGN benchmark ({args.preset}, {device}, {torch.get_num_threads()} threads, micro-batch {micro_batch})")
        print(f"  baseline step  {result['step_s']['baseline'] * 1e3:8.1f} ms  "
              f"({result['baseline_samples_per_s']:.1f} samples/s)")
        print(f"  guided step    {result['step_s']['guided'] * 1e3:8.1f} ms  "
              f"({result['guided_samples_per_s']:.1f} samples/s)")
        print(f"  guided, cached text {result['step_s']['guided_cached'] * 1e3:5.1f} ms  "
              f"({result['guided_cached_samples_per_s']:.1f} samples/s)")
        print(f"  guided / baseline = {result['guided_over_baseline']:.2f} cold (every caption encoded), "
              f"{result['guided_cached_over_baseline']:.2f} with cached text  (goal <= 1.5)")
        for mode in engines:
            if mode not in ("baseline", "guided", "guided_cached"):
                print(f"  {mode:<19} {result['step_s'][mode] * 1e3:6.1f} ms  "
                      f"({result['step_s'][mode] / result['step_s']['baseline']:.2f} x baseline, cached text)")
        print(f"  data wait with {args.workers} workers: {100 * result['data_wait_fraction']:.1f}% of step time "
              f"(goal < 5%)")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
