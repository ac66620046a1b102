"""The demo ends where the docs say: a fresh `python train.py` (the README's first command, after set-up) and
the figures the README and docs/demo.md publish (written from a run by docs/demo_figures.py, never by
hand)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_a_fresh_demo_ends_with_the_figures_the_docs_publish(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_",
                                                                     "OMP_NUM_THREADS"))}
    # the published figures were made with 2 torch threads (the default here); the thread count is part of the
    # sum
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    demo = subprocess.run([sys.executable, "train.py", "--train.output_dir", str(tmp_path / "runs")],
                          cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    check = subprocess.run([sys.executable, "docs/demo_figures.py", str(tmp_path / "runs" / "latest"),
                            "--check"],
                           cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
