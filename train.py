"""Train the Multimodal Guidance Network (or the image-only baseline) with DeepSpeed.

    python train.py                                   # embedded demo: synthetic shards, CPU, a few minutes
    python train.py --preset tiny                     # seconds-long smoke run
    torchrun --standalone --nproc_per_node 2 train.py --preset demo
    mkdir -p runs/NAME && sbatch -J NAME slurm/train.sh --preset paper   # one srun task per GPU (slurm/README.md)
    python train.py --preset paper --model.mode baseline   # the plain fine-tuned MobileOne, same script
    python train.py --help                            # every config field as --section.field

Configuration: dataclass defaults (the paper's settings) -> --preset (default: demo) -> --config FILE ->
--section.field flags. The resolved config is printed and saved as <run_dir>/config.json.
"""
import argparse
import sys

from mgn import preemption
from mgn.config import add_config_args, config_from_args
from mgn.train import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args()
    cfg = config_from_args(args)
    summary = run(cfg)
    if summary.get("requeue") and summary.get("rank", 0) == 0:
        preemption.requeue_slurm_job()
    return 0


if __name__ == "__main__":
    sys.exit(main())
