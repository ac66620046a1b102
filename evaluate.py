"""Evaluate a trained model: the image-only student as deployed, and optionally the guided teacher beside it.

    python evaluate.py --ckpt runs/demo                         # run folder: its checkpoints/latest
    python evaluate.py --ckpt runs/demo/checkpoints/step_00000150 --teacher
    python evaluate.py --ckpt runs/demo/student/student.pt2 --shards 'shards/other/test-*.tar'
    torchrun --standalone --nproc_per_node 2 evaluate.py --ckpt runs/demo   # each rank reads its share
    srun python evaluate.py --ckpt runs/demo                    # one task per GPU under Slurm

--ckpt takes a run folder, its checkpoints/ folder or `latest` file, a tag folder (ZeRO-0 module states, or
ZeRO-1/2 shards consolidated to fp32 with DeepSpeed's zero_to_fp32), or an exported student.pt2. The model
is rebuilt from the config saved with the checkpoint. Writes eval.json and pr_curve.png to --out
(default: <run>/eval/<tag>/, or eval/ beside the artifact) and prints a table.
"""
import argparse
import sys

from mgn.checkpoint import CheckpointError
from mgn.evaluate import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run folder, checkpoint folder/tag/latest, or student.pt2")
    parser.add_argument("--shards", default=None, help="test shards (brace pattern, glob or list file); "
                                                       "default: data.test_shards from the checkpoint's config")
    parser.add_argument("--teacher", action="store_true", help="also evaluate the guided multimodal path")
    parser.add_argument("--target-precision", type=float, default=0.9,
                        help="report the best recall at this precision and its threshold (binary; default 0.9)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.micro_batch of the run")
    parser.add_argument("--num-workers", type=int, default=None, help="default: data.num_workers of the run")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default=None, help="output folder for eval.json and pr_curve.png")
    parser.add_argument("--tensorboard", default=None, metavar="DIR", help="also log metrics and PR curves here")
    parser.add_argument("--fusion-check-batches", type=int, default=1,
                        help="batches on which fused and unfused students are compared (-1: all; 0: none)")
    parser.add_argument("--module-states", action="store_true",
                        help="ZeRO-1/2: read the module states instead of consolidating fp32 weights from the shards")
    args = parser.parse_args(argv)
    checks = None if args.fusion_check_batches < 0 else args.fusion_check_batches
    try:
        run(args.ckpt, shards=args.shards, teacher=args.teacher, target_precision=args.target_precision,
            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, out_dir=args.out,
            tensorboard=args.tensorboard, fusion_check_batches=checks,
            consolidate_zero=False if args.module_states else None)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
