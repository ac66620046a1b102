"""Why a CPU run keeps the model NCHW (mgn/devices.py memory_format): train steps of MobileOne-S0 in
channels-last and in NCHW, each in a fresh process, counting the processes that crash.

    python benchmarks/channels_last_cpu.py                       # 4 runs of each layout at 96 px, batch 32
    python benchmarks/channels_last_cpu.py --runs 8 --image-size 128 \
        --out benchmarks/results/channels_last_cpu.json

Each run is a child process (a crash corrupts the heap: it must not take the counter down with it) with 2
threads: forward, backward and an AdamW step, twice. Prints a line per layout and writes JSON: runs, crashes,
exit codes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, torch, timm
size, layout = int(sys.argv[1]), sys.argv[2]
fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
torch.manual_seed(0)
model = timm.create_model("mobileone_s0", num_classes=2).to(memory_format=fmt)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(32, 3, size, size).contiguous(memory_format=fmt)
y = torch.randint(0, 2, (32,))
for _ in range(2):
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="child processes per layout")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    results = {}
    for layout in ("channels_last", "nchw"):
        codes = [subprocess.run([sys.executable, "-c", CHILD, str(args.image_size), layout], env=env,
                                capture_output=True, check=False).returncode for _ in range(args.runs)]
        results[layout] = {"runs": args.runs, "crashes": sum(code != 0 for code in codes),
                           "exit_codes": codes}
        print(f"{layout:>13}: {results[layout]['crashes']} of {args.runs} runs crashed (exit codes {codes})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"image_size": args.image_size, "batch": 32, "threads": 2,
                                              "model": "mobileone_s0", **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
