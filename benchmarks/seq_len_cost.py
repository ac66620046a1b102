"""What whole captions cost: seconds per guided training step at two `model.seq_len` values, side by side.

Both engines are built in one process from the same weights and timed in alternating rounds on the same images
(the same loader batches, tokenized at each length), so machine noise hits them alike. "cold" encodes every
caption (a first epoch, or `model.text_cache 0`); "cached" has seen the captions (later epochs with the text
cache, which the demo and compare presets turn on).

    python benchmarks/seq_len_cost.py --preset demo              # 16 vs the preset's own seq_len
    python benchmarks/seq_len_cost.py --preset compare --lengths 16,36,49 --out /tmp/cost.json
"""
import argparse
import itertools
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import engine_step, time_rounds  # noqa: E402

from mgn import distributed  # noqa: E402
from mgn.config import PRESETS, preset_config  # noqa: E402
from mgn.data.loader import build_loader  # noqa: E402
from mgn.train.engine import build_engine  # noqa: E402
from mgn.model.objectives import build_objective  # noqa: E402
from mgn.train.loop import ensure_demo_shards  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--lengths", default=None, help="comma-separated seq_len values (default: 16 and the "
                                                   "preset's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and mode")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-shards", default=None, help="shards to read (the compare preset names none)")
    p.add_argument("--out", default=None, help="write the result as JSON here too")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else \
        [16, PRESETS[args.preset]["model"]["seq_len"]]
    data = {"num_workers": 0} | ({"train_shards": args.train_shards} if args.train_shards else {})
    world = distributed.detect_world()
    device = distributed.init_distributed(world, timeout_s=300)
    steps, feeds = {}, {}
    for seq_len, cache in itertools.product(lengths, (0, 10**6)):
        cfg = preset_config(args.preset, {"objective": {"name": "guided"}, "data": data,
                                          "model": {"seq_len": seq_len, "text_cache": cache}})
        ensure_demo_shards(cfg)
        torch.manual_seed(0)
        engine = build_engine(build_objective(cfg), cfg, device, total_steps=10**6)
        engine.train()
        mode = f"seq_len {seq_len} {'cached' if cache else 'cold'}"
        steps[mode] = engine_step(engine, cfg, device)
        feeds[mode] = list(itertools.islice(build_loader(cfg, "train", rank=0, world_size=1, captions=True),
                                            args.steps))
    # time_rounds feeds every mode the same list: an index, which each mode turns into its own batch
    indexed = {mode: (lambda i, s=step, f=feeds[mode]: s(f[i])) for mode, step in steps.items()}
    times = time_rounds(indexed, list(range(args.steps)), device, warmup=args.steps, rounds=args.rounds)
    step_s = {mode: statistics.median(t) for mode, t in times.items()}
    result = {"preset": args.preset, "lengths": lengths, "step_s": step_s, "step_s_rounds": times,
              "micro_batch": PRESETS[args.preset]["train"]["micro_batch"], "steps_per_round": args.steps,
              "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "torch": torch.__version__}
    print(f"MGN seq_len cost ({args.preset}, {device}, {torch.get_num_threads()} threads; median of "
          f"{args.rounds} "
          f"alternating rounds of {args.steps} steps)")
    for mode, seconds in step_s.items():
        kind = mode.rsplit(" ", 1)[1]
        ratio = seconds / step_s[f"seq_len {lengths[0]} {kind}"]
        print(f"  {mode:<22} {seconds:6.3f} s/step  ({ratio:.2f} x seq_len {lengths[0]})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
