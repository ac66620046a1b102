"""Does caption guidance give a better image-only student than the plain fine-tune? Paired, repeated, honest.

    python compare.py                                  # the default table: synthetic data, CPU, about 90 min
    python compare.py --dry-run                        # the plan and its estimate, nothing run
    python compare.py --train-shards 'mine/train-*.tar' --test-shards 'mine/test-*.tar' --pretrained hub
    python compare.py --arms baseline,guided,tram --seeds 10 --train.epochs 20
    python compare.py --slurm --gpus-per-node 8 --partition gpu --time 600   # each run a Slurm job (submitit)

Each arm (mgn/compare/arms.toml, or --arms-file) is a set of config overrides trained through the normal training
path (train.py's loop, data pipeline, DeepSpeed engine and export); each run's final student is then
evaluated on the test shards. For a seed, every arm starts from the same image encoder and head and reads
the same samples in the same order, so arms are compared with the baseline seed by seed.

The default plan, on the synthetic moderation data (shards/README.md) whose test split decorrelates the
spurious badge from the label:
  scarce/scratch      all default arms x 5 seeds, 600 training samples, random init
  plentiful/scratch   baseline and guided x 5 seeds, 1,500 training samples
  scarce/standin      baseline and guided x 5 seeds from a stand-in pretrained encoder (see --pretrained)
Every finished run is appended to <out>/results.jsonl at once; the same command again skips those runs,
so an interrupted table resumes. The verdict goes to <out>/table.md, summary.json and paired.png; runs,
data and the stand-in to --work. The base config is --preset compare (MobileOne-S0, 64 px, 10 epochs;
mgn/config.py); --preset, --config and --section.field flags change it for every arm alike.
"""
import argparse
import shlex
import sys
from pathlib import Path

from mgn.config import add_config_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/compare", help="where the verdict and results.jsonl go")
    p.add_argument("--work", default="runs/compare", help="runs, data, stand-in encoder and logs (large)")
    p.add_argument("--arms", default=None, help="comma-separated arms (default: baseline, guided, guided-unfrozen, "
                                                "attend-fusion, no-student-term); 'all': every arm of the arms files")
    p.add_argument("--arms-file", default=None, help="a TOML file of extra arms, in mgn/compare/arms.toml's format")
    p.add_argument("--all-settings", action="store_true",
                   help="run every chosen arm in every setting (default: baseline and guided outside the first)")
    p.add_argument("--settings", default=None,
                   help="comma-separated settings to run, in this order, e.g. scarce/standin,scarce/scratch; "
                        "plentiful/standin (the pretrained start on the plentiful set) runs only when named "
                        "(default: every size from scratch and scarce/standin; --dry-run lists them)")
    p.add_argument("--seeds", type=int, default=5, help="paired seeds 0..N-1 (default 5)")
    p.add_argument("--scarce", type=int, default=600, help="training samples of the scarce synthetic set")
    p.add_argument("--plentiful", type=int, default=1500, help="training samples of the plentiful synthetic set")
    p.add_argument("--test", type=int, default=1000, help="test samples of the synthetic set")
    p.add_argument("--train-shards", default=None, help="your own training shards instead of the synthetic sets")
    p.add_argument("--test-shards", default=None, help="your own test shards (with --train-shards)")
    p.add_argument("--pretrained", default="standin",
                   help="the pretrained setting's image encoder: standin (built here, offline; the default), "
                        "hub (timm's ImageNet weights, downloads), a weights file, or none (no such setting)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per local run (default: all CPUs)")
    p.add_argument("--clip", default=None, metavar="MODEL",
                   help="add the CLIP zero-shot reference row: a local transformers CLIP folder (no training)")
    p.add_argument("--prompts", default=None, help="with --clip: JSON {class name: [prompts]} in class-index order")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate; run nothing")
    p.add_argument("--allow-truncated-captions", action="store_true",
                   help="compare guided arms even when more than 2%% of a split's captions are cut at model.seq_len "
                        "(refused by default: the text encoder would never see their ends)")
    slurm = p.add_argument_group("slurm (with --slurm: one submitit job per run)")
    slurm.add_argument("--slurm", action="store_true")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=1, help="0 on CPU-only nodes")
    slurm.add_argument("--cpus-per-task", type=int, default=8)
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", type=int, default=240, help="minutes per job")
    add_config_args(p, preset="compare")
    args = p.parse_args(argv)

    from mgn.compare import Options, run  # noqa: PLC0415 - after parsing: --help stays instant
    from mgn.config import config_from_args  # noqa: PLC0415

    options = Options(
        out=Path(args.out), work=Path(args.work), arms_file=args.arms_file, seeds=args.seeds, scarce=args.scarce,
        plentiful=args.plentiful, test=args.test, train_shards=args.train_shards, test_shards=args.test_shards,
        pretrained=args.pretrained, all_settings_all_arms=args.all_settings, threads=args.threads, clip=args.clip,
        prompts=args.prompts, settings=None if args.settings is None else args.settings.split(","),
        dry_run=args.dry_run, base=config_from_args(args).to_dict(), command=shlex.join(["python", "compare.py", *argv]),
        allow_truncated_captions=args.allow_truncated_captions,
        arms=None if args.arms is None else args.arms.split(","),
        slurm=args.slurm, slurm_args={"nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                                      "cpus_per_task": args.cpus_per_task, "partition": args.partition,
                                      "time": args.time})
    try:
        run(options)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
