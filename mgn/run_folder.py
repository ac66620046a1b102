"""A run's folder before training starts: a name no other run has, the `latest` link to it, and the synthetic
shards a demo-style preset reads, written once."""
from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from mgn import tokens
from mgn.cli import synthetic_writes
from mgn.config import Config
from mgn.shards import write_synthetic

log = logging.getLogger("mgn")


def new_run_name(cfg: Config) -> str:
    """A name for a new run folder, created here so that two runs started in the same second never share one."""
    base = datetime.now().strftime(f"%Y%m%d-%H%M%S-{cfg.objective.name}")
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        name = base if attempt == 1 else f"{base}-{attempt}"
        try:
            (Path(cfg.train.output_dir) / name).mkdir()
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder name under {cfg.train.output_dir} for {base}")


def ensure_demo_shards(cfg: Config) -> None:
    """Create the synthetic shards the demo preset points at, if they are not there yet."""
    out_dir = synthetic_writes(cfg)
    if out_dir is None:
        return
    log.info("MGN: writing %d synthetic samples to %s", cfg.data.synthetic_samples, out_dir)
    # The data seed is fixed: runs with different `train.seed` must see the same dataset.
    # token ids for the run's own tokenizer (mgn/tokens.py), when it reads captions and has a fast tokenizer
    tokenizer = cfg.model.text_model if cfg.uses_captions and tokens.field_name(cfg.model.text_model) else None
    write_synthetic(out_dir, samples=cfg.data.synthetic_samples, image_size=cfg.model.image_size, seed=0,
                    tokenizer=tokenizer)


def point_latest(run_dir: Path) -> None:
    """`<output_dir>/latest` -> the newest run's folder (a relative symlink, replaced atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{run_dir.name}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    tmp.replace(link)
