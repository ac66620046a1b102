"""What the cells read, written once under --work: the synthetic shards and the stand-in pretrained encoder.

No pretrained weights can be downloaded on this project's machine, so the "pretrained" setting starts
from a stand-in: a MobileOne trained here, image-only, on a separate synthetic corpus (plan.STANDIN_NOTE).
Both are cached: a re-run (or a fresh checkout re-rendering the committed table) finds them and goes on;
the stand-in trains only if a cell still to run starts from it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors.torch import save_file

from mgn.artifacts import load_checkpoint
from mgn.compare.cell import evaluate_run, spawn_training
from mgn.compare.plan import SHARD_SIZE, Cell, Options, standin_config, standin_weights, synthetic_dir
from mgn.config import PRESETS
from mgn.shards import write_synthetic

log = logging.getLogger("mgn")


def prepare(pending: list[Cell], options: Options) -> None:
    """Write the synthetic shards (the caption-only reference reads them too) and, if a run still to do starts
    from it, train the stand-in encoder; both only when missing."""
    if not options.train_shards:
        prepare_data(options)
    if any(c.setting.init == "standin" for c in pending):
        prepare_standin(options)


def prepare_data(options: Options) -> None:
    """One synthetic set: `plentiful` train samples (the scarce set is its first shards) and one test set
    whose spurious badge is uncorrelated with the label (the generator's default test split)."""
    out = synthetic_dir(options)
    if (out / "sizes.json").exists():
        return
    total = options.plentiful + options.test
    shutil.rmtree(out, ignore_errors=True)
    log.info("MGN compare: writing %d synthetic samples to %s", total, out)
    write_synthetic(out, samples=total, image_size=PRESETS["compare"]["model"]["image_size"], seed=0,
                    max_samples=SHARD_SIZE, test_fraction=options.test / total)


def prepare_standin(options: Options) -> None:
    """Train (once, cached) the stand-in encoder and write its weights as a timm-loadable safetensors file."""
    cfg = standin_config(options)
    weights = standin_weights(options)
    if weights.exists():
        return
    data = Path(cfg.data.train_shards).parent
    if not (data / "sizes.json").exists():
        shutil.rmtree(data, ignore_errors=True)
        log.info("MGN compare: writing the stand-in's pretraining corpus to %s", data)
        write_synthetic(data, samples=options.plentiful + 200, image_size=cfg.model.image_size, seed=1,
                        max_samples=SHARD_SIZE, test_fraction=200 / (options.plentiful + 200), decoys=0,
                        target="scene_quadrant")
    log.info("MGN compare: pretraining the stand-in image encoder (%s)", cfg.run_dir)
    spawn_training(cfg, cfg.run_dir.parent / "pretrain.log", options.threads)
    encoder = load_checkpoint(cfg.run_dir).unfused_student.encoder
    quality = evaluate_run(cfg.run_dir, None)  # how much it learned, on its own held-out corpus (8 classes)
    (weights.parent / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(weights))
