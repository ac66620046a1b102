"""Every path inside a run folder, named in one place: what a training run writes where, and where every
reader (evaluate.py, benchmark.py, the comparison runner, a resume) looks for it.

    <run>/config.json        the resolved config                <run>/train.log       rank 0's log
    <run>/metrics.csv        one line per evaluation and role   <run>/captions.json   captions cut at seq_len
    <run>/start.json         the initial weights' digest         <run>/summary.json    where everything is
    <run>/.lock              who runs in this folder (mgn/train/run_folder.py)
    <run>/tb/<run name>/     TensorBoard
    <run>/checkpoints/       the DeepSpeed tags (their inside: mgn/checkpoint/store.py)
    <run>/student/           the final exported student          <run>/student_best/   the best evaluation's
    <run>/attention/         the attention pictures              <run>/rollbacks/      the keys a rollback
    skipped <run>/eval/<tag>/        evaluate.py's report of a checkpoint <run>/predictions-<split>.jsonl
    the comparison's per-sample predictions
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """The paths of the run folder `root` (a Config's: `cfg.paths`)."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.json")
    log = property(lambda self: self.root / "train.log")
    metrics = property(lambda self: self.root / "metrics.csv")
    captions = property(lambda self: self.root / "captions.json")
    start = property(lambda self: self.root / "start.json")
    summary = property(lambda self: self.root / "summary.json")
    lock = property(lambda self: self.root / ".lock")
    checkpoints = property(lambda self: self.root / "checkpoints")
    student = property(lambda self: self.root / "student")
    student_best = property(lambda self: self.root / "student_best")
    attention = property(lambda self: self.root / "attention")
    rollbacks = property(lambda self: self.root / "rollbacks")

    @property
    def tensorboard(self) -> Path:
        """`<run>/tb/<run name>`: `tensorboard --logdir <run>/tb` then names the run after itself, not '.'."""
        return self.root / "tb" / self.root.name

    def attention_picture(self, step: int) -> Path:
        return self.attention / f"step_{step:08d}.png"

    def rollback_keys(self, number: int, rank: int | str) -> Path:
        return self.rollbacks / f"rollback_{number}.rank{rank}.txt"

    def evaluation(self, tag: str) -> Path:
        """Where evaluate.py writes its report of the checkpoint `tag` by default."""
        return self.root / "eval" / tag

    def predictions(self, split: str) -> Path:
        return self.root / f"predictions-{split}.jsonl"

    @staticmethod
    def evaluation_beside(artifact: Path) -> Path:
        """Where evaluate.py writes its report of an exported student by default: `eval/` beside the file."""
        return Path(artifact).parent / "eval"
