"""Evaluate a trained model: the image-only student as deployed, and optionally the guided teacher beside it.

    python evaluate.py --ckpt runs/demo                         # run folder: its checkpoints/latest
    python evaluate.py --ckpt runs/demo/checkpoints/step_00000150 --teacher
    python evaluate.py --ckpt runs/demo/student/student.safetensors --shards 'shards/other/test-*.tar'
    torchrun --standalone --nproc_per_node 2 evaluate.py --ckpt runs/demo   # each rank reads its share
    srun python evaluate.py --ckpt runs/demo                    # one task per GPU under Slurm
    python evaluate.py --clip models/clip-b16 --shards 'shards/demo/test-*.tar'   # CLIP zero-shot baseline

--ckpt takes a run folder (or the runs folder: its `latest` run, named in a note), its checkpoints/ folder or
`latest` file, a tag folder (its module states; with --trust-checkpoint, ZeRO-1/2 fp32 weights consolidated
from the optimizer shards), or an exported student (student.safetensors; student.pt2 when it holds no pickles,
or with --trust-checkpoint). The model is rebuilt from the config saved with the checkpoint; nothing is
unpickled unless --trust-checkpoint says so. Writes eval.json and pr_curve.png to --out (default:
<run>/eval/<tag>/, or eval/ beside the artifact) and prints a table.
"""
import argparse
import sys

from mgn.cli import require, run_command
from mgn.io.shard_sets import check_shards


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0, or 2 after one line `evaluate.py: error: ...` for a bad flag, checkpoint or shard."""
    return run_command("evaluate.py", lambda: _main(argv), also=(RuntimeError,))


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="run folder, checkpoint folder/tag/latest, or student.safetensors / "
                                       ".pt2")
    source.add_argument("--clip", metavar="MODEL", help="CLIP zero-shot baseline instead: a local folder (or "
                                                        "hub "
                                                         "name with --allow-download) of a transformers "
                                                         "CLIPModel")
    parser.add_argument("--prompts", default=None, help="--clip: JSON {class name: [prompts]} in class-index "
                                                        "order "
                                                        "(default: the binary moderation prompts of "
                                                        "mgn/eval/clip.py)")
    parser.add_argument("--allow-download", action="store_true", help="--clip: fetch the model from the hub")
    parser.add_argument("--shards", default=None, help="test shards (brace pattern, glob or list file); "
                                                       "default: data.test_shards from the checkpoint's "
                                                       "config")
    parser.add_argument("--teacher", action="store_true", help="also evaluate the guided multimodal path")
    parser.add_argument("--target-precision", type=float, default=0.9,
                        help="report the best recall at this precision and its threshold (binary; default "
                             "0.9)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.micro_batch of the run")
    parser.add_argument("--num-workers", type=int, default=None, help="default: data.num_workers of the run")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-form", default="auto", choices=["auto", "uint8", "float"],
                        help="what the loader hands over: uint8 NHWC pixels normalised on the device, or "
                             "float NCHW "
                             "normalised by the loader; auto: uint8 on a GPU, float on the CPU "
                             "(mgn/devices.py)")
    parser.add_argument("--out", default=None, help="output folder for eval.json and pr_curve.png")
    parser.add_argument("--tensorboard", default=None, metavar="DIR", help="also log metrics and PR curves "
                                                                           "here")
    parser.add_argument("--fusion-check-batches", type=int, default=1,
                        help="batches on which fused and unfused students are compared (-1: all; 0: none)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow what unpickles files (can run code): a student.pt2 with pickled parts, "
                             "ZeRO-1/2 "
                             "fp32 consolidation from the optimizer shards. Only for files from sources you "
                             "trust")
    args = parser.parse_args(argv)
    if args.clip and not args.shards:
        parser.error("--clip needs --shards (the test shards to score)")
    require("--target-precision", args.target_precision, 0 < args.target_precision <= 1, "must be in (0, 1]")
    require("--batch-size", args.batch_size, args.batch_size is None or args.batch_size >= 1, "must be >= 1")
    require("--num-workers", args.num_workers, args.num_workers is None or args.num_workers >= 0,
            "must be >= 0")
    require("--fusion-check-batches", args.fusion_check_batches, args.fusion_check_batches >= -1,
            "must be >= -1 (-1: all batches; 0: none)")
    checks = None if args.fusion_check_batches < 0 else args.fusion_check_batches

    from mgn.eval.evaluate import run, run_clip  # heavy: torch; after parsing, --help stays instant

    try:
        if args.clip:
            run_clip(args.clip, shards=args.shards, prompts=args.prompts,
                     target_precision=args.target_precision,
                     batch_size=args.batch_size or 64,
                     num_workers=2 if args.num_workers is None else args.num_workers,
                     device=args.device, out_dir=args.out, allow_download=args.allow_download)
        else:
            run(args.ckpt, shards=args.shards, teacher=args.teacher, target_precision=args.target_precision,
                batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                batch_form=args.batch_form, out_dir=args.out,
                tensorboard=args.tensorboard, fusion_check_batches=checks, trust=args.trust_checkpoint)
    except (OSError, ValueError) as error:
        # the pattern matched nothing, or named missing files:
        if args.shards and repr(args.shards) in str(error):
            check_shards("--shards", args.shards)  # the same error, named by its flag
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
