"""Time the deployed student (reparameterized MobileOne + head) against its unfused form and plain timm
MobileOne.

    python benchmark.py --model mobileone_s4                 # random init (stated in the output), 224 px
    python benchmark.py --ckpt runs/demo                     # a trained student, at its own image size
    python benchmark.py --tiny                               # seconds: S0 at 64 px, few iterations
    python benchmark.py --model mobileone_s4 --precision bf16 --channels-last --compile   # on a GPU
    python benchmark.py --model mobileone_s4 --device cuda --batch-sizes 256   # ms/img vs the paper's 0.13
    python benchmark.py --ckpt runs/demo --clip models/clip-b16   # the student beside CLIP's image tower

Before timing, fused and unfused outputs (and student vs plain timm) are compared; a mismatch stops the run.
CPU: perf_counter per call with --threads torch threads; GPU: CUDA events with synchronisation, cuDNN
autotuning, TF32 off ("fp32" is IEEE fp32; with fp32 a "tf32" row shows the deployed student with TF32).
The deployed student is also timed end to end from a host batch (uint8 and float; pinned on GPU), copy
included. Throughput batch sizes, iterations and the matmul size default by device: 8,32 / 10 / 2048 on
CPU, 32..512 / 20 / 8192 on GPU. ms/img at the largest batch is printed beside the paper's S4 figure.
Writes a JSON report (device, driver, versions, settings, all samples' statistics) to --out.
"""
import argparse
import math
import re
import sys
from dataclasses import replace

from mgn.cli import require, run_command
from mgn.config_checks import MIN_IMAGE_SIZE, check_image_model


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0, or 2 after one line `benchmark.py: error: ...` for a bad flag, checkpoint or
    check."""
    return run_command("benchmark.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    # Defaults of None are mgn.bench.latency.Settings' own, filled in after parsing: --help answers before
    # torch loads.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--ckpt", default=None, help="run folder, checkpoint tag/latest, or "
                                                     "student.safetensors / .pt2")
    source.add_argument("--model", default=None, help="timm MobileOne variant with random init (default "
                                                      "mobileone_s4)")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's, or 224 (64 with "
                                                                "--tiny)")
    p.add_argument("--num-classes", type=int, default=2, help="with --model (default 2)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"], help="default fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the timed models")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed batch-1 calls per model")
    p.add_argument("--rounds", type=int, default=None, help="models take turns over this many rounds")
    p.add_argument("--batch-sizes", default=None,
                   help="throughput batch sizes, e.g. 32,256 (default: 8,32 on CPU; "
                        "32,64,128,256,512 on GPU)")
    p.add_argument("--throughput-iters", type=int, default=None, help="default: 10 on CPU, 20 on GPU")
    p.add_argument("--matmul-size", type=int, default=None, help="square matmul of the peak (default: 2048 "
                                                                 "on CPU, "
                                                                 "8192 on GPU)")
    p.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the deployed student from a host batch, copy included (default: yes)")
    p.add_argument("--tf32-row", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU, fp32: also time the deployed student with TF32 allowed (default: yes)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU: cuDNN autotuning for the fixed shapes timed (default: yes)")
    p.add_argument("--compare-unfused", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the unfused student as the reference (default: yes)")
    p.add_argument("--rtol", type=float, default=None, help="fused vs unfused: max |diff| / max |logit|")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (S0, 64 px, few iterations)")
    p.add_argument("--clip", default=None, metavar="MODEL",
                   help="also time a CLIP model's image tower (local transformers folder), "
                        "beside the student")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a student.pt2 that holds pickled parts (can run code): trusted "
                        "sources only")
    p.add_argument("--out", default="benchmarks/results/latency.json", help="JSON report path")
    a = p.parse_args(argv)
    check_flags(a)

    from mgn.bench.latency import BenchmarkError, Settings, run, tiny_settings  # heavy: torch, timm

    given = {"device": a.device, "precision": a.precision, "threads": a.threads, "warmup": a.warmup,
             "iters": a.iters, "rounds": a.rounds, "throughput_iters": a.throughput_iters,
             "matmul_size": a.matmul_size, "compare_unfused": a.compare_unfused, "rtol": a.rtol,
             "end_to_end": a.end_to_end, "tf32_row": a.tf32_row, "cudnn_benchmark": a.cudnn_benchmark,
             "batch_sizes": None if a.batch_sizes is None else batch_sizes(a.batch_sizes)}
    settings = Settings(channels_last=a.channels_last, compile=a.compile,
                        **{k: v for k, v in given.items() if v is not None})
    variant = a.model or "mobileone_s4"
    image_size = a.image_size
    if a.tiny:
        settings = tiny_settings(settings)
        if a.batch_sizes:  # asked for explicitly: kept
            settings = replace(settings, batch_sizes=batch_sizes(a.batch_sizes))
        variant = a.model or "mobileone_s0"
        image_size = image_size or (None if a.ckpt else 64)
    try:
        run(settings, ckpt=a.ckpt, variant=variant, image_size=image_size, num_classes=a.num_classes,
            out=a.out,
            trust=a.trust_checkpoint, clip=a.clip)
    except BenchmarkError as error:  # a check before timing failed (e.g. fused and unfused outputs disagree)
        raise ValueError(str(error)) from error
    return 0


def check_flags(a: argparse.Namespace) -> None:
    """Every number and name in range, before anything loads: one line naming the flag (mgn/cli.py)."""
    if a.model is not None:
        check_image_model("--model", a.model)
    if a.image_size is not None:
        require("--image-size", a.image_size, a.image_size >= MIN_IMAGE_SIZE, f"must be >= {MIN_IMAGE_SIZE}")
    require("--num-classes", a.num_classes, a.num_classes >= 2, "must be >= 2")
    if a.device is not None:
        require("--device", a.device, re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device) is not None,
                "expected auto, cpu, cuda or cuda:N")
    for flag, value, low in (("--threads", a.threads, 0), ("--warmup", a.warmup, 0), ("--iters", a.iters, 1),
                             ("--rounds", a.rounds, 1), ("--throughput-iters", a.throughput_iters, 1),
                             ("--matmul-size", a.matmul_size, 1)):
        if value is not None:
            require(flag, value, value >= low, f"must be >= {low}")
    if a.rtol is not None:
        require("--rtol", a.rtol, math.isfinite(a.rtol) and a.rtol > 0, "must be a finite number > 0")
    if a.batch_sizes is not None:
        batch_sizes(a.batch_sizes)


def batch_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(b) for b in text.split(",") if b.strip().isdigit())
    require("--batch-sizes", text, len(sizes) == len([b for b in text.split(",") if b.strip()]) and sizes
            and min(sizes) >= 1, "expected comma-separated whole numbers >= 1, e.g. 8,32")
    return sizes


if __name__ == "__main__":
    sys.exit(main())
