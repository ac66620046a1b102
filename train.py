"""Train the Multimodal Guidance Network (or another objective, or the image-only baseline) with DeepSpeed.

    python train.py                                   # embedded demo: synthetic shards, CPU, a few minutes
    python train.py --preset tiny                     # seconds-long smoke run
    torchrun --standalone --nproc_per_node 2 train.py --preset demo
    mkdir -p runs/NAME && sbatch -J NAME slurm/train.sh --preset paper   # one task per GPU (slurm/README.md)
    python train.py --preset paper --objective.name baseline  # the plain fine-tuned MobileOne, same script
    python train.py --preset paper --help     # every config field as --section.field, with paper's defaults

Configuration: dataclass defaults (the paper's settings) -> --preset (default: demo) -> --config FILE ->
--section.field flags. The resolved config is printed and saved as <run_dir>/config.json.
"""
import argparse
import sys

from mgn.cli import config_from_cli, run_command
from mgn.train.inputs import check_training_inputs
from mgn.config import PRESETS, add_config_args


def main(argv: list[str] | None = None, faults=None) -> int:
    """`faults`: the tests' seam (tests/fault_train.py); None in every real run."""
    # The preset decides the defaults --help shows; torch & co. load only after parsing (--help is instant).
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", default="demo")
    chosen, _ = preset.parse_known_args(argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, preset=chosen.preset if chosen.preset in PRESETS else "demo")
    cfg = config_from_cli(parser.parse_args(argv))  # every field checked: one line and exit 2 (mgn/cli.py)
    check_training_inputs(cfg)  # the files the flags name, on every rank, before any collective

    from mgn.checkpoint.read import check_init_from  # heavy: torch

    check_init_from(cfg)  # readable and fitting this run, before a run folder is made

    from mgn.train import preemption
    from mgn.train.loop import run  # heavy: torch, DeepSpeed

    # 4 when a signal stopped it before its end (mgn/cli.py)
    return preemption.exit_code(run(cfg, faults=faults))


if __name__ == "__main__":
    sys.exit(run_command("train.py", main))
